"""Logit parity with transformers' PyTorch models: tiny random checkpoints, a GGUF, real SmolLM2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from parity import assert_f32_parity, hf_reference

from rlhb_jax.model import gguf_file, loading
from rlhb_jax.model.config import ModelSpec, SamplingConfig
from rlhb_jax.model.llama import positions_from_mask

TINY = dict(
  vocab_size=97,
  hidden_size=48,
  intermediate_size=80,
  num_hidden_layers=3,
  num_attention_heads=6,
  num_key_value_heads=2,
  max_position_embeddings=64,
  attn_implementation="eager",
)
LLAMA3_ROPE = {
  "rope_type": "llama3",
  "rope_theta": 50000.0,
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 8,
}
CASES = {
  "llama": (transformers.LlamaConfig, dict(tie_word_embeddings=False)),
  "llama_tied_llama3_rope": (
    transformers.LlamaConfig,
    dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
  ),
  "qwen2_bias": (transformers.Qwen2Config, dict(tie_word_embeddings=True, rope_theta=1e6)),
  "qwen2_untied": (transformers.Qwen2Config, dict(tie_word_embeddings=False)),
  "mistral": (transformers.MistralConfig, dict(head_dim=12, rms_norm_eps=1e-5)),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
  """Every parameter random (biases and norms included), so a mis-mapped tensor shows."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.2 * noise)


def _left_padded_batch(rng: np.random.Generator, vocab: int, lengths: list[int], pad: int = 0):
  T = max(lengths)
  tokens = np.full((len(lengths), T), pad, np.int32)
  mask = np.zeros((len(lengths), T), bool)
  for i, n in enumerate(lengths):
    tokens[i, T - n :] = rng.integers(1, vocab, n)
    mask[i, T - n :] = True
  return tokens, mask


def _hf_logits(tokens: np.ndarray, mask: np.ndarray):
  """transformers' forward on a left-padded batch, with our positions."""
  positions = torch.tensor(np.asarray(positions_from_mask(jnp.asarray(mask)))).long()

  def forward(model):
    return model(
      input_ids=torch.from_numpy(tokens).long(),
      attention_mask=torch.from_numpy(mask).long(),
      position_ids=positions,
    ).logits

  return forward


def _our_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  mask_j = jnp.asarray(mask)
  logits, _ = model(jnp.asarray(tokens), positions_from_mask(mask_j), mask_j)
  return np.asarray(logits)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_dir_logits_match_transformers(case, tmp_path):
  config_cls, overrides = CASES[case]
  torch.manual_seed(0)
  ref = transformers.AutoModelForCausalLM.from_config(config_cls(**TINY, **overrides)).eval()
  _randomize(ref, seed=1)
  ref.save_pretrained(tmp_path)

  cfg, params = loading.load_hf_dir(tmp_path)
  assert cfg.tie_embeddings == overrides.get("tie_word_embeddings", False)
  assert cfg.qkv_bias == case.startswith("qwen2")
  assert (cfg.rope_scaling is not None) == ("llama3" in case)
  model = loading.build_transformer(cfg, params)

  tokens, mask = _left_padded_batch(np.random.default_rng(0), TINY["vocab_size"], [20, 13, 5, 1])
  ours, theirs = _our_logits(model, tokens, mask), hf_reference(ref, _hf_logits(tokens, mask), mask)
  assert np.abs(theirs.exact[mask]).max() > 1.0  # the comparison is not between near-zero numbers
  assert_f32_parity(ours, theirs, mask)


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
  config = transformers.LlamaConfig(**TINY)
  ref = transformers.AutoModelForCausalLM.from_config(config).eval()
  _randomize(ref, seed=2)
  ref.save_pretrained(tmp_path / "one")
  ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  _, a = loading.load_hf_dir(tmp_path / "one")
  _, b = loading.load_hf_dir(tmp_path / "sharded")
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """What llama.cpp's converter does to q/k rows (rotate-half -> interleaved pairs)."""
  return (
    w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


def _write_gguf(path, hf_model, cfg: transformers.LlamaConfig) -> None:
  """A float32 GGUF of a Hugging Face Llama, laid out the way llama.cpp's converter writes it."""
  import gguf

  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  names = {v: k for k, v in gguf_file.LAYER_NAMES.items()}
  for name, p in hf_model.state_dict().items():
    arr = p.float().numpy()
    if name.startswith("model.layers."):
      _, _, i, rest = name.split(".", 3)
      gguf_name = f"blk.{i}.{names[rest]}"
      if rest == "self_attn.q_proj.weight":
        arr = _llama_cpp_permute(arr, cfg.num_attention_heads)
      elif rest == "self_attn.k_proj.weight":
        arr = _llama_cpp_permute(arr, cfg.num_key_value_heads)
    else:
      gguf_name = {v: k for k, v in gguf_file.GLOBAL_NAMES.items()}[name.removeprefix("model.")]
    w.add_tensor(gguf_name, np.ascontiguousarray(arr))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_gguf_logits_match_transformers(tmp_path):
  config = transformers.LlamaConfig(**TINY, tie_word_embeddings=False, rms_norm_eps=1e-5)
  ref = transformers.AutoModelForCausalLM.from_config(config).eval()
  _randomize(ref, seed=3)
  _write_gguf(tmp_path / "tiny.gguf", ref, config)

  cfg, params = loading.load_gguf(tmp_path / "tiny.gguf")
  assert not cfg.tie_embeddings and cfg.num_kv_heads == 2
  model = loading.build_transformer(cfg, params)
  tokens, mask = _left_padded_batch(np.random.default_rng(1), TINY["vocab_size"], [16, 9, 2])
  ours, theirs = _our_logits(model, tokens, mask), hf_reference(ref, _hf_logits(tokens, mask), mask)
  assert_f32_parity(ours, theirs, mask)


def _corrupted(model, how: str):
  """`model` with one wrong weight in its middle layer, as a bad loader or exporter would make."""
  params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  layers = params["layers"]
  mid = model.cfg.num_layers // 2
  if how == "swap_rows":  # q_proj's output rows 0 and 1 of head 0, swapped
    wq = np.array(layers["wq"])
    wq[mid, :, 0, [0, 1]] = wq[mid, :, 0, [1, 0]]
    layers["wq"] = wq
  else:  # one matrix (down_proj) scaled by 1.01
    w_down = np.array(layers["w_down"])
    w_down[mid] *= 1.01
    layers["w_down"] = w_down
  return loading.build_transformer(model.cfg, params)


@pytest.mark.parametrize("how", ["swap_rows", "scale_1.01"])
def test_parity_check_fails_on_wrong_weights(how, tmp_path):
  """The float32 parity check (tests/parity.py) that every test against transformers uses passes
  on the right weights and fails on one wrong weight: here on a tiny model; on SmolLM2 below."""
  ref = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY)).eval()
  _randomize(ref, seed=4)
  ref.save_pretrained(tmp_path)
  model = loading.build_transformer(*loading.load_hf_dir(tmp_path))
  tokens, mask = _left_padded_batch(np.random.default_rng(2), TINY["vocab_size"], [18, 7, 3])
  theirs = hf_reference(ref, _hf_logits(tokens, mask), mask)
  assert_f32_parity(_our_logits(model, tokens, mask), theirs, mask)
  with pytest.raises(AssertionError, match="not float32 parity"):
    assert_f32_parity(_our_logits(_corrupted(model, how), tokens, mask), theirs, mask)


# -- SmolLM2-135M-Instruct, the built-in model -----------------------------------------------------

PROMPTS = [
  "What is the capital of France?",
  "Write a haiku about the sea.",
  "Explain in one sentence why the sky is blue.",
  "hi",
]


@pytest.fixture(scope="module")
def smollm2():
  """(our model, our tokenizer, transformers' model, transformers' tokenizer), loaded once."""
  path = loading.builtin_smollm2_path()
  ours, tok = loading.load_model(ModelSpec(source="smollm2-135m-instruct"))
  kw = dict(gguf_file=path.name)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
    str(path.parent), dtype=torch.float32, **kw
  )
  ref_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kw)
  return ours, tok, ref.eval(), ref_tok


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
  ours, tok, ref, _ = smollm2
  prompts = [tok.chat_prompt(p) for p in PROMPTS]
  T = max(map(len, prompts))
  tokens = np.full((len(prompts), T), tok.pad_id, np.int32)
  mask = np.zeros((len(prompts), T), bool)
  for i, p in enumerate(prompts):
    tokens[i, T - len(p) :], mask[i, T - len(p) :] = p, True
  batched = _our_logits(ours, tokens, mask)  # left-padded batch
  for i, p in enumerate(prompts):
    theirs = hf_reference(ref, lambda m, p=p: m(input_ids=torch.tensor([p])).logits[0])  # unpadded
    mine = batched[i][mask[i]]
    assert_f32_parity(mine, theirs)
    np.testing.assert_array_equal(mine.argmax(-1), theirs.exact.argmax(-1))


@pytest.mark.slow
def test_smollm2_parity_check_fails_on_wrong_weights(smollm2):
  """On SmolLM2's 30 layers too, float32 rounding passes and one wrong weight fails."""
  ours, tok, ref, _ = smollm2
  prompts = [tok.chat_prompt(p) for p in PROMPTS[:2]]
  tokens, mask = _left_padded_batch(np.random.default_rng(0), 2, [len(p) for p in prompts])
  for i, p in enumerate(prompts):
    tokens[i, mask[i]] = p
  theirs = hf_reference(ref, _hf_logits(tokens, mask), mask)
  assert_f32_parity(_our_logits(ours, tokens, mask), theirs, mask)
  for how in ("swap_rows", "scale_1.01"):
    with pytest.raises(AssertionError, match="not float32 parity"):
      assert_f32_parity(_our_logits(_corrupted(ours, how), tokens, mask), theirs, mask)


@pytest.mark.slow
def test_smollm2_greedy_generation_matches_transformers(smollm2):
  from rlhb_jax.data import batches
  from rlhb_jax.model import sampling

  ours, tok, ref, _ = smollm2
  prompts = [tok.chat_prompt(p) for p in PROMPTS]
  cfg = SamplingConfig(max_new_tokens=32, greedy=True)
  tokens, mask = batches.pad_prompts(prompts, cfg.prompt_buckets, tok.pad_id)
  out = sampling.sample(
    ours, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0), cfg, tok.eos_ids, tok.pad_id
  )
  lengths = []
  for i, p in enumerate(prompts):
    with torch.no_grad():
      gen = ref.generate(
        torch.tensor([p]),
        attention_mask=torch.ones(1, len(p), dtype=torch.long),
        max_new_tokens=32,
        do_sample=False,
        eos_token_id=list(tok.eos_ids),
        pad_token_id=tok.pad_id,
      )
    theirs = gen[0, len(p) :].tolist()
    mine = np.asarray(out.tokens[i])[np.asarray(out.mask[i])].tolist()
    assert mine == theirs, (PROMPTS[i], tok.decode(mine), tok.decode(theirs))
    lengths.append(len(mine))
  assert max(lengths) == 32 and min(lengths) >= 5  # real answers, not an immediate EOS


@pytest.mark.slow
def test_smollm2_chat_prompt_matches_transformers(smollm2):
  ours, tok, _, ref_tok = smollm2
  for text in [*PROMPTS, "Ünïcödé, emoji 😀 and  double  spaces\nnew line.", ""]:
    message = [{"role": "user", "content": text}]
    theirs = ref_tok.apply_chat_template(
      message, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert tok.chat_prompt(text) == list(theirs), text
    # config.prompt.system replaces the template's ~20-token default system message.
    system = [{"role": "system", "content": "Answer briefly."}, *message]
    theirs = ref_tok.apply_chat_template(
      system, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert tok.chat_prompt(text, "Answer briefly.") == list(theirs), text
    assert len(theirs) < len(tok.chat_prompt(text)) - 10
    assert tok.encode(text) == ref_tok.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == text
  assert tok.eos_ids == (ref_tok.eos_token_id,)
  assert tok.vocab_size == len(ref_tok) == ours.cfg.vocab_size


@pytest.mark.slow
def test_smollm2_digits_split_one_by_one(smollm2):
  """llama.cpp's "smollm" pre-tokenizer (and SmolLM2's tokenizer.json) split digits individually.

  transformers' GGUF tokenizer does not (it keeps GPT-2's split), so this is checked on its own.
  """
  _, tok, _, _ = smollm2
  ids = tok.encode("in 2024")
  assert [tok.decode([i]) for i in ids] == ["in", " ", "2", "0", "2", "4"]
