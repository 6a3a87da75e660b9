"""Job sections of the config: generation, online rounds, export and ahead-of-time compiles."""

from __future__ import annotations

import dataclasses

from rlhb_jax.training.config import OptimConfig


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  prompts_file: str = ""  # JSONL of {"query": ..., "behavior": ...}; empty = a few built-in queries
  chat_template: bool = True  # wrap the prompt in the tokenizer's chat template (one user message)
  batch_size: int = 8


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
  """mode=online: rounds of deploy -> collect -> train (docs/RESULTS.md, "Online alignment")."""

  rounds: int = 8
  # What a round trains (jobs/online_learners.py): "rlhb" = `sft_steps` SFT and `steps_per_round`
  # PPO steps on the reward of `reward.source` over the last `window_rounds` rounds' records;
  # "kto" = KTO on every round's records so far after each round, against the SFT generator (the
  # cheap alternative: retraining offline on the logs), started as `kto_refit` says.
  learner: str = "rlhb"
  # learner=kto: "scratch" = from the SFT generator, (r + 1) x `kto.steps` steps after round r;
  # "continue" = from the deployed KTO generator, `kto.steps` more steps (as many answers seen at a
  # constant cost per round; the optimizer starts afresh and warms up in round 0 only).
  kto_refit: str = "scratch"
  # sim: the simulator's users act on every served response (through HTTP, like real clients);
  # live: serve on config.serve.port and wait for real clients' feedback in the store.
  source: str = "sim"
  queries_per_round: int = 256  # sim: training-split queries served per round
  steps_per_round: int = 8  # RLHB steps per round on the fresh records
  # Behavior-conditioned SFT steps per round on the fresh records (before the RLHB steps): the
  # generator re-learns which answers earn which behavior from what users do now. 0 = RLHB only.
  sft_steps: int = 8
  # Which fresh records the online SFT learns from: "best" = those whose behavior is the most
  # preferred text (what users like now), "all" = every record under its own behavior text.
  sft_rows: str = "best"
  sft_optim: OptimConfig = OptimConfig(learning_rate=3e-4, warmup_steps=0)
  window_rounds: int = 2  # the training pool: records of the last W rounds
  client_threads: int = 8  # sim: concurrent simulated clients
  # sim with serve.auth keys / keys_or_session: each impression is a distinct user of a pool of
  # this many (more when an answer is shown to more), each with its own API key.
  sim_users: int = 1000
  min_records: int = 64  # live: wait for this many new records before training
  poll_seconds: float = 5.0  # live: how often to look for them

  def __post_init__(self):
    if self.source not in ("sim", "live"):
      raise ValueError(f"config.online.source={self.source!r}: expected sim or live")
    if self.learner not in ("rlhb", "kto"):
      raise ValueError(f"config.online.learner={self.learner!r}: expected rlhb or kto")
    if self.kto_refit not in ("scratch", "continue"):
      raise ValueError(f"config.online.kto_refit={self.kto_refit!r}: expected scratch or continue")
    if self.sft_rows not in ("best", "all"):
      raise ValueError(f"config.online.sft_rows={self.sft_rows!r}: expected best or all")
    if self.window_rounds < 1 or self.rounds < 1:
      raise ValueError("config.online: rounds and window_rounds must be >= 1")
    if self.sim_users < 1:
      raise ValueError(f"config.online.sim_users={self.sim_users}: must be >= 1")


@dataclasses.dataclass(frozen=True)
class KeysConfig:
  """mode=keys: the API keys of the run's feedback store (`serve.store_url`, default
  DIR/feedback.db) that `serve.auth=keys` / `keys_or_session` accept (docs/SERVING.md)."""

  # add (prints the new key once) | list | revoke | rotate_sessions (a new session secret: every
  # page session issued before is refused, by every replica, within serve.reload_poll_seconds)
  action: str = "list"
  name: str = ""  # add: who or what holds the key
  id: str = ""  # revoke: the key's id, as add and list print it

  def __post_init__(self):
    if self.action not in ("add", "list", "revoke", "rotate_sessions"):
      raise ValueError(
        f"config.api_keys.action={self.action!r}: expected add, list, revoke or rotate_sessions"
      )


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """mode=export: a trained model of the run for other tools, written to DIR/export/<params>/
  (docs/RESULTS.md, "Use the aligned model elsewhere")."""

  what: str = "generator"  # generator | discriminator | reward_model (RLHF's Bradley-Terry RM)
  format: str = "hf"  # hf (a Hugging Face directory) | gguf (one file; generators only)
  # A name under DIR/models/; "" = the newest of `what` (*_actor; *_disc or disc_warmup;
  # reward_model).
  params: str = ""
  dtype: str = "float32"  # hf: float32 | float16 | bfloat16; gguf: float32 | float16
  max_shard_bytes: int = 5 * 2**30  # hf: larger models are split into shards with an index

  def __post_init__(self):
    if self.what not in ("generator", "discriminator", "reward_model"):
      raise ValueError(
        f"config.export.what={self.what!r}: expected generator, discriminator or reward_model"
      )
    if self.format not in ("hf", "gguf"):
      raise ValueError(f"config.export.format={self.format!r}: expected hf or gguf")
    if self.format == "gguf" and self.what != "generator":
      raise ValueError("config.export.format=gguf writes generators only; use hf for a scorer")
    dtypes = ("float32", "float16") if self.format == "gguf" else ("float32", "float16", "bfloat16")
    if self.dtype not in dtypes:
      raise ValueError(f"config.export.dtype={self.dtype!r}: expected one of {dtypes}")


# The jitted steps of the stages (the sampler's prefill and decode run inside rlhb as well).
COMPILE_STEPS = ("sft", "disc_warmup", "rlhb", "kto", "prefill", "decode")


@dataclasses.dataclass(frozen=True)
class CompileConfig:
  """mode=compile: every jitted step of the config compiled ahead of time for a device topology,
  from abstract shapes (jobs/compile.py, docs/TPU.md)."""

  # A TPU slice as libtpu names it ("v5e:2x4", "v4:2x2x4": the TPU compiler, no TPU attached) or
  # "cpu:N" (N local CPU devices: memory only).
  topology: str = ""
  # The generator's architecture, a preset of model/shapes.py, when model.source is a checkpoint
  # the compile does not read ("hf", "gguf"); "" = config.model (tiny) or the built-in model's.
  shape: str = ""
  mfu: float = 0.4  # model-FLOPs utilisation the predicted step times assume
  prompt_len: int = 0  # prompt and prefix length P; 0 = the longest of sampling.prompt_buckets
  steps: tuple[str, ...] = COMPILE_STEPS  # which of them to compile

  def __post_init__(self):
    if unknown := sorted(set(self.steps) - set(COMPILE_STEPS)):
      raise ValueError(f"config.compile.steps: unknown {unknown}; known: {COMPILE_STEPS}")
    if not 0 < self.mfu <= 1:
      raise ValueError(f"config.compile.mfu={self.mfu}: expected a fraction in (0, 1]")
