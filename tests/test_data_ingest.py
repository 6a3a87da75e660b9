"""Log validation, streaming readers, quarantine and mode=inspect_logs (rlhb_jax/data, jobs)."""

import dataclasses
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhb_jax import config as config_lib
from rlhb_jax.data import BadRecordError, DataConfig, read_records
from rlhb_jax.data.behavior import BehaviorConfig
from rlhb_jax.jobs import inspect_logs

GOOD = {
  "id": "q17-r3",
  "query": "What is the capital of Peru?",
  "response": "Lima.",
  "behavior": {"impressions": 120, "clicks": 14, "likes": 9, "dislikes": 1, "requeries": 3},
  "timestamp": "2026-11-01T10:00:00Z",
  "meta": {"source": "search"},
}


def _with(**changes):
  rec = json.loads(json.dumps(GOOD))
  for key, value in changes.items():
    if key.startswith("b_"):
      rec["behavior"][key[2:]] = value
    elif value is _DROP:
      del rec[key]
    else:
      rec[key] = value
  return json.dumps(rec)


_DROP = object()

# (raw line, error kind, field named in the error)
BAD = [
  ('{"id": "x", "query": ', "invalid_json", "<line>"),
  ("[1, 2, 3]", "not_object", "<record>"),
  ('"just a string"', "not_object", "<record>"),
  (_with(query=_DROP), "missing_field", "query"),
  (_with(behavior=_DROP), "missing_field", "behavior"),
  (_with(id=[1]), "wrong_type", "id"),
  (_with(behavior="many"), "wrong_type", "behavior"),
  (_with(response=3), "wrong_type", "response"),
  (_with(b_likes=-2), "negative_count", "behavior.likes"),
  (_with(b_clicks=2.5), "non_integer_count", "behavior.clicks"),
  (_with(b_clicks="7"), "non_integer_count", "behavior.clicks"),
  (_with(b_dislikes=True), "non_integer_count", "behavior.dislikes"),
  (_with(query="   "), "empty_query", "query"),
  (_with() + ' {"more": 1}', "trailing_garbage", "<line>"),
  (_with() + " xyz", "trailing_garbage", "<line>"),
  (
    '{"id": "a", "behavior": {"requeries": 1}}'.replace(
      '"behavior"', '"query": "q", "response": "r", "behavior"'
    ),
    "missing_field",
    "behavior.impressions",
  ),
  ("   ", "empty_line", "<line>"),
]


def _write(path, lines):
  path.write_text("".join(line + "\n" for line in lines))
  return path


@pytest.mark.parametrize("raw, kind, field", BAD)
def test_each_bad_record_class_fails_with_a_clear_error(tmp_path, raw, kind, field):
  path = _write(tmp_path / "log.jsonl", [_with(), raw, _with()])
  with pytest.raises(BadRecordError) as info:
    list(read_records(path, DataConfig(on_error="fail"), tmp_path))
  err = info.value
  assert (err.kind, err.field, err.line, err.path) == (kind, field, 2, str(path))
  assert str(err).startswith(f"{path}:2: field {field!r}: ")


def test_invalid_utf8_is_rejected(tmp_path):
  path = tmp_path / "log.jsonl"
  path.write_bytes(_with().encode() + b"\n" + b'{"id": "\xff\xfe"}\n')
  with pytest.raises(BadRecordError, match="not UTF-8"):
    list(read_records(path, DataConfig(on_error="fail")))


def test_quarantine_keeps_every_line_accounted_for(tmp_path):
  lines = [_with(id=f"ok{i}") for i in range(5)] + [raw for raw, _, _ in BAD]
  path = _write(tmp_path / "log.jsonl", lines)
  reader = read_records(path, DataConfig(on_error="quarantine"), tmp_path / "run")
  records = list(reader)
  rep = reader.report
  assert rep.records_ok == len(records) == 5
  assert rep.records_rejected == len(BAD)
  assert rep.records_ok + rep.records_rejected == rep.lines_read == len(lines)
  assert sum(rep.rejected_by_kind.values()) == len(BAD)
  quarantined = [
    json.loads(x) for x in (tmp_path / "run" / "quarantine.jsonl").read_text().splitlines()
  ]
  assert rep.quarantine_path == str(tmp_path / "run" / "quarantine.jsonl")
  assert [q["raw"] for q in quarantined] == [raw for raw, _, _ in BAD]  # verbatim
  assert [(q["kind"], q["field"]) for q in quarantined] == [(k, f) for _, k, f in BAD]
  assert [q["line"] for q in quarantined] == list(range(6, 6 + len(BAD)))


def test_unknown_keys_are_kept_and_reported(tmp_path):
  rec = json.loads(_with(b_shares=4, b_dwell_seconds=12.5))
  rec["experiment"] = "A"
  path = _write(tmp_path / "log.jsonl", [json.dumps(rec), _with(b_likes=3.0)])
  reader = read_records(path, DataConfig())
  first, second = list(reader)
  assert first["behavior"]["shares"] == 4 and first["behavior"]["dwell_seconds"] == 12.5
  assert first["experiment"] == "A" and first["meta"] == {"source": "search"}
  assert second["behavior"]["likes"] == 3 and isinstance(second["behavior"]["likes"], int)
  assert reader.report.unknown_behavior_keys == {"shares": 1, "dwell_seconds": 1}
  assert reader.report.extra_fields == {"experiment": 1}


def test_missing_behavior_can_count_as_zero(tmp_path):
  rec = json.loads(_with())
  del rec["behavior"]["requeries"]
  path = _write(tmp_path / "log.jsonl", [json.dumps(rec)])
  (only,) = list(read_records(path, DataConfig(missing_behavior="zero")))
  assert only["behavior"]["requeries"] == 0
  # A configured real-valued type accepts fractions; a count does not.
  cfg = BehaviorConfig(
    types=(*BehaviorConfig().types, ("dwell_seconds", "positive", ("short", "long")))
  )
  path = _write(tmp_path / "dwell.jsonl", [_with(b_dwell_seconds=3.25)])
  assert (
    list(read_records(path, DataConfig(), behavior=cfg))[0]["behavior"]["dwell_seconds"] == 3.25
  )


def test_parquet_in_batches_with_the_same_validation(tmp_path):
  rows = [json.loads(_with(id=f"r{i}")) for i in range(7)]
  rows[3]["behavior"]["likes"] = -1
  rows[5]["query"] = ""
  path = tmp_path / "log.parquet"
  pq.write_table(pa.Table.from_pylist(rows), path)
  reader = read_records(path, DataConfig(parquet_batch_rows=2), tmp_path)
  got = list(reader)
  assert [r["id"] for r in got] == ["r0", "r1", "r2", "r4", "r6"]
  assert got[0]["behavior"] == rows[0]["behavior"] and got[0]["meta"] == rows[0]["meta"]
  assert reader.report.rejected_by_kind == {"negative_count": 1, "empty_query": 1}
  with pytest.raises(BadRecordError, match=r"log.parquet:4: field 'behavior.likes'"):
    list(read_records(path, DataConfig(on_error="fail")))


def test_inspect_logs_job(tmp_path):
  lines = [_with(id=f"ok{i}", b_likes=i, b_impressions=10 * (i + 1)) for i in range(30)]
  lines += ["not json", _with(b_clicks=-1)]
  path = _write(tmp_path / "log.jsonl", lines)
  cfg = config_lib.replace(config_lib.Config(), **{"data.path": str(path)})
  summary = inspect_logs.run(cfg, tmp_path / "run")
  out = json.loads((tmp_path / "run" / "inspect.json").read_text())
  assert (
    (out["records_ok"], out["records_rejected"])
    == (30, 2)
    == (summary["records_ok"], summary["records_rejected"])
  )
  assert out["quarantine_path"] == str(tmp_path / "run" / "quarantine.jsonl")
  assert set(out["bin_edges"]) == set(cfg.behavior.names)
  assert all(len(e) == cfg.behavior.num_bins + 1 for e in out["bin_edges"].values())
  assert out["behavior_stats"]["likes"]["max"] == 29
  assert (tmp_path / "run" / "bin_edges.json").exists()
  assert out["samples"][0]["text"].startswith("Of the users who saw this answer")
  strict = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, on_error="fail"))
  with pytest.raises(BadRecordError, match=":31: field '<line>'"):
    inspect_logs.run(strict, tmp_path / "run2")
