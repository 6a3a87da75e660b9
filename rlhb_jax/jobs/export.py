"""mode=export: a trained model of the run as a Hugging Face directory or a GGUF file.

  python -m rlhb_jax.main --config CONFIG --workdir DIR --config.mode=export \
    [--config.export.what=generator|discriminator|reward_model] [--config.export.format=hf|gguf] \
    [--config.export.params=NAME] [--config.export.dtype=float32|float16|bfloat16]

writes DIR/export/NAME/ (NAME: the model under DIR/models/, by default the newest of its kind):
  hf:   config.json, model.safetensors (or shards and an index), tokenizer files with the chat
        template, generation_config.json (EOS ids, the run's sampling settings)
  gguf: NAME-f32.gguf or NAME-f16.gguf (weights, tokenizer, chat template)
  both: rlhb_behavior.json (the prompt templates, the most and least preferred behavior texts, the
        behavior templates and bin edges) and a copy of the run's bin_edges.json
The saved models already have their LoRA adapters merged (`build_lib.merged_params`), so the trees
exported here are plain models.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil

from flax import nnx

from rlhb_jax.config import Config, ModelSpec, to_configdict
from rlhb_jax.data import behavior
from rlhb_jax.data.batches import generator_message
from rlhb_jax.model import build as build_lib
from rlhb_jax.model import export, gguf_file
from rlhb_jax.model.llama import LlamaConfig
from rlhb_jax.run import Run

log = logging.getLogger(__name__)

# What each kind of model is saved as under models/ (the newest match is exported by default).
KINDS = {
  "generator": ("*_actor",),  # sft_actor, rlhb_actor, rlhf_actor, dpo_actor, online_actor, ...
  "discriminator": ("*_disc", "disc_warmup"),  # after RLHB (rlhb_disc, ...), or after its warm-up
  "reward_model": ("reward_model",),  # RLHF's Bradley-Terry reward model
}
TINY_MAX_POSITIONS = 2048  # config.json's max_position_embeddings for the random-init tiny model
BEHAVIOR_FILE = "rlhb_behavior.json"


class ExportError(Exception):
  """Nothing to export (main.py prints it as one line and exits 2)."""


def find_params(workdir: pathlib.Path, what: str, name: str = "") -> str:
  """`name` if the run has it, else the newest model of kind `what` under workdir/models/."""
  models = workdir / "models"
  if name:
    if not (models / name).is_dir():
      raise ExportError(f"{models / name}: no such trained model")
    return name
  found = [p for pattern in KINDS[what] for p in models.glob(pattern) if p.is_dir()]
  if not found:
    raise ExportError(
      f"{models}: no trained {what} ({' or '.join(KINDS[what])}); train one first "
      "(mode=sft, disc_warmup, rlhb, reward_model or pipeline)"
    )
  return max(found, key=lambda p: p.stat().st_mtime).name


def source_of(spec: ModelSpec, cfg: LlamaConfig) -> tuple[str, int]:
  """(model family, max positions) of the checkpoint a model was built from. GGUF files do not
  tell Mistral from Llama; both run as Llama. q/k/v biases are Qwen2's."""
  family, max_positions = "llama", TINY_MAX_POSITIONS
  if spec.source == "hf":
    hf = json.loads((pathlib.Path(spec.path) / "config.json").read_text())
    family = hf.get("model_type", family)
    max_positions = int(hf.get("max_position_embeddings", max_positions))
  elif spec.source in ("gguf", "smollm2-135m-instruct"):
    import gguf

    from rlhb_jax.model import loading

    path = loading.builtin_smollm2_path() if spec.source != "gguf" else spec.path
    fields = gguf.GGUFReader(str(path)).fields
    arch = fields["general.architecture"].contents()
    family = "qwen2" if arch == "qwen2" else "llama"
    if f"{arch}.context_length" in fields:
      max_positions = int(fields[f"{arch}.context_length"].contents())
  return ("qwen2" if cfg.qkv_bias else family), max_positions


def generation_defaults(cfg: Config) -> dict:
  """generation_config.json's sampling settings: the run's (`config.sampling`)."""
  s = cfg.sampling
  if s.greedy:
    return {"do_sample": False}
  return {"do_sample": True, "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p}


def behavior_texts(cfg: Config, workdir: pathlib.Path) -> dict:
  """What a server needs to condition the exported models exactly as training did."""
  best = behavior.most_preferred_text(cfg.behavior)
  edges = workdir / "bin_edges.json"
  example = "What is the capital of France?"
  return {
    "most_preferred": best,
    "least_preferred": behavior.least_preferred_text(cfg.behavior),
    "generator_prompt": cfg.prompt.generator,
    "context_template": cfg.prompt.context,
    "chat_template": cfg.prompt.chat_template,
    "system": cfg.prompt.system,
    "disc_prompt": cfg.prompt.disc,
    "example_user_message": generator_message(cfg, example, best),
    "notes": (
      "Generator: the user message is generator_prompt with {behavior} = most_preferred (or any "
      "text of the same templates), {query}, and {context} = context_template.format(context=...) "
      "or '' without a search result, then stripped; it goes through the tokenizer's chat "
      "template when chat_template is true, with `system` as the system message unless empty. "
      "Discriminator and reward model: the ids of disc_prompt (behavior '' for the reward model), "
      "then of ' ' + the stripped response, then the EOS id, encoded without special tokens; our "
      "logit = the exported model's score + config.json's score_bias (sigmoid: P(real))."
    ),
    "behavior": to_configdict(cfg.behavior).to_dict(),
    "bin_edges": json.loads(edges.read_text()) if edges.exists() else None,
  }


def run(cfg: Config, workdir: pathlib.Path) -> dict:
  ex = cfg.export
  name = find_params(workdir, ex.what, ex.params)
  run_ = Run(cfg, workdir).prepare("tokenizer")
  tok = run_.tokenizer
  model = run_.base_actor()
  spec = cfg.model
  if ex.what != "generator":
    model = build_lib.build_disc(cfg, model, tok.vocab_size)
    spec = cfg.model if cfg.disc.init_from_generator else cfg.disc.model
  try:
    params = run_.load_params(name, model)
  except (ValueError, KeyError, TypeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ExportError(f"models/{name} is not a {ex.what} of this run's shape: {first}") from None
  nnx.update(model, params)
  lm_cfg = build_lib.trunk_of(model).cfg
  family, max_positions = source_of(spec, lm_cfg)
  exportable = export.Exportable(lm_cfg, build_lib.params_of(model), tok, family, max_positions)

  out = workdir / "export" / name
  out.mkdir(parents=True, exist_ok=True)
  if ex.format == "hf":
    files = export.save_hf(
      out,
      exportable,
      dtype=ex.dtype,
      max_shard_bytes=ex.max_shard_bytes,
      generation=generation_defaults(cfg) if ex.what == "generator" else None,
    )
  else:
    gguf_name = f"{name}-{'f32' if ex.dtype == 'float32' else 'f16'}.gguf"
    gguf_file.save_gguf(out / gguf_name, exportable, dtype=ex.dtype, name=name)
    files = [gguf_name]
  (out / BEHAVIOR_FILE).write_text(json.dumps(behavior_texts(cfg, workdir), indent=2) + "\n")
  files.append(BEHAVIOR_FILE)
  if (workdir / "bin_edges.json").exists():
    shutil.copyfile(workdir / "bin_edges.json", out / "bin_edges.json")
    files.append("bin_edges.json")
  print(f"exported models/{name} ({ex.what}, {family}) as {ex.format} to {out}: {' '.join(files)}")
  return {"name": name, "path": str(out), "files": files, "family": family}
