"""TFDS array_record round trip without TensorFlow, and the grain pipeline's sharding and resume."""

import importlib.util
import sys

import pytest

from rlhb_jax.data import DataConfig, load_source, read_records, record_dataset
from rlhb_jax.data.tfds_logs import open_tfds, write_tfds
from rlhb_jax.sim import Simulator


@pytest.fixture(scope="module")
def records():
  return Simulator(seed=3).records(60)


def test_tfds_round_trip_without_tensorflow(tmp_path, records):
  assert importlib.util.find_spec("tensorflow") is None  # not installed in this environment
  records[0]["behavior"]["shares"] = 2  # an unknown key must survive storage
  out = write_tfds(records, tmp_path / "tfds")
  assert list(out.glob("behavior_logs-train.array_record-*"))
  source = open_tfds(tmp_path / "tfds")
  assert len(source) == len(records)
  reader = read_records(out, DataConfig(), tmp_path)
  assert list(reader) == records  # same records, same order, nothing lost
  assert reader.report.unknown_behavior_keys == {"shares": 1}
  assert "tensorflow" not in sys.modules


def test_grain_resumes_at_the_same_record(tmp_path, records):
  write_tfds(records, tmp_path / "tfds")
  ds = record_dataset(
    load_source(tmp_path / "tfds", DataConfig()), seed=7, shard_index=0, shard_count=1
  )
  it = iter(ds)
  for _ in range(75):  # into the second epoch
    next(it)
  state = it.get_state()
  want = [next(it)["id"] for _ in range(10)]
  resumed = iter(ds)
  resumed.set_state(state)
  assert [next(resumed)["id"] for _ in range(10)] == want
  # A fresh pipeline with the same seed gives the same stream; epochs are reshuffled.
  again = iter(record_dataset(records, seed=7, shard_index=0, shard_count=1))
  ids = [next(again)["id"] for _ in range(120)]
  assert ids[:75] and sorted(ids[:60]) == sorted(r["id"] for r in records)
  assert ids[:60] != ids[60:]
  assert ids[75:85] == want


def test_hosts_read_disjoint_shards(records):
  shards = [
    [r["id"] for r in record_dataset(records, seed=1, num_epochs=1, shard_index=p, shard_count=3)]
    for p in range(3)
  ]
  assert sum(len(s) for s in shards) == len(records)
  assert set().union(*map(set, shards)) == {r["id"] for r in records}
  # The default shard is this process's: one process reads everything.
  assert len(list(record_dataset(records, seed=1, num_epochs=1))) == len(records)
