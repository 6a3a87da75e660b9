"""mode=compile's RLHB step, compiled ahead of time for a TPU v5e-8 topology by libtpu's compiler
(no TPU attached): 8-way FSDP puts about 1/8 of the state on each chip, and the HLO gathers the
weights as the rules table implies.

The compile runs in a subprocess, so this process stays on the CPU backend; without libtpu (it
comes with requirements-dev.txt) the test is skipped and says why.
"""

import importlib.util
import json
import subprocess
import sys

import pytest
from test_pipeline import ROOT, env

pytestmark = pytest.mark.slow

# A model whose sharded dimensions fill the TPU's (8, 128) tiles, so layout padding stays small.
SCRIPT = """
import json, sys
import jax, numpy as np
from rlhb_jax import config as config_lib
from rlhb_jax.infra import compiled, sharding
from rlhb_jax.jobs import compile as aot

cd = config_lib.load_configdict("configs/tiny.py")
for k, v in dict(embed_dim=1024, num_layers=1, num_heads=8, num_kv_heads=8, head_dim=128,
                 mlp_dim=1024, vocab_size=1024).items():
  cd.model[k] = v
cd.mesh.shape = (1, 8, 1)
cd.mesh.rules = tuple((k, None if k == sys.argv[1] else v) for k, v in cd.mesh.rules)
cd.ppo.advantage = "group"
cd.ppo.prompts_per_step, cd.ppo.rollouts_per_prompt = 8, 2
cd.sampling.max_new_tokens = 4
cd.compile.prompt_len = 16
cfg = aot.on_accelerator(config_lib.from_configdict(cd))
devices = aot.topology_devices("v5e:2x4")
mesh = sharding.make_mesh(cfg.mesh, devices)
traced = aot.traced_steps(cfg, mesh, ("rlhb",))["rlhb"]
exe = traced.lower().compile()
stats = compiled.step_stats(traced, exe, 8, compiled.CHIPS[devices[0].device_kind], 0.4)
state, state_sh = traced.args_info[0][0], exe.input_shardings[0][0]
nbytes = lambda shape, dtype: int(np.prod(shape)) * np.dtype(dtype).itemsize
pairs = list(zip(jax.tree.leaves(state), jax.tree.leaves(state_sh), strict=True))
print(json.dumps({
  "kind": devices[0].device_kind,
  "stats": stats,
  "state_bytes": sum(nbytes(x.shape, x.dtype) for x, _ in pairs),
  "state_shard_bytes": sum(nbytes(s.shard_shape(x.shape), x.dtype) for x, s in pairs),
  "actor_bytes": sum(nbytes(x.shape, x.dtype) for x in jax.tree.leaves(state.actor)),
}))
"""


def compile_rlhb(replicate: str = "") -> dict:
  """The compiled RLHB step's figures, with logical axis `replicate` mapped to no mesh axis."""
  out = subprocess.run(
    [sys.executable, "-c", SCRIPT, replicate],
    capture_output=True,
    text=True,
    env=env(),
    cwd=ROOT,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu is not installed (requirements-dev.txt brings it): no TPU compiler",
)
def test_rlhb_step_compiles_for_v5e_8_with_fsdp():
  r = compile_rlhb()
  s = r["stats"]
  assert r["kind"] == "TPU v5 lite"
  # 8-way FSDP: each chip holds its 1/8 of every sharded leaf plus the replicated ones (norms,
  # scalars); the arguments add the batch and the key, and the TPU layout pads a little.
  assert r["state_shard_bytes"] < 0.15 * r["state_bytes"]
  assert s["argument_bytes"] <= 1.25 * r["state_shard_bytes"] + 2**20
  assert s["alias_bytes"] >= 0.9 * r["state_shard_bytes"]  # the state is donated
  # FSDP gathers the weights for the matmuls (all-gathers, or on a TPU loops of
  # collective-permutes around a large matmul): at least the actor's whole weights once, as the
  # rollout, the PPO forward and backward and D's update each gather theirs. With `embed`
  # replicated nothing is gathered but activations.
  c = s["collectives"]
  assert c["all-gather"]["bytes"] + c["collective-permute"]["bytes"] >= r["actor_bytes"]
  assert 0 < s["hbm_share"] < 1 and s["flops"] > 0 and s["predicted_s"] > 0
