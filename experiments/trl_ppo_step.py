"""TRL 1.12's PPO step on SmolLM2-135M-Instruct, timed: the reference side of bench_train_step.py.

Runs inside the isolated virtual environment that `bench_train_step.py --compare-trl` creates
(torch and TRL never enter the project's runtime); it imports nothing from rlhb_jax.

  <venv>/bin/python experiments/trl_ppo_step.py --gguf PATH --prompts prompts.json [--steps 3]
      [--epochs 4] [--new-tokens 32] [--lora-rank 0]

What one TRL step computes (trl/experimental/ppo/ppo_trainer.py, PPOTrainer.train): sample the
responses with the policy (`generate`, KV cache); one forward each of the reference policy, the
value model and the reward model over prompt + response; GAE; then `epochs` x (policy + value
forward and backward, AdamW step) over the whole batch (one minibatch). The policy, the value
model and the reward model are all SmolLM2-135M-Instruct (the value and reward heads are fresh
linear layers); with `--lora-rank` the policy gets PEFT LoRA adapters and the reference is the
policy with its adapters off, as in TRL's own PEFT path. No stop token: every row decodes all
`new_tokens`.

Prints one JSON line: {"trl_s_per_step", "step_seconds", "versions", ...}.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--gguf", required=True)
  ap.add_argument("--prompts", required=True, help="JSON list of token-id lists (equal lengths)")
  ap.add_argument("--steps", type=int, default=3, help="timed steps (one more runs first, untimed)")
  ap.add_argument("--epochs", type=int, default=4)
  ap.add_argument("--new-tokens", type=int, default=32)
  ap.add_argument("--lora-rank", type=int, default=0)
  ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
  args = ap.parse_args()

  import datasets
  import torch
  import transformers
  import trl
  from trl.experimental.ppo import PPOConfig, PPOTrainer

  if args.threads:
    torch.set_num_threads(args.threads)
  gguf = pathlib.Path(args.gguf)
  kw = dict(gguf_file=gguf.name, dtype=torch.float32)
  tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
  if tok.pad_token_id is None:
    tok.pad_token = tok.eos_token
  policy = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kw)
  ref = (
    None
    if args.lora_rank
    else transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kw)
  )

  def scalar_model():
    return transformers.AutoModelForSequenceClassification.from_pretrained(
      str(gguf.parent), num_labels=1, **kw
    )

  value, reward = scalar_model(), scalar_model()
  for m in (policy, value, reward):
    m.config.pad_token_id = tok.pad_token_id

  prompts = json.loads(pathlib.Path(args.prompts).read_text())
  batch = len(prompts)
  rows = [{"input_ids": p} for p in prompts]
  train = datasets.Dataset.from_list(rows * (args.steps + 1))

  times: list[float] = []

  class Clock(transformers.TrainerCallback):
    """Wall time between the ends of consecutive PPO steps (the first from train start)."""

    def __init__(self):
      self.last = None

    def on_train_begin(self, *a, **k):
      self.last = time.perf_counter()

    def on_step_end(self, *a, **k):
      now = time.perf_counter()
      times.append(now - self.last)
      self.last = now

  peft_config = None
  if args.lora_rank:
    import peft

    peft_config = peft.LoraConfig(
      r=args.lora_rank,
      lora_alpha=2 * args.lora_rank,
      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
      task_type="CAUSAL_LM",
    )
  with tempfile.TemporaryDirectory() as out:
    cfg = PPOConfig(
      output_dir=out,
      per_device_train_batch_size=batch,
      gradient_accumulation_steps=1,
      num_mini_batches=1,
      num_ppo_epochs=args.epochs,
      local_rollout_forward_batch_size=batch,
      response_length=args.new_tokens,
      stop_token=None,
      total_episodes=batch * (args.steps + 1),
      num_sample_generations=0,
      temperature=1.0,
      learning_rate=1e-6,
      report_to=[],
      save_strategy="no",
      logging_steps=1000,
      disable_tqdm=True,
      use_cpu=True,
      seed=0,
    )
    trainer = PPOTrainer(
      args=cfg,
      processing_class=tok,
      model=policy,
      ref_model=ref,
      reward_model=reward,
      value_model=value,
      train_dataset=train,
      callbacks=[Clock()],
      peft_config=peft_config,
    )
    trainer.train()
  timed = times[1:] or times
  print(
    json.dumps(
      {
        "trl_s_per_step": statistics.median(timed),
        "step_seconds": [round(t, 2) for t in times],
        "batch": batch,
        "prompt_len": len(prompts[0]),
        "new_tokens": args.new_tokens,
        "ppo_epochs": args.epochs,
        "lora_rank": args.lora_rank,
        "torch_threads": torch.get_num_threads(),
        "versions": {
          "trl": trl.__version__,
          "torch": torch.__version__,
          "transformers": transformers.__version__,
        },
      }
    )
  )


if __name__ == "__main__":
  main()
