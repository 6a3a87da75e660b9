"""Sampler throughput: ours (jitted prefill + scan decode) vs. transformers' `generate`, same run.

SmolLM2-135M-Instruct (the built-in GGUF), a ~46-token prompt, 64 new tokens with EOS ignored, greedy,
batch 8 and 32. Prints a table and, as its last line, one JSON object for batch 8.

  python experiments/bench_sampler.py [--repeats 3] [--batches 8,32] [--skip-hf]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from rlhb_jax.config import ModelSpec, SamplingConfig
from rlhb_jax.model import loading
from rlhb_jax.sampling import pad_prompts, sample_jit

PROMPT = (
  "Users liked short, correct answers that cite a source. Question: what is the capital of Peru, "
  "and which river flows through that city? Please answer in one sentence."
)
NEW_TOKENS = 64


def time_ours(model, tok, batch: int, repeats: int) -> tuple[float, float]:
  from flax import nnx

  graphdef, params = nnx.split(model)
  ids = tok.chat_prompt(PROMPT)
  tokens, mask = pad_prompts([ids] * batch, (len(ids),), tok.pad_id)
  cfg = SamplingConfig(max_new_tokens=NEW_TOKENS, greedy=True, prompt_buckets=(len(ids),))
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


def time_hf(tok, batch: int, repeats: int) -> float:
  import torch
  import transformers

  path = loading.builtin_smollm2_path()
  model = transformers.AutoModelForCausalLM.from_pretrained(
    str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
  ).eval()
  ids = torch.tensor([tok.chat_prompt(PROMPT)] * batch)
  kwargs = dict(
    max_new_tokens=NEW_TOKENS,
    min_new_tokens=NEW_TOKENS,
    do_sample=False,
    pad_token_id=tok.pad_id,
    attention_mask=torch.ones_like(ids),
  )
  with torch.no_grad():
    model.generate(ids, **kwargs)  # warm-up
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      model.generate(ids, **kwargs)
      times.append(time.perf_counter() - t0)
  return batch * NEW_TOKENS / statistics.median(times)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--batches", default="8,32")
  ap.add_argument("--skip-hf", action="store_true", help="ours only (e.g. on a GPU machine)")
  args = ap.parse_args()
  model, tok = loading.load_model(ModelSpec(source="smollm2-135m-instruct"))
  print(f"device: {jax.devices()[0].device_kind}; prompt tokens: {len(tok.chat_prompt(PROMPT))}")
  rows = []
  for batch in [int(b) for b in args.batches.split(",")]:
    ours, compile_s = time_ours(model, tok, batch, args.repeats)
    hf = float("nan") if args.skip_hf else time_hf(tok, batch, args.repeats)
    rows.append(
      {
        "batch": batch,
        "ours_tok_s": round(ours, 1),
        "hf_tok_s": round(hf, 1),
        "ratio": round(ours / hf, 2) if hf == hf else None,
        "compile_s": round(compile_s, 1),
      }
    )
  print(f"{'batch':>5} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6} {'compile s':>10}")
  for r in rows:
    print(
      f"{r['batch']:>5} {r['ours_tok_s']:>11} {r['hf_tok_s']:>9} {str(r['ratio']):>6} "
      f"{r['compile_s']:>10}"
    )
  first = rows[0]
  print(json.dumps(first))


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
