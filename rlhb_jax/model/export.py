"""Writing our models in Hugging Face's format (GGUF files: `gguf_file.py`).

The inverse of `loading.py`. Our stacked parameters (`llama.py`: `wq` (L, D, N, H), ...) become
Hugging Face's per-layer tensors with (out, in) matrices (`hf_tensors`); `save_hf` writes them as
safetensors (sharded above a size) with the family's config.json. A `ScalarModel` (discriminator,
reward model) becomes `<Family>ForSequenceClassification` with one label: `score.weight` is our
head_w.T, and head_b, which that class has no place for, is config.json's "score_bias".

NumPy only; torch is never imported.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, NamedTuple

import numpy as np

from rlhb_jax.data.tokenization import Tokenizer
from rlhb_jax.model.llama import LlamaConfig

FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}  # model_type -> class prefix
MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size before version 5 (5 GiB)
_TOKENIZER_FILES = ("tokenizer", "special_tokens", "chat_template", "rlhb_tokenizer")  # tok.save's

Params = dict[str, Any]  # {"embed", "layers": {...}, "final_norm", ["lm_head"]} of arrays


# -- Tensors ---------------------------------------------------------------------------------------


def hf_tensors(cfg: LlamaConfig, params: Params) -> dict[str, np.ndarray]:
  """Hugging Face tensors (names without the "model." prefix) of our stacked parameters: the
  inverse of `loading.stack_hf_tensors`. Linear weights come out (out, in)."""
  D, N, K, H = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  table = {  # ours -> (theirs, one layer of ours -> theirs)
    "attn_norm": ("input_layernorm.weight", lambda w: w),
    "wq": ("self_attn.q_proj.weight", lambda w: w.reshape(D, N * H).T),
    "wk": ("self_attn.k_proj.weight", lambda w: w.reshape(D, K * H).T),
    "wv": ("self_attn.v_proj.weight", lambda w: w.reshape(D, K * H).T),
    "bq": ("self_attn.q_proj.bias", lambda b: b.reshape(N * H)),
    "bk": ("self_attn.k_proj.bias", lambda b: b.reshape(K * H)),
    "bv": ("self_attn.v_proj.bias", lambda b: b.reshape(K * H)),
    "wo": ("self_attn.o_proj.weight", lambda w: w.reshape(N * H, D).T),
    "mlp_norm": ("post_attention_layernorm.weight", lambda w: w),
    "w_gate": ("mlp.gate_proj.weight", lambda w: w.T),
    "w_up": ("mlp.up_proj.weight", lambda w: w.T),
    "w_down": ("mlp.down_proj.weight", lambda w: w.T),
  }
  layers = {k: np.asarray(v) for k, v in params["layers"].items()}
  unknown = set(layers) - set(table)
  if unknown:  # LoRA adapters must be merged first (roles.merged_params)
    raise ValueError(f"cannot export layer parameters {sorted(unknown)}")
  out = {"embed_tokens.weight": np.asarray(params["embed"])}
  for i in range(cfg.num_layers):
    for ours, (theirs, fn) in table.items():
      if ours in layers:
        out[f"layers.{i}.{theirs}"] = np.ascontiguousarray(fn(layers[ours][i]))
  out["norm.weight"] = np.asarray(params["final_norm"])
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"]).T)
  return out


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Hugging Face q/k rows -> llama.cpp's: the inverse of `loading.unpermute_qk`.

  Each head's rows [first half, second half] (rotate-half RoPE) are interleaved as
  [0, H/2, 1, H/2+1, ...] (llama.cpp rotates adjacent pairs): reshape (n, 2, H/2) -> swap.
  """
  half = w.shape[0] // n_heads // 2
  return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
  if dtype == "bfloat16":
    import ml_dtypes

    return x.astype(ml_dtypes.bfloat16)
  return x.astype(dtype)


# -- Hugging Face ----------------------------------------------------------------------------------


def hf_config(
  cfg: LlamaConfig,
  family: str,
  *,
  max_positions: int,
  bos_id: int | None,
  eos_ids: tuple[int, ...],
  pad_id: int | None,
  dtype: str = "float32",
  score_bias: float | None = None,
) -> dict:
  """config.json of `cfg` as `<Family>ForCausalLM`, or `<Family>ForSequenceClassification` with
  one label when `score_bias` is given. RoPE is written both ways transformers reads it (4.x's
  `rope_theta` / `rope_scaling`, 5.x's `rope_parameters`)."""
  if family not in FAMILIES:
    raise ValueError(f"model family {family!r}: expected one of {tuple(FAMILIES)}")
  if cfg.qkv_bias and family != "qwen2":
    raise ValueError(f"q/k/v biases are Qwen2's; a {family} checkpoint has none")
  rope = None
  if cfg.rope_scaling is not None:
    factor, low, high, original = cfg.rope_scaling
    rope = {
      "rope_type": "llama3",
      "factor": factor,
      "low_freq_factor": low,
      "high_freq_factor": high,
      "original_max_position_embeddings": original,
    }
  head = "ForCausalLM" if score_bias is None else "ForSequenceClassification"
  hf = {
    "architectures": [FAMILIES[family] + head],
    "model_type": family,
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.embed_dim,
    "intermediate_size": cfg.mlp_dim,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.num_kv_heads,
    "head_dim": cfg.head_dim,
    "hidden_act": "silu",
    "max_position_embeddings": max_positions,
    "rms_norm_eps": cfg.norm_eps,
    "rope_theta": cfg.rope_theta,
    "rope_scaling": rope,
    "rope_parameters": {"rope_type": "default", **(rope or {}), "rope_theta": cfg.rope_theta},
    "tie_word_embeddings": cfg.tie_embeddings,
    "bos_token_id": bos_id,
    "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else list(eos_ids),
    "pad_token_id": pad_id,
    "torch_dtype": dtype,
    "use_cache": True,
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
  }
  match family:
    case "llama":
      hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    case "mistral":
      hf.update(sliding_window=None)
    case "qwen2":
      hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
  if score_bias is not None:
    hf.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, score_bias=float(score_bias))
  return hf


def causal_lm_tensors(cfg: LlamaConfig, params: Params) -> dict[str, np.ndarray]:
  """`<Family>ForCausalLM`'s tensors of a `Transformer`'s parameters."""
  tensors = hf_tensors(cfg, params)
  return {k if k == "lm_head.weight" else f"model.{k}": v for k, v in tensors.items()}


def sequence_classification_tensors(
  cfg: LlamaConfig, params: Params
) -> tuple[dict[str, np.ndarray], float]:
  """`<Family>ForSequenceClassification`'s tensors (one label) of a `ScalarModel`'s parameters,
  and head_b, which goes to config.json as "score_bias" (that class's score layer has no bias)."""
  head_w, head_b = np.asarray(params["head_w"]), np.asarray(params["head_b"])
  if head_w.shape != (cfg.embed_dim, 1):
    raise ValueError(f"head_w {head_w.shape}: only a one-output head exports (num_labels=1)")
  trunk = hf_tensors(cfg, params["lm"])
  tensors = {f"model.{k}": v for k, v in trunk.items() if k != "lm_head.weight"}
  tensors["score.weight"] = np.ascontiguousarray(head_w.T)
  return tensors, float(head_b[0])


def write_safetensors(
  directory: pathlib.Path, tensors: dict[str, np.ndarray], max_shard_bytes: int = MAX_SHARD_BYTES
) -> list[str]:
  """model.safetensors, or model-0000i-of-0000n.safetensors shards of at most `max_shard_bytes`
  (a larger tensor gets a shard of its own) and model.safetensors.index.json. Returns the files."""
  from safetensors.numpy import save_file

  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, t in tensors.items():
    if shards[-1] and size + t.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = t
    size += t.nbytes
  meta = {"format": "pt"}  # transformers refuses safetensors without a known format
  if len(shards) == 1:
    save_file(shards[0], str(directory / "model.safetensors"), metadata=meta)
    return ["model.safetensors"]
  files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for file, shard in zip(files, shards, strict=True):
    save_file(shard, str(directory / file), metadata=meta)
    weight_map.update(dict.fromkeys(shard, file))
  index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}}
  index["weight_map"] = weight_map
  (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
  return [*files, "model.safetensors.index.json"]


def scoring_pad_id(tok: Tokenizer) -> int | None:
  """A pad id for sequence classification, which scores the rightmost token that is not the pad
  id: the tokenizer's pad, unless it is an EOS (SmolLM2 pads with <|im_end|>, and our scored texts
  end with the EOS), then the first special token that is neither EOS nor BOS; None if none."""
  if tok.pad_id not in tok.eos_ids:
    return tok.pad_id
  specials = sorted(tok.hf.added_tokens_decoder.items())
  bos = tok.hf.bos_token_id
  return next((i for i, t in specials if t.special and i not in tok.eos_ids and i != bos), None)


class Exportable(NamedTuple):
  """A model to write out: our config and stacked parameters (a `Transformer`'s, or a
  `ScalarModel`'s with "head_w"), its tokenizer, its family (`FAMILIES`) and context length."""

  cfg: LlamaConfig
  params: Params
  tok: Tokenizer
  family: str
  max_positions: int


def save_hf(
  directory: str | pathlib.Path,
  model: Exportable,
  *,
  dtype: str = "float32",
  max_shard_bytes: int = MAX_SHARD_BYTES,
  generation: dict | None = None,
) -> list[str]:
  """Writes a Hugging Face directory: config.json, safetensors, the tokenizer (chat template
  included) and, for a generator, generation_config.json. `params` of a `Transformer` give
  `<Family>ForCausalLM`; of a `ScalarModel` (a "head_w" key), `<Family>ForSequenceClassification`
  (score + score_bias = our logit). `generation` adds sampling defaults to generation_config.json.
  Returns the files written."""
  cfg, params, tok, family, max_positions = model
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  for old in [*directory.glob("model*.safetensors"), *directory.glob("model.safetensors.index*")]:
    old.unlink()  # a stale single file would shadow a new index (transformers reads it first)
  if "head_w" in params:
    tensors, score_bias = sequence_classification_tensors(cfg, params)
    pad = scoring_pad_id(tok)
    if pad is not None and pad != tok.pad_id:
      tok = _with_pad(tok, pad)
  else:
    tensors, score_bias, pad = causal_lm_tensors(cfg, params), None, tok.pad_id
  tensors = {k: _cast(v, dtype) for k, v in tensors.items()}
  files = write_safetensors(directory, tensors, max_shard_bytes)
  hf = hf_config(
    cfg,
    family,
    max_positions=max_positions,
    bos_id=tok.hf.bos_token_id,
    eos_ids=tok.eos_ids,
    pad_id=pad,
    dtype=dtype,
    score_bias=score_bias,
  )
  (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
  files.append("config.json")
  if score_bias is None:
    gen = {"bos_token_id": tok.hf.bos_token_id, "eos_token_id": list(tok.eos_ids)}
    gen.update(pad_token_id=pad, **(generation or {}))
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    files.append("generation_config.json")
  tok.save(directory)
  return [
    *files,
    *sorted(p.name for p in directory.iterdir() if p.name.startswith(_TOKENIZER_FILES)),
  ]


def _with_pad(tok: Tokenizer, pad: int) -> Tokenizer:
  import copy

  hf = copy.deepcopy(tok.hf)
  hf.pad_token = hf.convert_ids_to_tokens(pad)
  return Tokenizer(hf, tok.eos_ids)
