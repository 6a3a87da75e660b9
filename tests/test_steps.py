"""The RLHB train step: sharded == single device, rule shardings, one compile, NaN skip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from rlhb_jax import config as C
from rlhb_jax.infra import sharding
from rlhb_jax.methods.ppo import advantages
from rlhb_jax.methods.ppo import state as ppo_state
from rlhb_jax.methods.ppo import step as ppo_step
from rlhb_jax.model import build as build_lib
from rlhb_jax.training import trainable

V, Bp, P, Pd, Tn = 64, 8, 12, 10, 6


def small_config(mesh_shape=(1, 1, 1)) -> C.Config:
  return C.replace(
    C.Config(mode="rlhb"),
    **{
      "model.embed_dim": 32,
      "model.num_layers": 2,
      "model.num_heads": 4,
      "model.num_kv_heads": 4,
      "model.head_dim": 8,
      "model.mlp_dim": 64,
      "disc.model.embed_dim": 32,
      "disc.model.num_layers": 1,
      "disc.model.num_heads": 4,
      "disc.model.num_kv_heads": 4,
      "disc.model.head_dim": 8,
      "disc.model.mlp_dim": 64,
      "disc.bootstrap_ratio": 0.25,
      "ppo.prompts_per_step": Bp,
      "ppo.rollouts_per_prompt": 2,
      "ppo.epochs": 2,
      "ppo.minibatches": 2,
      "sampling.max_new_tokens": Tn,
      "mesh.shape": mesh_shape,
    },
  )


def make_batch(seed: int) -> dict:
  rng = np.random.default_rng(seed)

  def left(B, L):
    t = rng.integers(5, V, (B, L)).astype(np.int32)
    m = np.arange(L)[None] >= rng.integers(0, L // 2, (B, 1))
    return np.where(m, t, 0).astype(np.int32), m

  b = {}
  b["prompt"], b["prompt_mask"] = left(Bp, P)
  b["prefix"], b["prefix_mask"] = left(Bp, Pd)
  b["real_prefix"], b["real_prefix_mask"] = b["prefix"], b["prefix_mask"]
  b["swap_prefix"], b["swap_prefix_mask"] = left(Bp, Pd)
  b["contrast_prefix"], b["contrast_prefix_mask"] = left(Bp, Pd)
  b["real"] = rng.integers(5, V, (Bp, Tn)).astype(np.int32)
  b["real_mask"] = np.arange(Tn)[None] < rng.integers(2, Tn + 1, (Bp, 1))
  return b


def lora_config(mesh_shape=(1, 1, 1)) -> C.Config:
  """LoRA on actor and discriminator, critic-free group advantages."""
  return C.replace(
    small_config(mesh_shape),
    **{"lora.rank": 4, "disc.lora.rank": 2, "ppo.advantage": "group", "ppo.advantage_std": True},
  )


def build(cfg: C.Config, devices):
  return build_with_roles(cfg, devices)[:4]


def build_with_roles(cfg: C.Config, devices):
  actor, _ = build_lib.build_lm(cfg.model, V, 0)
  critic = (
    build_lib.scalar_from_lm(actor, 1, 1) if advantages.get(cfg.ppo.advantage).critic else None
  )
  disc = build_lib.build_disc(cfg, actor, V)
  # A random head (it starts at zero) so that rewards differ between samples from the first step.
  disc.head_w[...] = 0.5 * jax.random.normal(jax.random.key(7), disc.head_w[...].shape)
  build_lib.with_lora(actor, cfg.lora, 0)
  if critic is not None:
    build_lib.with_lora(critic, cfg.lora, 1)
  build_lib.with_lora(disc, cfg.disc.lora, 2)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  roles, state, ssh = ppo_state.init_state(cfg, actor, critic, disc, (1,), 0, mesh)
  bsh = trainable.batch_shardings(make_batch(0), mesh)
  with jax.set_mesh(mesh):
    state = jax.device_put(state, ssh)
    step = ppo_step.compile_train_step(roles, cfg, ssh, bsh, mesh)
  return mesh, state, step, ssh, roles


def run_steps(cfg, devices, n=2):
  mesh, state, step, _ = build(cfg, devices)
  out = []
  with jax.set_mesh(mesh):
    for i in range(n):
      state, m = step(state, make_batch(i), jax.random.key(0))
      out.append(jax.device_get(m))
  return jax.device_get(state), out, step


@pytest.fixture(scope="module")
def single():
  return run_steps(small_config(), jax.devices()[:1])


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_step_equals_single_device(single, shape):
  _check_sharded_equals_single(single, small_config(shape))


@pytest.fixture(scope="module")
def lora_single():
  return run_steps(lora_config(), jax.devices()[:1])


def test_lora_group_sharded_step_equals_single_device(lora_single):
  _check_sharded_equals_single(lora_single, lora_config((2, 2, 2)))


def test_lora_step_trains_only_adapters_and_heads(lora_single):
  cfg = lora_config()
  init = jax.device_get(build(cfg, jax.devices()[:1])[1])
  state, metrics, step = lora_single
  assert step._cache_size() == 1  # one compile across steps
  # No reference copy and no critic: the reference is the base with adapters off.
  assert init.ref == {} and init.critic == {} and "value_loss" not in metrics[0]
  for role in ("actor", "disc"):
    paths = [
      "/".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(init.__dict__[role])[0]
    ]
    assert paths and all("lora_" in p or "head_" in p for p in paths), paths
    # The base never moves ...
    for a, b in zip(
      jax.tree.leaves(init.frozen[role]), jax.tree.leaves(state.frozen[role]), strict=True
    ):
      np.testing.assert_array_equal(a, b)
    # ... while the adapters do (B starts at zero and leaves it).
    moved = jax.tree.map(
      lambda a, b: float(np.abs(a - b).max()), init.__dict__[role], state.__dict__[role]
    )
    assert max(jax.tree.leaves(moved)) > 0, role
  assert np.abs(state.actor["layers"]["lora_q_b"]).max() > 0


def _check_sharded_equals_single(single, cfg):
  assert len(jax.devices()) == 8
  ref_state, ref_metrics, _ = single
  state, metrics, _ = run_steps(cfg, jax.devices())
  for a, b in zip(jax.tree.leaves(ref_state), jax.tree.leaves(state), strict=True):
    # Adam turns tiny reduction-order differences of near-zero gradients into update-sized ones.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-4)
  for m_ref, m in zip(ref_metrics, metrics, strict=True):
    for k in m_ref:
      np.testing.assert_allclose(m_ref[k], m[k], rtol=1e-3, atol=1e-4, err_msg=k)
  # The step changed the actor (the comparison is not between two untouched states).
  init_state = build(C.replace(cfg, **{"mesh.shape": (1, 1, 1)}), jax.devices()[:1])[1]
  delta = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), init_state.actor, ref_state.actor)
  assert max(jax.tree.leaves(delta)) > 0


def test_parameters_carry_rule_shardings():
  cfg = small_config((1, 2, 4))
  mesh, state, _, ssh = build(cfg, jax.devices())
  lay = state.actor["layers"]
  assert lay["wq"].sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
  assert lay["w_down"].sharding.spec == PartitionSpec(None, "tensor", "fsdp")
  assert state.actor["embed"].sharding.spec == PartitionSpec("tensor", "fsdp")
  # Adam moments follow their parameters.
  mu = state.actor_opt.inner_state[1][0].mu["layers"]["wq"]
  assert mu.sharding.spec == lay["wq"].sharding.spec
  # FSDP-only is a rules change: the same code shards nothing over 'tensor'.
  rules = tuple((k, None if v == "tensor" else v) for k, v in cfg.mesh.rules)
  spec = sharding.logical_to_spec(
    ("layers", "embed", "heads", "head_dim"), rules, (2, 32, 4, 8), mesh
  )
  assert spec == PartitionSpec(None, "fsdp", None, None)


def test_rules_refuse_two_logical_axes_on_one_mesh_axis():
  rules = (("embed", "fsdp"), ("mlp", "fsdp"))
  with pytest.raises(ValueError, match="both map to mesh axis 'fsdp'"):
    sharding.logical_to_spec(("embed", "mlp"), rules)


def test_step_compiles_once(single):
  *_, step = single
  assert step._cache_size() == 1


def test_nan_reward_is_skipped_and_counted():
  cfg = small_config()
  mesh, state, step, _ = build(cfg, jax.devices()[:1])
  # A NaN discriminator bias makes every reward NaN: PPO and D updates must all be skipped.
  state = state.replace(disc={**state.disc, "head_b": jnp.full_like(state.disc["head_b"], jnp.nan)})
  before = jax.device_get(state.actor)
  with jax.set_mesh(mesh):
    state, m = step(state, make_batch(0), jax.random.key(0))
  per_step = cfg.ppo.epochs * cfg.ppo.minibatches + cfg.disc.updates_per_step
  assert int(m["nonfinite"]) == per_step
  assert int(m["nonfinite_run"]) == cfg.ppo.epochs * cfg.ppo.minibatches
  for a, b in zip(
    jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.actor)), strict=True
  ):
    np.testing.assert_array_equal(a, b)
  assert int(state.step) == 1


def test_disc_lead_steps_hold_the_actor_while_d_learns():
  from rlhb_jax.methods.ppo.stages import ppo_config

  base = C.replace(small_config(), **{"rlhb.steps": 4, "rlhb.disc_lead_steps": 2})
  cfg = ppo_config(base, "disc")
  assert cfg.ppo.actor_optim.delay_steps == 0  # the lead steps do not count as actor updates
  mesh, state, step, ssh, roles = build_with_roles(cfg, jax.devices()[:1])
  bsh = trainable.batch_shardings(make_batch(0), mesh)
  lead = ppo_step.compile_train_step(roles, cfg, ssh, bsh, mesh, ppo_step.lead_step)
  moved = lambda a, b: any(  # noqa: E731
    not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )
  with jax.set_mesh(mesh):
    actor0, disc0 = jax.device_get((state.actor, state.disc))
    for i in range(2):  # the lead steps: D only
      state, _ = lead(state, make_batch(i), jax.random.key(i))
    actor1, disc1 = jax.device_get((state.actor, state.disc))
    assert not moved(actor0, actor1) and moved(disc0, disc1)
    state, _ = step(state, make_batch(2), jax.random.key(2))
    assert moved(actor1, jax.device_get(state.actor))  # then the actor follows at once
  with pytest.raises(ValueError, match="disc_lead_steps"):
    C.replace(small_config(), **{"rlhb.steps": 4, "rlhb.disc_lead_steps": 4})


def test_lead_step_trains_d_as_the_full_step_does_and_leaves_the_actor():
  """A D-only lead step (rlhb.disc_lead_steps) makes the full step's rollouts, rewards and D
  update, and touches neither the actor nor its optimizer."""
  from rlhb_jax.methods.ppo.stages import lead_steps, ppo_config

  base = C.replace(lora_config(), **{"rlhb.steps": 4, "rlhb.disc_lead_steps": 2})
  cfg = ppo_config(base, "disc")
  assert lead_steps(cfg) == 2 and lead_steps(ppo_config(base, "rm")) == 0
  mesh, state, step, ssh, roles = build_with_roles(cfg, jax.devices()[:1])
  bsh = trainable.batch_shardings(make_batch(0), mesh)
  lead = ppo_step.compile_train_step(roles, cfg, ssh, bsh, mesh, ppo_step.lead_step)
  with jax.set_mesh(mesh):
    before = jax.device_get(state)
    copy = jax.device_put(jax.tree.map(np.copy, before), ssh)
    led, lm = lead(copy, make_batch(0), jax.random.key(3))
    full, fm = step(state, make_batch(0), jax.random.key(3))
  led, full = jax.device_get((led, full))
  for a, b in zip(
    jax.tree.leaves((before.actor, before.actor_opt)),
    jax.tree.leaves((led.actor, led.actor_opt)),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  # D's update (its warm-up's first has learning rate 0, so its moments are what moved).
  d = lambda st: jax.tree.leaves((st.disc, st.disc_opt))  # noqa: E731
  for a, b in zip(d(led), d(full), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert any(not np.array_equal(a, b) for a, b in zip(d(before), d(led), strict=True))
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(before.actor), jax.tree.leaves(full.actor), strict=True)
  )
  for k in ("reward_mean", "d_real", "d_fake", "disc_loss", "response_length"):
    np.testing.assert_allclose(float(lm[k]), float(fm[k]), rtol=1e-6, err_msg=k)
  assert int(led.step) == 1 and "policy_loss" not in lm


def test_fused_old_logprobs_update_equals_the_separate_forward(monkeypatch):
  """With one epoch of one minibatch, PPO's old log-probs from the update's own forward (f32
  decoding of a bf16-trained actor) give the update of the separate recompute."""
  changes = {
    "model.matmul_dtype": "bfloat16",
    "disc.model.matmul_dtype": "bfloat16",
    "ppo.epochs": 1,
    "ppo.minibatches": 1,
  }
  cfg = C.replace(lora_config(), **changes)
  assert ppo_step.fused_old_logprobs(cfg)
  fused = run_steps(cfg, jax.devices()[:1])
  monkeypatch.setattr(ppo_step, "fused_old_logprobs", lambda cfg: False)
  separate = run_steps(cfg, jax.devices()[:1])
  for a, b in zip(jax.tree.leaves(fused[0].actor), jax.tree.leaves(separate[0].actor), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for mf, ms in zip(fused[1], separate[1], strict=True):
    for k in ("kl", "kl_seq", "return_mean", "policy_loss", "approx_kl", "reward_mean"):
      np.testing.assert_allclose(mf[k], ms[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert float(mf["approx_kl"]) == 0.0 and abs(float(ms["approx_kl"])) < 1e-6  # ratio 1


def test_fused_disc_scoring_equals_a_scoring_pass_of_its_own(monkeypatch):
  """D's rewards read off its own update's forward (same pre-update weights) equal a separate
  scoring pass: the same rewards, D update and actor update, to rounding."""
  changes = {"ppo.reward_contrast": False, "disc.updates_per_step": 1, "disc.bootstrap_ratio": 0.25}
  cfg = C.replace(lora_config(), **changes)
  assert ppo_step.fused_disc_scoring(cfg)
  assert not ppo_step.fused_disc_scoring(C.replace(cfg, **{"ppo.reward_contrast": True}))
  fused = run_steps(cfg, jax.devices()[:1])
  monkeypatch.setattr(ppo_step, "fused_disc_scoring", lambda cfg: False)
  separate = run_steps(cfg, jax.devices()[:1])
  for role in ("disc", "disc_opt", "actor"):
    a, b = getattr(fused[0], role), getattr(separate[0], role)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-6, err_msg=role)
  for mf, ms in zip(fused[1], separate[1], strict=True):
    for k in ("reward_mean", "d_fake_rollout", "disc_loss", "d_real", "d_fake", "kl"):
      np.testing.assert_allclose(mf[k], ms[k], rtol=1e-4, atol=1e-6, err_msg=k)
