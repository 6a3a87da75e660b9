"""Behavior logs as a TFDS dataset in array_record files, written and read without TensorFlow.

`write_tfds` runs the `BehaviorLogs` builder over already validated records; `open_tfds` returns the
random-access `tfds.data_source` over it (what the grain pipeline reads). Each example keeps the
record as JSON text, so arbitrary extra keys survive, plus its line number in the original log.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Iterable

import numpy as np
import tensorflow_datasets as tfds

NAME = "behavior_logs"


class BehaviorLogs(tfds.core.GeneratorBasedBuilder):
  """Examples {"line": int64 (1-based position), "record": JSON text}, in the order written."""

  name = NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Behavior log records as JSON text."}
  # Nothing is downloaded, so there are no checksum files to find next to this module (looking for
  # them would import `importlib_resources`, which TFDS does not declare).
  code_path = None

  def __init__(self, *, records: Iterable[dict] | None = None, **kwargs):
    self._records = records
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict(
      {"line": tfds.features.Scalar(dtype=np.int64), "record": tfds.features.Text()}
    )
    return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    if self._records is None:
      raise ValueError("BehaviorLogs needs records=... to be prepared")
    for i, record in enumerate(self._records, start=1):
      yield i, {"line": i, "record": json.dumps(record, ensure_ascii=False)}


def write_tfds(records: Iterable[dict], data_dir: str | pathlib.Path) -> pathlib.Path:
  """Writes `records` as array_record files under `data_dir`; returns the dataset directory."""
  tfds.disable_progress_bar()
  logging.getLogger("absl").setLevel(logging.WARNING)
  builder = BehaviorLogs(records=records, data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return pathlib.Path(builder.data_dir)


def open_tfds(data_dir: str | pathlib.Path, split: str = "train"):
  """Random-access source of a directory written by `write_tfds` (data_dir or its version dir)."""
  data_dir = pathlib.Path(data_dir)
  if (data_dir / "dataset_info.json").exists():  # .../behavior_logs/1.0.0
    data_dir = data_dir.parent.parent
  return tfds.data_source(NAME, split=split, data_dir=str(data_dir), download=False, try_gcs=False)
