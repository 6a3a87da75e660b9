"""Typed, frozen configuration.

Every option of the framework is a field of a frozen dataclass, with its default and a comment
saying what it does. Each section lives beside the code it configures (`model/config.py`,
`data/config.py`, `methods/config.py`, `methods/ppo/config.py`, `training/config.py`, ...) and
checks its own fields; `Config` here is the root, and checks what spans sections. `configs/*.py`
return an `ml_collections.ConfigDict` built from these defaults (`default_configdict`) with a few
overrides; `main.py` converts the locked ConfigDict once with `from_configdict`, so jitted code
only ever sees hashable dataclasses.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import types
import typing
from typing import Any

import ml_collections

from rlhb_jax.data.behavior import BehaviorConfig
from rlhb_jax.data.config import DataConfig, PromptConfig
from rlhb_jax.eval.config import EvalConfig
from rlhb_jax.infra.config import CheckpointConfig, DistributedConfig, MeshConfig
from rlhb_jax.jobs.config import (
  CompileConfig,
  ExportConfig,
  GenerateConfig,
  KeysConfig,
  OnlineConfig,
)
from rlhb_jax.methods.config import DiscConfig, DPOConfig, KTOConfig, SFTConfig
from rlhb_jax.methods.ppo.config import PPOConfig, RewardConfig, RLHBConfig
from rlhb_jax.model.config import ModelSpec, SamplingConfig
from rlhb_jax.model.lora import LoraConfig
from rlhb_jax.serving.config import ServeConfig
from rlhb_jax.sim.config import SimConfig
from rlhb_jax.training.config import LogConfig


@dataclasses.dataclass(frozen=True)
class Config:
  mode: str = "pipeline"  # one of rlhb_jax.main.MODES
  seed: int = 0
  distributed: DistributedConfig = DistributedConfig()
  model: ModelSpec = ModelSpec()
  # The generator's LoRA adapters (SFT and PPO stages; a GAE critic gets its own of this shape).
  # With rank > 0 the PPO reference is the frozen base with adapters off: no second copy.
  lora: LoraConfig = LoraConfig()
  sampling: SamplingConfig = SamplingConfig()
  prompt: PromptConfig = PromptConfig()
  generate: GenerateConfig = GenerateConfig()
  behavior: BehaviorConfig = BehaviorConfig()
  data: DataConfig = DataConfig()
  sim: SimConfig = SimConfig()
  sft: SFTConfig = SFTConfig()
  disc: DiscConfig = DiscConfig()
  ppo: PPOConfig = PPOConfig()
  rlhb: RLHBConfig = RLHBConfig()
  reward: RewardConfig = RewardConfig()
  dpo: DPOConfig = DPOConfig()
  kto: KTOConfig = KTOConfig()
  online: OnlineConfig = OnlineConfig()
  mesh: MeshConfig = MeshConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  eval: EvalConfig = EvalConfig()
  log: LogConfig = LogConfig()
  serve: ServeConfig = ServeConfig()
  api_keys: KeysConfig = KeysConfig()
  export: ExportConfig = ExportConfig()
  compile: CompileConfig = CompileConfig()

  def __post_init__(self):
    """What no one section can check alone (each section checks its own fields)."""
    from rlhb_jax.methods.ppo import rewards  # the registry of reward sources (it imports config)

    src = self.reward.source  # (whether the mode can take it: main.config_problem)
    if rewards.get(src).simulator_only and self.data.path:
      raise ValueError(
        f"config.reward.source={src} rewards with the simulated users' ground truth; it needs "
        f"the simulator's own logs, not config.data.path={self.data.path!r}"
      )
    for name, _ in (*self.reward.numerator, *self.reward.denominator):
      if name not in self.behavior.names:
        raise ValueError(
          f"config.reward: {name!r} is not a behavior type; known: {self.behavior.names}"
        )
    if self.dpo.rate_type not in self.behavior.names:
      raise ValueError(
        f"config.dpo.rate_type={self.dpo.rate_type!r} is not a behavior type; known: "
        f"{self.behavior.names}"
      )


def _to_plain(value: Any) -> Any:
  if dataclasses.is_dataclass(value):
    return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, tuple):
    return tuple(_to_plain(v) for v in value)
  return value


def to_configdict(config: Any) -> ml_collections.ConfigDict:
  """A dataclass (nested) as a ConfigDict with the same keys and values."""
  return ml_collections.ConfigDict(_to_plain(config))


def default_configdict() -> ml_collections.ConfigDict:
  return to_configdict(Config())


def load_configdict(path: str | pathlib.Path) -> ml_collections.ConfigDict:
  """`get_config()` of a config file (e.g. configs/default.py), read by path like `--config`."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f"_rlhb_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _convert(tp: Any, value: Any, where: str) -> Any:
  origin = typing.get_origin(tp)
  if dataclasses.is_dataclass(tp):
    return _build(tp, value, where)
  if origin is tuple:
    if value is None:
      return None
    args = typing.get_args(tp)
    if not isinstance(value, list | tuple):
      raise TypeError(f"config.{where}={value!r}: expected a sequence")
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    return tuple(value)
  if origin in (typing.Union, types.UnionType):
    return value
  if tp is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if tp in (int, float, str, bool) and (
    not isinstance(value, tp) or (tp is not bool and isinstance(value, bool))
  ):
    raise TypeError(f"config.{where}={value!r}: expected {tp.__name__}")
  return value


def _build(cls: type, values: Any, where: str) -> Any:
  if isinstance(values, ml_collections.ConfigDict):
    values = values.to_dict()
  if not isinstance(values, dict):
    raise TypeError(f"config.{where or '<root>'}={values!r}: expected a section of {cls.__name__}")
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = set(values) - names
  if unknown:
    raise KeyError(f"config.{where}: unknown keys {sorted(unknown)}")
  kwargs = {}
  for name, value in values.items():
    kwargs[name] = _convert(hints[name], value, f"{where}.{name}" if where else name)
  return cls(**kwargs)


def from_configdict(cd: ml_collections.ConfigDict | dict) -> Config:
  """The locked ConfigDict as a frozen `Config`; an unknown key or a wrong type is an error."""
  return _build(Config, cd, "")


def replace(config: Any, **changes: Any) -> Any:
  """`dataclasses.replace` that also takes dotted paths: replace(cfg, **{"ppo.epochs": 1})."""
  nested: dict[str, dict[str, Any]] = {}
  flat = {}
  for key, value in changes.items():
    head, _, rest = key.partition(".")
    if rest:
      nested.setdefault(head, {})[rest] = value
    else:
      flat[head] = value
  for head, sub in nested.items():
    flat[head] = replace(getattr(config, head), **sub)
  return dataclasses.replace(config, **flat)
