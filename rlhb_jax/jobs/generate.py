"""mode=generate: sample responses for a JSONL of {"query", "behavior"?} prompts."""

from __future__ import annotations

import json
import pathlib
import time

import jax

from rlhb_jax.config import Config
from rlhb_jax.data.batches import generator_message, record_context
from rlhb_jax.data.validate import read_json_objects, text_field
from rlhb_jax.model.sampling import generate_texts
from rlhb_jax.run import Run

BUILTIN_QUERIES = (
  "What is the capital of France?",
  "How many centimeters are in a meter?",
  "What is 12 plus 30?",
)


def read_prompts(path: str) -> list[dict]:
  """Prompts from JSONL; a bad line is a BadRecordError naming the file, line and field."""
  if not path:
    return [{"query": q} for q in BUILTIN_QUERIES]
  prompts = []
  for i, row in read_json_objects(path):
    text_field(path, i, row, "query", True)
    text_field(path, i, row, "behavior", False)
    prompts.append(row)
  return prompts


def run(cfg: Config, workdir: pathlib.Path) -> dict:
  run_ = Run(cfg, workdir).prepare("tokenizer")
  tok = run_.tokenizer
  model = run_.actor_model()
  prompts = read_prompts(cfg.generate.prompts_file)
  ids = []
  for p in prompts:
    msg = generator_message(cfg, p["query"], p.get("behavior"), record_context(p))
    ids.append(
      tok.chat_prompt(msg, cfg.prompt.system) if cfg.generate.chat_template else tok.encode(msg)
    )
  t0 = time.perf_counter()
  outs = generate_texts(
    model, tok, ids, jax.random.key(cfg.seed), cfg.sampling, cfg.generate.batch_size
  )
  seconds = time.perf_counter() - t0
  path = workdir / "generations.jsonl"
  with path.open("w", encoding="utf-8") as f:
    for p, prompt_ids, (resp_ids, text) in zip(prompts, ids, outs, strict=True):
      row = {
        "query": p["query"],
        "behavior": p.get("behavior"),
        "prompt_token_ids": list(prompt_ids),
        "response_token_ids": resp_ids,
        "response": text,
      }
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  for p, (_, text) in zip(prompts, outs, strict=True):
    print(f"> {p['query']}\n{text}\n")
  print(f"wrote {len(outs)} generations to {path} in {seconds:.1f}s (compile included)")
  return {"generations": len(outs), "path": str(path)}
