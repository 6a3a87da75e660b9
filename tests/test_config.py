"""`rlhb_jax.config`: ConfigDict <-> frozen dataclasses, validation, `configs/*.py`, CLI flags."""

import dataclasses
import pathlib
import subprocess
import sys

import pytest

from rlhb_jax import config as config_lib
from rlhb_jax.config import Config, default_configdict, from_configdict, replace, to_configdict

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((ROOT / "configs").glob("*.py"))


def load(path: pathlib.Path):
  return config_lib.load_configdict(path)


def test_default_configdict_round_trips():
  assert from_configdict(default_configdict()) == Config()
  assert from_configdict(default_configdict().to_dict()) == Config()


def test_a_changed_configdict_round_trips():
  cd = default_configdict()
  cd.ppo.clip_eps = 0.1
  cd.sampling.prompt_buckets = [16, 48]  # a list from the command line becomes a tuple
  cd.disc.model.num_layers = 1
  d = cd.to_dict()
  d["ppo"]["actor_optim"]["learning_rate"] = 1  # an int for a float field is widened
  cfg = from_configdict(d)
  assert cfg.ppo.clip_eps == 0.1 and cfg.disc.model.num_layers == 1
  assert cfg.sampling.prompt_buckets == (16, 48)
  assert cfg.ppo.actor_optim.learning_rate == 1.0
  assert isinstance(cfg.ppo.actor_optim.learning_rate, float)
  hash(cfg)  # hashable: usable as a static jit argument
  assert from_configdict(to_configdict(cfg)) == cfg
  assert cfg.ppo.critic_optim == Config().ppo.critic_optim  # untouched sections keep defaults


@pytest.mark.parametrize(
  ("path", "name"), [((), "modee"), (("ppo",), "clip_epz"), (("disc", "model"), "layers")]
)
def test_an_unknown_key_is_a_key_error_naming_it(path, name):
  d = default_configdict().to_dict()
  section = d
  for p in path:
    section = section[p]
  section[name] = 1
  with pytest.raises(KeyError, match=name) as e:
    from_configdict(d)
  assert ".".join(path) in str(e.value)


@pytest.mark.parametrize(
  ("key", "value"),
  [
    ("ppo.epochs", "two"),
    ("ppo.epochs", 2.5),
    ("ppo.clip_eps", "0.1"),
    ("mode", 3),
    ("log.plots", "yes"),
    ("sampling.prompt_buckets", (32, "64")),
  ],
)
def test_a_wrongly_typed_value_is_a_type_error(key, value):
  d = default_configdict().to_dict()
  *path, name = key.split(".")
  section = d
  for p in path:
    section = section[p]
  section[name] = value
  with pytest.raises(TypeError, match=key.replace(".", r"\.")):
    from_configdict(d)


def test_bootstrap_ratio_of_one_half_is_refused_for_collapse():
  cd = default_configdict()
  cd.disc.bootstrap_ratio = 0.5
  with pytest.raises(ValueError, match="collapses the discriminator"):
    from_configdict(cd)
  with pytest.raises(ValueError, match="bootstrap_ratio"):
    replace(Config(), **{"disc.bootstrap_ratio": 0.7})
  assert replace(Config(), **{"disc.bootstrap_ratio": 0.49}).disc.bootstrap_ratio == 0.49


@pytest.mark.parametrize(
  ("key", "value"),
  [
    ("ppo.advantage", "gea"),
    ("reward.source", "discriminator"),
    ("ppo.kl_estimator", "k2"),
    ("ppo.reward_transform", "exp"),
    ("sampling.decode_layers", "loop"),
    ("online.learner", "dpo"),
    ("online.kto_refit", "resume"),
  ],
)
def test_enumerated_options_are_checked(key, value):
  with pytest.raises(ValueError, match=value):
    replace(Config(), **{key: value})


def test_the_simulator_reward_needs_simulator_logs_offline():
  assert replace(Config(), **{"reward.source": "sim"}).reward.source == "sim"
  with pytest.raises(ValueError, match="simulator's own logs"):
    replace(Config(), **{"reward.source": "sim", "data.path": "mine.jsonl"})
  from rlhb_jax import main

  assert "offline ceiling" in main.config_problem(
    replace(Config(), **{"reward.source": "sim", "mode": "online"})
  )
  assert main.config_problem(replace(Config(), **{"reward.source": "sim", "mode": "rlhb"})) is None


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_files_load(path):
  cd = load(path)
  cfg = from_configdict(cd)
  assert isinstance(cfg, Config)
  assert from_configdict(to_configdict(cfg)) == cfg
  # base.py is the defaults; every other file overrides something.
  assert (cfg == Config()) == (path.name == "base.py")


def test_configs_named_in_the_docs_exist_and_every_config_is_documented():
  """Every `configs/NAME.py` that README.md, docs/, the Makefile or experiments/ names exists, and
  every file in configs/ is named in README.md or docs/ (so a user can find what it is for)."""
  import re

  def named(paths):
    text = "\n".join(p.read_text(encoding="utf-8") for p in paths)
    return set(re.findall(r"configs/([A-Za-z0-9_]+\.py)", text))

  docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
  code = [ROOT / "Makefile", *sorted((ROOT / "experiments").glob("*.py"))]
  files = {p.name for p in CONFIG_FILES}
  assert {"base.py", "default.py", "tiny.py"} <= files
  assert named(docs + code) - files == set(), "named but missing"
  assert files - named(docs) == set(), "in configs/ but in no doc"


def test_replace_takes_dotted_paths():
  cfg = Config()
  new = replace(
    cfg,
    **{
      "seed": 7,
      "ppo.epochs": 1,
      "ppo.clip_eps": 0.3,
      "ppo.actor_optim.learning_rate": 1e-5,
      "disc.model.num_layers": 1,
    },
  )
  assert (new.seed, new.ppo.epochs, new.ppo.clip_eps) == (7, 1, 0.3)
  assert new.ppo.actor_optim.learning_rate == 1e-5
  assert new.ppo.actor_optim.warmup_steps == cfg.ppo.actor_optim.warmup_steps
  assert new.ppo.critic_optim == cfg.ppo.critic_optim
  assert new.disc.model.num_layers == 1 and new.model == cfg.model
  assert new.ppo.gamma == cfg.ppo.gamma and new.sft == cfg.sft
  assert cfg == Config()  # the original is untouched
  with pytest.raises(dataclasses.FrozenInstanceError):
    new.seed = 1
  with pytest.raises(TypeError, match="clip_epz"):
    replace(cfg, **{"ppo.clip_epz": 0.1})


def test_every_config_section_is_a_frozen_dataclass():
  def walk(value, where):
    assert dataclasses.is_dataclass(value), where
    assert value.__dataclass_params__.frozen, where
    for f in dataclasses.fields(value):
      v = getattr(value, f.name)
      if dataclasses.is_dataclass(v):
        walk(v, f"{where}.{f.name}")

  walk(config_lib.Config(), "config")


def cli(*flags):
  return subprocess.run(
    [sys.executable, "-m", "rlhb_jax.main", "--config", "configs/tiny.py", *flags],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_cli_refuses_a_misspelled_flag():
  """The config is locked: a typo fails in flag parsing, before any work starts."""
  res = cli("--config.ppo.clip_epz=0.1", "--workdir", "/nonexistent/never-created")
  assert res.returncode != 0
  assert "clip_epz" in res.stderr and "clip_eps" in res.stderr  # ml_collections suggests the fix
  # Locked also after parsing, so no code can add a key to it later.
  probe = (
    "from absl import flags; from rlhb_jax import main; "
    "flags.FLAGS(['main', '--config', 'configs/tiny.py']); print(main._CONFIG.value.is_locked)"
  )
  res = subprocess.run(
    [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert res.stdout.strip() == "True", res.stderr


def test_cli_reports_an_invalid_value_as_a_config_error():
  res = cli("--config.disc.bootstrap_ratio=0.5", "--workdir", "/nonexistent/never-created")
  assert res.returncode == 2
  assert "config error" in res.stderr and "collapses" in res.stderr


def test_bools_are_not_ints_and_sections_must_be_sections():
  d = default_configdict().to_dict()
  d["ppo"]["epochs"] = True
  with pytest.raises(TypeError, match="ppo.epochs"):
    from_configdict(d)
  d = default_configdict().to_dict()
  d["ppo"] = 3
  with pytest.raises(TypeError, match="config.ppo"):
    from_configdict(d)
  d = default_configdict().to_dict()
  d["sampling"]["prompt_buckets"] = 64
  with pytest.raises(TypeError, match="sampling.prompt_buckets"):
    from_configdict(d)


def test_every_mode_resolves_to_its_job_or_stages():
  from rlhb_jax.main import MODES, resolve

  for name, mode in MODES.items():
    assert bool(mode.job) != bool(mode.stages), name
    for target in (mode.job,) if mode.job else mode.stages:
      assert callable(resolve(target)), (name, target)


def test_an_unknown_mode_exits_with_a_clear_message(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "rlhb_jax.main",
      "--config",
      str(pathlib.Path(__file__).resolve().parents[1] / "configs/tiny.py"),
      "--workdir",
      str(tmp_path),
      "--config.mode=rlhx",
    ],
    capture_output=True,
    text=True,
  )
  assert out.returncode == 2
  assert "config.mode='rlhx'" in out.stderr and "pipeline" in out.stderr
