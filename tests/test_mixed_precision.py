"""bfloat16 matmuls with float32 accumulation (model.matmul_dtype, model.dtype) against float32,
and float32 decoding of a bfloat16-trained generator (sampling.dtype)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhb_jax import config as C
from rlhb_jax.model import lora
from rlhb_jax.model.config import SamplingConfig
from rlhb_jax.model.llama import LlamaConfig, Transformer, positions_from_mask
from rlhb_jax.model.sampling import decode_dtype, sample_jit

CFG = LlamaConfig(
  vocab_size=96, embed_dim=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128
)


def _batch(seed=0, B=4, T=20):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, CFG.vocab_size, (B, T)).astype(np.int32)
  mask = np.arange(T)[None] >= rng.integers(0, T // 3, (B, 1))  # left padding
  return jnp.asarray(np.where(mask, tokens, 0)), jnp.asarray(mask)


def _loss_and_grads(dtype: str, matmul_dtype: str, params):
  """Next-token cross entropy over the real tokens, and its gradients, with activations in `dtype`
  and matmul operands in `matmul_dtype`."""
  cfg = dataclasses.replace(CFG, dtype=dtype, matmul_dtype=matmul_dtype)
  graphdef, _ = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  tokens, mask = _batch()

  def loss_fn(p):
    model = nnx.merge(graphdef, p)
    logits, _ = model(tokens, positions_from_mask(mask), mask)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    m = (mask[:, 1:] & mask[:, :-1]).astype(jnp.float32)
    return jnp.sum(nll * m) / jnp.sum(m)

  return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.mark.parametrize(
  "dtype, matmul_dtype", [("float32", "bfloat16"), ("bfloat16", "")], ids=["matmuls", "all"]
)
def test_bf16_loss_and_gradients_are_within_tolerance_of_f32(dtype, matmul_dtype):
  """Same float32 master weights, same batch: with bf16 matmuls (float32 activations, the CPU
  demo's mix) or bf16 activations too, the loss is within 1 % and every gradient within 5 %
  (relative L2) of float32's; the gradients and weights stay float32."""
  _, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
  loss32, g32 = _loss_and_grads("float32", "", params)
  loss16, g16 = _loss_and_grads(dtype, matmul_dtype, params)
  assert loss16 != loss32  # bf16 really ran
  assert abs(float(loss16) - float(loss32)) <= 1e-2 * float(loss32)
  for (path, a), b in zip(jax.tree.leaves_with_path(g32), jax.tree.leaves(g16), strict=True):
    assert b.dtype == jnp.float32, path
    rel = float(jnp.linalg.norm(b - a) / jnp.linalg.norm(a))
    assert rel < 5e-2, (jax.tree_util.keystr(path), rel)


def test_bf16_matmul_accumulates_in_f32():
  """4096 positive products: summed in float32 and rounded once, the result is within one bf16
  rounding of the exact sum; a bf16 accumulator would stall far below it."""
  rng = np.random.default_rng(0)
  x = rng.uniform(0.5, 1.0, (2, 4096)).astype(np.float32)
  w = rng.uniform(0.5, 1.0, (4096, 3)).astype(np.float32)
  xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  exact = np.asarray(xb, np.float64) @ np.asarray(wb, np.float64)
  out = lora.dot("ti,io->to", xb, wb)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float64), exact, rtol=2**-8)
  # What bf16 accumulation would give (sequential sum, rounded at every add), far from exact:
  acc = np.zeros((2, 3), np.float32)
  prods = np.asarray(xb, np.float32)[:, :, None] * np.asarray(wb, np.float32)[None]
  for i in range(4096):
    acc = np.asarray(jnp.asarray(acc + prods[:, i], jnp.bfloat16), np.float32)
  assert np.max(np.abs(acc - exact) / exact) > 0.05


def test_mixed_dot_gradients_take_bf16_operands_summed_in_f32():
  """The custom backward of a bf16 matmul: dx = g W^T and dW = x^T g from bf16-rounded operands
  summed in float32, equal to float64 arithmetic on those operands up to float32 rounding."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 5, 64)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(64, 48)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(2, 5, 48)), jnp.float32)
  f = lambda x, w: jnp.sum(lora.dot("btd,df->btf", x, w, "bfloat16") * g)
  dx, dw = jax.grad(f, argnums=(0, 1))(x, w)
  assert dx.dtype == dw.dtype == jnp.float32
  r = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)
  np.testing.assert_allclose(dx, np.einsum("btf,df->btd", r(g), r(w)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, np.einsum("btd,btf->df", r(x), r(g)), rtol=1e-5, atol=1e-4)
  exact = np.einsum("btf,df->btd", np.asarray(g, np.float64), np.asarray(w, np.float64))
  assert np.max(np.abs(np.asarray(dx) - exact)) > 1e-3  # the operands really were rounded


def _sample(model_dtype: str, sampling_dtype: str, greedy=True, matmul_dtype=""):
  cfg = dataclasses.replace(CFG, dtype=model_dtype, matmul_dtype=matmul_dtype)
  model = Transformer(cfg, rngs=nnx.Rngs(1))
  graphdef, params = nnx.split(model)
  tokens, mask = _batch(1)
  cfg = SamplingConfig(max_new_tokens=12, greedy=greedy, dtype=sampling_dtype)
  return sample_jit(graphdef, params, tokens, mask, jax.random.key(3), cfg=cfg, eos_ids=(1,))


def test_f32_decoding_of_a_bf16_model_is_the_f32_model_s():
  """A generator trained in bf16 decodes in float32 on the CPU: the same tokens and log-probs,
  bit for bit, as the float32 model; decoding in bf16 changes the log-probs."""
  ref = _sample("float32", "float32")
  for dtype, matmul_dtype in (("bfloat16", ""), ("float32", "bfloat16")):
    out = _sample(dtype, "float32", matmul_dtype=matmul_dtype)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.logprobs, ref.logprobs)
    as_trained = _sample(dtype, "model", matmul_dtype=matmul_dtype)
    assert not np.array_equal(as_trained.logprobs, ref.logprobs)
  assert decode_dtype(SamplingConfig()) == ("float32" if jax.default_backend() == "cpu" else None)


@pytest.mark.slow
def test_bf16_ppo_step_compiles_once_with_old_logprobs_from_the_training_forward():
  """The RLHB step with bf16 matmuls in every role and float32 decoding: one compile across steps,
  finite metrics, float32 master weights; and PPO's old log-probs are the bf16 training forward's
  (the first ratio is 1), not the float32 sampler's, which differ from them."""
  from rlhb_jax.methods.ppo import state as ppo_state
  from rlhb_jax.methods.ppo import step as ppo_step
  from rlhb_jax.training.forward import policy_logits, token_logprobs
  from tests.test_steps import build_with_roles, make_batch, small_config

  changes = {
    "model.matmul_dtype": "bfloat16",
    "disc.model.matmul_dtype": "bfloat16",
    "sampling.greedy": True,
  }
  cfg = C.replace(small_config(), **changes)
  mesh, state, step, _, roles = build_with_roles(cfg, jax.devices()[:1])
  with jax.set_mesh(mesh):

    @jax.jit
    def old_and_sampled(state, batch, rng):
      ro = ppo_step.rollout(roles, ppo_state.full(state, "actor"), batch, rng, cfg)
      exp, _ = ppo_step.make_experience(roles, state, ro, jnp.zeros(ro.tokens.shape[0]), cfg)
      logits = policy_logits(roles.actor, ppo_state.full(state, "actor"), *ro[:4])
      train = token_logprobs(logits, ro.tokens) * ro.mask
      return exp.old_logprobs, ro.logprobs, train

    old, sampled, train = old_and_sampled(state, make_batch(0), jax.random.key(0))
    np.testing.assert_allclose(old, train, atol=1e-6)
    assert float(jnp.max(jnp.abs(sampled - train))) > 1e-3  # what the ratio would be off by
    for i in range(2):
      state, m = step(state, make_batch(i), jax.random.key(0))
      assert all(np.isfinite(v) for v in jax.tree.leaves(jax.device_get(m)))
  assert step._cache_size() == 1
  assert jax.tree.leaves(state.actor)[0].dtype == jnp.float32  # float32 master weights


def test_auto_matmul_dtype_follows_the_cpu(monkeypatch):
  """model.matmul_dtype="auto": bf16 operands on CPUs with AMX-BF16 or AVX-512 BF16, else the
  activations' dtype; the sampler's "does it decode as trained" check sees the resolved value."""
  from rlhb_jax.model import precision
  from rlhb_jax.model.config import ModelSpec, SamplingConfig
  from rlhb_jax.model.sampling import decodes_as_trained

  assert jax.default_backend() == "cpu"
  for flags, want in (
    ({"avx2", "amx_bf16"}, "bfloat16"),
    ({"avx512_bf16"}, "bfloat16"),
    ({"avx2"}, ""),
  ):
    precision.native_bf16.cache_clear()
    monkeypatch.setattr(precision, "cpu_flags", lambda flags=flags: frozenset(flags))
    assert precision.matmul_dtype("auto") == want
    assert precision.matmul_dtype("float32") == "float32"
    spec = ModelSpec(matmul_dtype="auto")
    assert decodes_as_trained(SamplingConfig(dtype="float32"), spec) == (want == "")
  precision.native_bf16.cache_clear()
  with pytest.raises(ValueError, match="matmul_dtype"):
    ModelSpec(matmul_dtype="bf16")
