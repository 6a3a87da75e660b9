"""Behavior-log ingestion: validation, streaming readers, TFDS array_record storage, grain pipeline.

The grain pipeline (`record_dataset`, `load_source`) is imported on first use, so that importing the
config (which imports `DataConfig` from here) does not pull in grain.
"""

from rlhb_jax.data.config import DataConfig
from rlhb_jax.data.readers import IngestReport, RecordReader, read_records
from rlhb_jax.data.validate import BadRecordError

__all__ = [
  "BadRecordError",
  "DataConfig",
  "IngestReport",
  "RecordReader",
  "load_source",
  "read_records",
  "record_dataset",
]


def __getattr__(name: str):
  if name in ("record_dataset", "load_source"):
    from rlhb_jax.data import pipeline

    return getattr(pipeline, name)
  raise AttributeError(f"module 'rlhb_jax.data' has no attribute {name!r}")
