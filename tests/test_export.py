"""Export to Hugging Face directories and GGUF files: transformers' PyTorch models and our own
loaders read back what we write (logits, greedy tokens, discriminator scores, tokenizers)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from flax import nnx
from parity import Reference, assert_f32_parity, hf_reference
from test_pipeline import why
from tokenizers import models, pre_tokenizers, trainers

from rlhb_jax.config import Config, ModelSpec, SamplingConfig
from rlhb_jax.data.batches import Encoder, pad_prompts
from rlhb_jax.data.tokenization import Tokenizer
from rlhb_jax.jobs import export as export_job
from rlhb_jax.model import build as build_lib
from rlhb_jax.model import export, gguf_file, loading
from rlhb_jax.model.heads import ScalarModel
from rlhb_jax.model.llama import LlamaConfig, Transformer, positions_from_mask
from rlhb_jax.model.sampling import sample

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXTS = ["hello world", "how are you today?", "the cat sat on the mat", "Ünïcödé 2024 😀"]

# (family, our config without vocab_size); every family's tensors and config keys differ.
SHAPE = dict(embed_dim=48, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=8, mlp_dim=80)
CASES = {
  "llama": ("llama", dict(tie_embeddings=True)),
  "llama_llama3_rope": (
    "llama",
    dict(tie_embeddings=True, rope_theta=5e4, rope_scaling=(8.0, 1.0, 4.0, 8)),
  ),
  "qwen2_bias": ("qwen2", dict(tie_embeddings=True, qkv_bias=True, rope_theta=1e6, norm_eps=1e-6)),
  "mistral_untied": ("mistral", dict(tie_embeddings=False, head_dim=12, norm_eps=1e-5)),
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
  """A byte-level BPE with the tiny model's specials (<pad> 0, <eos> 1, <bos> 2, <|user|>, ...)."""
  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=320,
    special_tokens=["<pad>", "<eos>", "<bos>", "<|user|>", "<|assistant|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  bpe.train_from_iterator(TEXTS * 5 + ["Question: Answer: Users: most liked it."] * 5, trainer)
  return Tokenizer.from_tokenizers(bpe)


def _randomize(tree, seed: int):
  """Every leaf random (norms near 1, biases and heads too), so a mis-mapped tensor shows."""
  leaves, treedef = jax.tree.flatten_with_path(tree)
  rng = np.random.default_rng(seed)
  out = []
  for path, x in leaves:
    noise = rng.normal(size=x.shape).astype(np.float32)
    norm = "norm" in jax.tree_util.keystr(path)
    out.append(1.0 + 0.1 * noise if norm else 0.2 * noise)
  return jax.tree.unflatten(treedef, out)


def _config(case: str, vocab: int) -> tuple[str, LlamaConfig]:
  family, overrides = CASES[case]
  return family, LlamaConfig(vocab_size=vocab, **{**SHAPE, **overrides})


def _random_lm(cfg: LlamaConfig, seed: int) -> tuple[Transformer, dict]:
  params = _randomize(build_lib.params_of(Transformer(cfg, rngs=nnx.Rngs(0))), seed)
  return loading.build_transformer(cfg, params), params


def _left_padded(rng, vocab: int, lengths: list[int], pad: int = 0):
  T = max(lengths)
  tokens = np.full((len(lengths), T), pad, np.int32)
  mask = np.zeros((len(lengths), T), bool)
  for i, n in enumerate(lengths):
    tokens[i, T - n :] = rng.integers(5, vocab, n)
    mask[i, T - n :] = True
  return tokens, mask


def _ours(model, tokens, mask) -> np.ndarray:
  m = jnp.asarray(mask)
  return np.asarray(model(jnp.asarray(tokens), positions_from_mask(m), m)[0])


def _theirs(model, tokens, mask) -> Reference:
  """transformers' logits on a left-padded batch with our positions: float64 and its f32 error."""
  positions = torch.from_numpy(np.array(positions_from_mask(jnp.asarray(mask)))).long()

  def forward(m):
    return m(
      input_ids=torch.from_numpy(tokens).long(),
      attention_mask=torch.from_numpy(mask).long(),
      position_ids=positions,
    ).logits

  return hf_reference(model, forward, mask)


def _scores(model, rows: list[list[int]], pad: int, bias: float) -> Reference:
  """A sequence classifier's score (+ the exported bias) of each row: right-padded in one batch,
  then each row alone, concatenated."""
  right = np.full((len(rows), max(map(len, rows))), pad, np.int64)
  for i, r in enumerate(rows):
    right[i, : len(r)] = r

  def forward(m):
    batch = m(input_ids=torch.from_numpy(right), attention_mask=torch.from_numpy(right != pad))
    single = [m(input_ids=torch.tensor([r])).logits[0] for r in rows]
    return torch.cat([batch.logits[:, 0], torch.stack(single)[:, 0]]) + bias

  return hf_reference(model, forward)


def _greedy_ours(model, tok: Tokenizer, prompts: list[list[int]], n: int) -> list[list[int]]:
  cfg = SamplingConfig(max_new_tokens=n, greedy=True)
  tokens, mask = pad_prompts(prompts, cfg.prompt_buckets, tok.pad_id)
  out = sample(
    model, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0), cfg, tok.eos_ids, tok.pad_id
  )
  toks, live = np.asarray(out.tokens), np.asarray(out.mask)
  return [toks[i][live[i]].tolist() for i in range(len(prompts))]


def _greedy_theirs(model, prompt: list[int], n: int, eos: list[int], pad: int) -> list[int]:
  with torch.no_grad():
    gen = model.generate(
      torch.tensor([prompt]),
      attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
      max_new_tokens=n,
      do_sample=False,
      eos_token_id=eos,
      pad_token_id=pad,
    )
  return gen[0, len(prompt) :].tolist()


def test_permute_qk_is_llama_cpp_permutation_and_inverts_unpermute():
  rng = np.random.default_rng(0)
  w, b = rng.normal(size=(3 * 8, 5)), rng.normal(size=(2 * 8,))
  # llama.cpp's converter: w.reshape(n, 2, H/2, ...).swapaxes(1, 2); one head of H=8 as row ids:
  np.testing.assert_array_equal(export.permute_qk(np.arange(8), 1), [0, 4, 1, 5, 2, 6, 3, 7])
  np.testing.assert_array_equal(loading.unpermute_qk(export.permute_qk(w, 3), 3), w)
  np.testing.assert_array_equal(loading.unpermute_qk(export.permute_qk(b, 2), 2), b)


def test_write_safetensors_shards_above_the_threshold(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {f"t{i}": rng.normal(size=(16, 16)).astype(np.float32) for i in range(5)}  # 1 KiB each
  files = export.write_safetensors(tmp_path, tensors, max_shard_bytes=2048)
  assert files[-1] == "model.safetensors.index.json" and len(files) == 4  # 2 + 2 + 1 tensors
  index = json.loads((tmp_path / files[-1]).read_text())
  assert index["metadata"]["total_size"] == 5 * 1024
  assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors"
  with loading._safetensors_dir(tmp_path) as (names, get):
    assert names == set(tensors)
    for k, v in tensors.items():
      np.testing.assert_array_equal(get(k), v)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_export_loads_in_transformers_and_back(case, tok, tmp_path):
  family, cfg = _config(case, tok.vocab_size)
  model, params = _random_lm(cfg, seed=1)
  files = export.save_hf(
    tmp_path, export.Exportable(cfg, params, tok, family, 64), max_shard_bytes=100_000
  )
  assert "model.safetensors.index.json" in files  # sharded at this threshold
  hf = json.loads((tmp_path / "config.json").read_text())
  assert hf["architectures"] == [f"{export.FAMILIES[family]}ForCausalLM"]
  assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [1]

  ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  assert type(ref).__name__ == hf["architectures"][0]
  assert ref.config.tie_word_embeddings == cfg.tie_embeddings
  assert ref.config.rope_parameters["rope_type"] == ("llama3" if cfg.rope_scaling else "default")
  tokens, mask = _left_padded(np.random.default_rng(0), cfg.vocab_size, [20, 13, 5, 1])
  ours, theirs = _ours(model, tokens, mask), _theirs(ref, tokens, mask)
  assert np.abs(theirs.exact[mask]).max() > 1.0  # not a comparison of near-zero numbers
  assert_f32_parity(ours, theirs, mask)

  prompts = [tok.chat_prompt(t) for t in TEXTS]
  mine = _greedy_ours(model, tok, prompts, 12)
  for p, m in zip(prompts, mine, strict=True):
    assert m == _greedy_theirs(ref, p, 12, list(tok.eos_ids), tok.pad_id)

  # model.source=hf reads it back bit for bit, tokenizer and eos ids included.
  back, back_tok = loading.load_model(ModelSpec(source="hf", path=str(tmp_path)))
  assert back.cfg == cfg
  np.testing.assert_array_equal(_ours(back, tokens, mask), ours)
  assert [back_tok.chat_prompt(t) for t in TEXTS] == prompts
  assert (back_tok.eos_ids, back_tok.pad_id) == (tok.eos_ids, tok.pad_id)


@pytest.mark.parametrize("case", sorted(CASES))
def test_discriminator_exports_as_sequence_classifier(case, tok, tmp_path):
  """transformers' score + config.json's score_bias == our discriminator's logit, on the prefix
  and response tokens of a triplet, unpadded and right-padded in a batch."""
  family, cfg = _config(case, tok.vocab_size)
  disc = ScalarModel(cfg, 1, rngs=nnx.Rngs(0))
  params = _randomize(build_lib.params_of(disc), seed=2)
  nnx.update(disc, params)
  export.save_hf(tmp_path, export.Exportable(cfg, params, tok, family, 64))
  hf = json.loads((tmp_path / "config.json").read_text())
  assert hf["architectures"] == [f"{export.FAMILIES[family]}ForSequenceClassification"]
  assert hf["pad_token_id"] == tok.pad_id == 0 and hf["score_bias"] == float(params["head_b"][0])

  enc = Encoder(Config(), tok)
  behaviors = ["Users: most liked it.", "Users: few liked it."]
  rows = [[*enc.prefix(TEXTS[i], behaviors[i % 2]), *enc.response(TEXTS[-1 - i])] for i in range(3)]
  ours = [float(disc.last_token(jnp.asarray([r]), jnp.ones((1, len(r)), bool))[0, 0]) for r in rows]
  ref = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
  theirs = _scores(ref, rows, hf["pad_token_id"], hf["score_bias"])  # batched, then one by one
  assert_f32_parity(np.concatenate([ours, ours]), theirs)
  assert np.ptp(ours) > 0.1  # the rows score differently


@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_export_loads_back(case, tok, tmp_path):
  family, cfg = _config(case, tok.vocab_size)
  model, params = _random_lm(cfg, seed=3)
  path = tmp_path / "model.gguf"
  if cfg.rope_scaling is not None:
    with pytest.raises(NotImplementedError, match="rope_freqs"):
      gguf_file.save_gguf(path, export.Exportable(cfg, params, tok, family, 64))
    return
  gguf_file.save_gguf(path, export.Exportable(cfg, params, tok, family, 64))
  back_cfg, back_params = loading.load_gguf(path)
  assert back_cfg == dataclasses.replace(cfg, norm_eps=float(np.float32(cfg.norm_eps)))  # f32 key
  tokens, mask = _left_padded(np.random.default_rng(1), cfg.vocab_size, [16, 9, 2])
  ours = _ours(model, tokens, mask)
  back = _ours(loading.build_transformer(back_cfg, back_params), tokens, mask)
  np.testing.assert_array_equal(back[mask], ours[mask])  # the same float32 weights

  gguf_tok = Tokenizer.from_gguf(path)
  for text in TEXTS:
    assert gguf_tok.encode(text) == tok.encode(text)
    assert gguf_tok.chat_prompt(text) == tok.chat_prompt(text)
  assert (gguf_tok.eos_ids, gguf_tok.pad_id, gguf_tok.vocab_size) == (
    tok.eos_ids,
    tok.pad_id,
    tok.vocab_size,
  )

  # f16: the matrices rounded to half precision, norms and biases kept in f32 (llama.cpp's F16).
  gguf_file.save_gguf(path, export.Exportable(cfg, params, tok, family, 64), dtype="float16")
  matrices = {"embed", "lm_head", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
  half = jax.tree.map_with_path(
    lambda path, x: x.astype(np.float16).astype(np.float32) if path[-1].key in matrices else x,
    params,
  )
  rounded = _ours(loading.build_transformer(cfg, half), tokens, mask)
  f16 = _ours(loading.build_transformer(*loading.load_gguf(path)), tokens, mask)
  np.testing.assert_array_equal(f16[mask], rounded[mask])
  assert np.abs(f16[mask] - ours[mask]).max() > 1e-5  # it did round


# -- SmolLM2-135M-Instruct, the built-in model -----------------------------------------------------

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "hi"]


@pytest.mark.slow
def test_smollm2_exports_to_transformers_and_gguf(tmp_path):
  spec = ModelSpec(source="smollm2-135m-instruct")
  model, tok = loading.load_model(spec)
  cfg, params = model.cfg, jax.device_get(build_lib.params_of(model))
  family, max_positions = export_job.source_of(spec, cfg)
  assert (family, max_positions) == ("llama", 8192)
  export.save_hf(tmp_path / "hf", export.Exportable(cfg, params, tok, family, max_positions))

  ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
  ref_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  prompts = [tok.chat_prompt(p) for p in PROMPTS]
  for text, ids in zip(PROMPTS, prompts, strict=True):
    chat = [{"role": "user", "content": text}]
    theirs = ref_tok.apply_chat_template(
      chat, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert list(theirs) == ids
  # The weights transformers holds are ours, bit for bit ...
  state = ref.state_dict()
  for name, w in export.causal_lm_tensors(cfg, params).items():
    np.testing.assert_array_equal(state[name].numpy(), w, err_msg=name)
  # ... and the logits differ by float32 rounding: over 30 layers, up to 1.06e-4 on logits of
  # magnitude 3.5 (transformers' own sdpa and eager attention differ by 6.2e-5 here).
  tokens, mask = pad_prompts(prompts, (64,), tok.pad_id)
  ours, theirs = _ours(model, tokens, mask), _theirs(ref.eval(), tokens, mask)
  assert_f32_parity(ours, theirs, mask)  # float32 rounding: tests/parity.py
  for p, m in zip(prompts, _greedy_ours(model, tok, prompts, 16), strict=True):
    assert m == _greedy_theirs(ref, p, 16, list(tok.eos_ids), tok.pad_id)
  back, _ = loading.load_model(ModelSpec(source="hf", path=str(tmp_path / "hf")))
  np.testing.assert_array_equal(_ours(back, tokens, mask), ours)

  # The discriminator: SmolLM2 pads with its EOS, so the export pads with <|endoftext|> (0).
  disc = build_lib.scalar_from_lm(model, 1, seed=0)
  head = _randomize({"head_w": disc.head_w[...], "head_b": disc.head_b[...]}, seed=4)
  nnx.update(disc, head)
  disc_params = jax.device_get(build_lib.params_of(disc))
  export.save_hf(tmp_path / "disc", export.Exportable(cfg, disc_params, tok, family, 8192))
  hf = json.loads((tmp_path / "disc" / "config.json").read_text())
  assert hf["pad_token_id"] == 0 and tok.pad_id in tok.eos_ids
  enc = Encoder(Config(), tok)
  rows = [[*enc.prefix(p, "Users: most liked it."), *enc.response("Paris.")] for p in PROMPTS]
  logits = [
    float(disc.last_token(jnp.asarray([r]), jnp.ones((1, len(r)), bool))[0, 0]) for r in rows
  ]
  ref_disc = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "disc")
  assert_f32_parity(np.concatenate([logits, logits]), _scores(ref_disc, rows, 0, hf["score_bias"]))

  gguf_file.save_gguf(
    tmp_path / "m.gguf", export.Exportable(cfg, params, tok, family, max_positions)
  )
  again = _ours(loading.build_transformer(*loading.load_gguf(tmp_path / "m.gguf")), tokens, mask)
  np.testing.assert_array_equal(again[mask], ours[mask])  # the same float32 weights
  gguf_tok = Tokenizer.from_gguf(tmp_path / "m.gguf")
  for text in [*PROMPTS, *TEXTS, "in 2024,  double  spaces\nand a new line."]:
    assert gguf_tok.encode(text) == tok.encode(text)
    assert gguf_tok.chat_prompt(text) == tok.chat_prompt(text)
  assert (gguf_tok.eos_ids, gguf_tok.pad_id) == (tok.eos_ids, tok.pad_id)


# -- mode=export through the CLI, on a finished tiny run -------------------------------------------

TINY_RUN = [
  "--config.model.embed_dim=32",
  "--config.model.num_layers=1",
  "--config.model.num_heads=2",
  "--config.model.num_kv_heads=1",
  "--config.model.head_dim=16",
  "--config.model.mlp_dim=64",
  "--config.model.vocab_size=400",
  "--config.sim.num_records=300",
  "--config.sft.steps=4",
  "--config.sft.batch_size=8",
  "--config.disc.warmup_steps=2",
  "--config.disc.batch_size=8",
  "--config.sampling.max_new_tokens=8",
  "--config.log.progress=False",
]


def cli(workdir, *args, mode: str = "export", check: bool = True) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "-m", "rlhb_jax.main", "--config", str(ROOT / "configs/tiny.py")]
  cmd += ["--workdir", str(workdir), f"--config.mode={mode}", *TINY_RUN, *args]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  if check:
    assert out.returncode == 0, why(out.stderr)
  return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> pathlib.Path:
  """A finished tiny run (SFT generator, warmed-up discriminator), its generator and
  discriminator exported, and mode=generate's greedy answers to prompts under the most preferred
  behavior text that the export wrote (and one with no behavior)."""
  workdir = tmp_path_factory.mktemp("run")
  cli(workdir, mode="sft")
  cli(workdir, mode="disc_warmup")
  cli(workdir)
  cli(workdir, "--config.export.what=discriminator")
  best = json.loads((workdir / "export/sft_actor/rlhb_behavior.json").read_text())["most_preferred"]
  queries = ["What is the capital of France?", "What is 12 plus 30?", "Who wrote Hamlet?"]
  prompts = [{"query": q, "behavior": best} for q in queries] + [{"query": queries[0]}]
  (workdir / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
  cli(
    workdir,
    "--config.sampling.greedy=True",
    f"--config.generate.prompts_file={workdir / 'prompts.jsonl'}",
    mode="generate",
  )
  return workdir


# Runs with HF_HUB_OFFLINE=1 in a fresh process: the model, the tokenizer and the prompt format
# (rlhb_behavior.json) come from the exported directory alone.
_HF_GENERATE = """
import json, sys
import torch, transformers
directory, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
spec = json.load(open(directory + "/rlhb_behavior.json"))
tok = transformers.AutoTokenizer.from_pretrained(directory)
model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
for p in prompts:
  if p.get("behavior"):
    msg = spec["generator_prompt"].format(behavior=p["behavior"], query=p["query"], context="")
  else:
    msg = p["query"]
  chat = [{"role": "user", "content": msg.strip()}]
  ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
  ids = list(ids["input_ids"])
  out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
  new = [t for t in out[0, len(ids):].tolist() if t not in model.generation_config.eos_token_id]
  text = tok.decode(new, skip_special_tokens=True)
  print(json.dumps({"prompt": ids, "response": new, "text": text}))
"""


def test_cli_export_generates_like_mode_generate(tiny_run):
  out = tiny_run / "export" / "sft_actor"
  names = {p.name for p in out.iterdir()}
  assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
  assert {"rlhb_behavior.json", "bin_edges.json"} <= names
  assert (out / "bin_edges.json").read_text() == (tiny_run / "bin_edges.json").read_text()
  ours = [json.loads(line) for line in (tiny_run / "generations.jsonl").read_text().splitlines()]
  prompts = [{"query": g["query"], "behavior": g["behavior"]} for g in ours]
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
  proc = subprocess.run(
    [sys.executable, "-c", _HF_GENERATE, str(out), json.dumps(prompts), "8"],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert proc.returncode == 0, why(proc.stderr)
  theirs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert len(theirs) == len(ours) == 4
  for g, t in zip(ours, theirs, strict=True):
    assert t["prompt"] == g["prompt_token_ids"]
    assert t["response"] == g["response_token_ids"] and t["text"] == g["response"]
  assert any(g["response_token_ids"] for g in ours)


def test_cli_exported_discriminator_scores_like_ours(tiny_run):
  from rlhb_jax import config as config_lib
  from rlhb_jax.run import Run

  cd = config_lib.load_configdict(ROOT / "configs/tiny.py")
  for flag in TINY_RUN:  # ints and False
    key, value = flag.removeprefix("--config.").split("=")
    section, field = key.split(".")
    cd[section][field] = json.loads(value.lower())
  cfg = config_lib.from_configdict(cd)
  run = Run(cfg, tiny_run).prepare("tokenizer")
  disc = build_lib.build_disc(cfg, run.base_actor(), run.tokenizer.vocab_size)
  nnx.update(disc, run.load_params("disc_warmup", disc))
  spec = json.loads((tiny_run / "export/disc_warmup/rlhb_behavior.json").read_text())
  enc = Encoder(cfg, run.tokenizer)
  query, context = "What is the capital of France?", "Paris is the capital of France."
  rows = [
    [*enc.prefix(query, spec[b], context), *enc.response(r)]
    for b in ("most_preferred", "least_preferred")
    for r in ("Paris.", "The capital of France is Lyon, I think.")
  ]
  ours = [float(disc.last_token(jnp.asarray([r]), jnp.ones((1, len(r)), bool))[0, 0]) for r in rows]
  directory = tiny_run / "export" / "disc_warmup"
  hf = json.loads((directory / "config.json").read_text())
  ref = transformers.AutoModelForSequenceClassification.from_pretrained(directory).eval()
  theirs = hf_reference(
    ref, lambda m: torch.stack([m(input_ids=torch.tensor([r])).logits[0, 0] for r in rows])
  )
  assert_f32_parity(np.asarray(ours) - hf["score_bias"], theirs)


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config.export.what=policy"], "config error: config.export.what='policy'"),
    (["--config.export.format=onnx"], "config error: config.export.format='onnx'"),
    (["--config.export.what=discriminator", "--config.export.format=gguf"], "config error"),
    ([], "export error: "),  # a run with no trained model
    (["--config.export.params=rlhb_actor"], "export error: "),
  ],
)
def test_cli_export_bad_input_is_one_line(args, message, tmp_path):
  out = cli(tmp_path, *args, check=False)
  assert out.returncode == 2
  assert "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(message), out.stderr[-2000:]
  assert not (tmp_path / "logs.jsonl").exists()  # nothing simulated or trained on the way
