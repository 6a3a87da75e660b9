"""A grain pipeline over behavior-log records: per-host shard, seeded shuffle, checkpointable state.

    ds = record_dataset(open_tfds(dir), seed=config.seed)      # or a list of record dicts
    it = iter(ds)
    record = next(it)
    state = it.get_state()        # a small JSON-able dict: save it with the train checkpoint
    ...
    it = iter(ds); it.set_state(state)   # resumes at the same record

Order of operations: shard (host p of P takes elements p, p + P, ...), shuffle within the shard
(seeded; reshuffled differently every epoch), repeat, decode. Every host sees a disjoint shard.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import grain
import jax

from rlhb_jax.data.config import DataConfig
from rlhb_jax.data.readers import detect_format, read_records


def decode_example(example: Any) -> dict:
  """A record dict from a TFDS example ({"line", "record": JSON bytes}) or a record dict itself."""
  if isinstance(example, dict) and "record" in example and "query" not in example:
    text = example["record"]
    return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
  return example


def record_dataset(
  source: Sequence,
  *,
  seed: int,
  shuffle: bool = True,
  num_epochs: int | None = None,
  shard_index: int | None = None,
  shard_count: int | None = None,
) -> grain.IterDataset:
  """The records of a random-access `source`, as a grain IterDataset.

  Args:
    source: anything with __len__ and __getitem__: a list of record dicts, or `open_tfds(...)`.
    seed: shuffle seed (config.seed).
    num_epochs: None or 0 repeats forever.
    shard_index, shard_count: this host's shard; default jax.process_index() / process_count().
  """
  index = jax.process_index() if shard_index is None else shard_index
  count = jax.process_count() if shard_count is None else shard_count
  ds = grain.MapDataset.source(source)
  if count > 1:
    ds = ds[index::count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs or None)
  return ds.map(decode_example).to_iter_dataset()


def load_source(path: str | pathlib.Path, config: DataConfig, **reader_args) -> Sequence:
  """A random-access source for `record_dataset`: TFDS directories are read lazily (array_record);
  JSONL and Parquet logs are validated (`read_records(path, config, **reader_args)`) and held in
  memory (convert big ones with `write_tfds`)."""
  if detect_format(path, config.format) == "tfds":
    from rlhb_jax.data.tfds_logs import open_tfds

    return open_tfds(path)
  return list(read_records(path, config, **reader_args))
