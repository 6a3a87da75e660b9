"""GGUF files: the tensor names llama.cpp gives our models (read by `loading.py`), and writing a
`Transformer` as llama.cpp's converter would (q/k rows permuted for the llama architecture, the
byte-level BPE vocabulary and chat template in the metadata). NumPy and the `gguf` package only.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from rlhb_jax.data import tokenization
from rlhb_jax.data.tokenization import Tokenizer
from rlhb_jax.model.export import Exportable, Params, hf_tensors, permute_qk
from rlhb_jax.model.llama import LlamaConfig

READ_ARCHS = ("llama", "qwen2")  # the GGUF architectures `loading.py` reads
# llama.cpp runs Mistral as llama (no sliding window in either of our models).
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # our family -> GGUF architecture
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5  # llama.cpp token types

LAYER_NAMES = {  # GGUF per-layer tensor -> Hugging Face per-layer tensor
  "attn_norm.weight": "input_layernorm.weight",
  "attn_q.weight": "self_attn.q_proj.weight",
  "attn_k.weight": "self_attn.k_proj.weight",
  "attn_v.weight": "self_attn.v_proj.weight",
  "attn_q.bias": "self_attn.q_proj.bias",
  "attn_k.bias": "self_attn.k_proj.bias",
  "attn_v.bias": "self_attn.v_proj.bias",
  "attn_output.weight": "self_attn.o_proj.weight",
  "ffn_norm.weight": "post_attention_layernorm.weight",
  "ffn_gate.weight": "mlp.gate_proj.weight",
  "ffn_up.weight": "mlp.up_proj.weight",
  "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {
  "token_embd.weight": "embed_tokens.weight",
  "output_norm.weight": "norm.weight",
  "output.weight": "lm_head.weight",
}
_TO_GGUF_LAYER = {hf: gg for gg, hf in LAYER_NAMES.items()}
_TO_GGUF_GLOBAL = {hf: gg for gg, hf in GLOBAL_NAMES.items()}


def gguf_tensors(cfg: LlamaConfig, params: Params, family: str) -> dict[str, np.ndarray]:
  """GGUF tensors (NumPy order, as Hugging Face's) of a `Transformer`'s parameters, q/k rows
  permuted for the llama architecture (llama.cpp rotates adjacent pairs there, not for qwen2)."""
  permute = ARCH[family] == "llama"
  out = {}
  for name, w in hf_tensors(cfg, params).items():
    if name.startswith("layers."):
      _, i, rest = name.split(".", 2)
      if permute and rest.startswith("self_attn.q_proj."):
        w = permute_qk(w, cfg.num_heads)
      elif permute and rest.startswith("self_attn.k_proj."):
        w = permute_qk(w, cfg.num_kv_heads)
      out[f"blk.{i}.{_TO_GGUF_LAYER[rest]}"] = np.ascontiguousarray(w)
    else:
      out[_TO_GGUF_GLOBAL[name]] = w
  return out


def gguf_vocab(tok: Tokenizer, vocab_size: int) -> dict[str, Any]:
  """llama.cpp's tokenizer metadata of a byte-level BPE tokenizer: tokens (`vocab_size` of them,
  the model's rows), token types, merges and the pre-tokenizer's name."""
  spec = json.loads(tok.hf.backend_tokenizer.to_str())
  model = spec["model"]
  if model["type"] != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
    raise NotImplementedError("GGUF export supports byte-level BPE tokenizers only")
  tokens: list[str | None] = [None] * vocab_size
  types = [_NORMAL] * vocab_size
  for text, i in model["vocab"].items():
    if i < vocab_size:
      tokens[i] = text
  for added in spec["added_tokens"]:
    i = added["id"]
    if i >= vocab_size:
      raise ValueError(f"token {added['content']!r} (id {i}) is beyond the model's {vocab_size}")
    tokens[i] = added["content"]
    types[i] = _CONTROL if added["special"] else _USER_DEFINED
  for i, t in enumerate(tokens):
    if t is None:  # rows the model has and the tokenizer never produces
      tokens[i], types[i] = f"[PAD{i}]", _UNUSED
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  return {"tokens": tokens, "types": types, "merges": merges, "pre": _gguf_pre(spec)}


def _gguf_pre(spec: dict) -> str:
  """llama.cpp's name for the tokenizer's pre-tokenizer (what `Tokenizer.from_gguf` reads back)."""
  pre = spec.get("pre_tokenizer") or {}
  parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
  kinds = [p.get("type") for p in parts]
  if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
    return "gpt2"
  if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
    return "smollm"
  if kinds == ["Split", "ByteLevel"]:
    regex = parts[0].get("pattern", {}).get("Regex")
    for name in ("llama-bpe", "qwen2"):
      if regex == tokenization._SPLITS[name]:
        return name
  raise NotImplementedError(f"pre-tokenizer {kinds} has no llama.cpp name known here")


def save_gguf(
  path: str | pathlib.Path,
  model: Exportable,
  *,
  dtype: str = "float32",
  name: str = "",
) -> None:
  """A GGUF file of a `Transformer` as llama.cpp's converter writes it: f32, or f16 matrices with
  f32 norms and biases (llama.cpp's "mostly F16"); tokenizer and chat template in the metadata."""
  import gguf

  cfg, params, tok, family, max_positions = model

  if dtype not in ("float32", "float16"):
    raise ValueError(f"GGUF export writes float32 or float16, not {dtype!r}")
  if cfg.rope_scaling is not None:
    raise NotImplementedError(
      "GGUF export of Llama-3 RoPE scaling (llama.cpp's rope_freqs tensor) is not supported: "
      "export format=hf and convert it with llama.cpp's convert_hf_to_gguf.py"
    )
  if cfg.qkv_bias and family != "qwen2":
    raise ValueError(f"q/k/v biases are Qwen2's; a {family} checkpoint has none")
  vocab = gguf_vocab(tok, cfg.vocab_size)
  arch = ARCH[family]
  w = gguf.GGUFWriter(str(path), arch)
  w.add_name(name or family)
  f16 = dtype == "float16"
  w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
  w.add_context_length(max_positions)
  w.add_embedding_length(cfg.embed_dim)
  w.add_block_count(cfg.num_layers)
  w.add_feed_forward_length(cfg.mlp_dim)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(vocab["pre"])
  w.add_token_list(vocab["tokens"])
  w.add_token_types(vocab["types"])
  w.add_token_merges(vocab["merges"])
  hf = tok.hf
  if hf.bos_token_id is not None:
    w.add_bos_token_id(hf.bos_token_id)
  w.add_eos_token_id(tok.eos_ids[0])
  if len(tok.eos_ids) > 1:  # llama.cpp's end of turn (Llama 3's <|eot_id|> beside <|end_of_text|>)
    w.add_eot_token_id(tok.eos_ids[1])
  if hf.unk_token_id is not None:
    w.add_unk_token_id(hf.unk_token_id)
  w.add_pad_token_id(tok.pad_id)
  w.add_add_bos_token(False)  # our prompts carry their specials (chat template); encode adds none
  w.add_add_eos_token(False)
  if hf.chat_template:
    w.add_chat_template(hf.chat_template)
  for tensor_name, t in gguf_tensors(cfg, params, family).items():
    t = np.asarray(t, np.float32)
    if f16 and t.ndim > 1:
      t = t.astype(np.float16)
    w.add_tensor(tensor_name, t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
