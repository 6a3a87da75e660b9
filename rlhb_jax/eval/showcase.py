"""What the demo shows a newcomer: the users' ceiling, the answers RLHB changed, the behavior knob,
and one self-contained HTML report (runs/<dir>/report.html).

- The ceiling: the best expected like rate any response of the simulator's templates earns on each
  evaluation query (`Simulator.ceiling`); each method's share of the gap SFT leaves to it is
  (method - SFT) / (ceiling - SFT).
- Changed answers: the queries where RLHB's greedy answer differs from SFT's, ranked by the users'
  like-rate difference.
- The knob: the RLHB generator answering the same queries under the most preferred behavior
  sentence, the least preferred one and a mixed one (its sources clicked, the answer not liked).
"""

from __future__ import annotations

import base64
import html
import pathlib
from collections.abc import Sequence

import numpy as np

from rlhb_jax.data.behavior import least_preferred_bins, most_preferred_bins, verbalize
from rlhb_jax.eval.evaluate import CITE_KEYS, RATE_KEYS, ground_truth, respond
from rlhb_jax.infra.report import format_table
from rlhb_jax.run import Run


def ceiling(run: Run, queries: Sequence[str]) -> float:
  """The mean over `queries` of the best like rate the simulator's templates allow."""
  return float(np.mean([run.simulator.ceiling(q)[0] for q in queries]))


def gap_closed(method: float, sft: float, top: float) -> float | None:
  """(method - SFT) / (ceiling - SFT); None when SFT is already at the ceiling."""
  return (method - sft) / (top - sft) if top - sft > 1e-9 else None


def changed_answers(samples: Sequence[dict], base: str = "sft", new: str = "rlhb") -> dict:
  """The queries whose `new` answer differs from `base`'s, ranked by the like-rate difference:
  {"changed", "total", "gains": the two largest gains, "loss": the largest loss or None}."""
  diffs = []
  for s in samples:
    if " ".join(s[base].split()) != " ".join(s[new].split()):
      like = {f"like_{m}": s["like"][m] for m in (base, new)}
      d = like[f"like_{new}"] - like[f"like_{base}"]
      diffs.append({"query": s["query"], base: s[base], new: s[new], **like, "diff": d})
  diffs.sort(key=lambda x: -x["diff"])
  gains = [d for d in diffs if d["diff"] > 0][:2]
  losses = [d for d in diffs if d["diff"] < 0]
  return {
    "changed": len(diffs),
    "total": len(samples),
    "gains": gains,
    "loss": losses[-1] if losses else None,
  }


def knob_behaviors(run: Run) -> dict[str, str]:
  """The behavior sentences the knob turns through: most preferred, least preferred, and mixed
  (most preferred, but with few likes: "most clicked a source, few liked it")."""
  cfg = run.cfg.behavior
  mixed = most_preferred_bins(cfg).copy()
  names = [t[0] for t in cfg.types]
  if "likes" in names:
    mixed[names.index("likes")] = 1 if cfg.num_bins > 1 else 0
  return {
    "most preferred": verbalize(most_preferred_bins(cfg), cfg),
    "least preferred": verbalize(least_preferred_bins(cfg), cfg),
    "mixed": verbalize(mixed, cfg),
  }


def knob(run: Run, model, queries: Sequence[str]) -> dict[str, dict]:
  """The generator's greedy answers under each knob sentence: the users' rates, accuracy, the
  citation shares and one example answer (the first query's)."""
  out = {}
  for name, sentence in knob_behaviors(run).items():
    answers = respond(run, model, queries, behavior=sentence)
    truth = ground_truth(run, queries, answers)
    out[name] = {
      "behavior": sentence,
      **{k: truth[k] for k in (*RATE_KEYS, *CITE_KEYS) if k in truth},
      "example": {"query": queries[0], "answer": answers[0]},
    }
  return out


def knob_table(k: dict[str, dict]) -> str:
  rows = [{"behavior sentence": n, **{c: v[c] for c in KNOB_COLUMNS}} for n, v in k.items()]
  return format_table(rows, ["behavior sentence", *KNOB_COLUMNS])


KNOB_COLUMNS = ("like_rate", "accuracy", "grounded_rate", "fabricated_rate")


def print_changed(changed: dict, base: str = "sft", new: str = "rlhb") -> None:
  print(f"answers changed by RLHB: {changed['changed']} of {changed['total']} held-out queries")
  if not changed["changed"]:
    print("  (RLHB answered every query exactly as SFT did)")
    return
  picks = [("gain", g) for g in changed["gains"]]
  if changed["loss"] is not None:
    picks.append(("loss", changed["loss"]))
  for label, d in picks:
    print(f"  largest {label} ({d['diff']:+.3f} like rate): {d['query']}")
    for m in (base, new):
      print(f"    {m:>5} [like {d['like_' + m]:.3f}]: {' '.join(d[m].split())}")


def _img(path: pathlib.Path) -> str:
  data = base64.b64encode(path.read_bytes()).decode()
  return f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"></figure>'


def write_report(
  path: pathlib.Path,
  table: str,
  plots: Sequence[pathlib.Path],
  changed: dict,
  knob_results: dict[str, dict] | None,
  header: str = "",
) -> pathlib.Path:
  """One self-contained HTML page (inline PNGs, no network): the results table, the training
  curves, the changed answers and the knob."""
  esc = html.escape
  parts = [
    "<!doctype html><html><head><meta charset='utf-8'><title>rlhb_jax demo report</title>",
    "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}pre{background:#f4f4f4;"
    "padding:1em;overflow-x:auto}img{max-width:480px}figure{display:inline-block;margin:0.5em}"
    "td,th{padding:0.2em 0.6em;text-align:left;vertical-align:top}</style></head><body>",
    "<h1>rlhb_jax demo report</h1>",
    f"<p>{esc(header)}</p>" if header else "",
    "<h2>Results on the held-out queries</h2>",
    f"<pre>{esc(table)}</pre>",
    "<h2>Training curves</h2>",
    *(_img(p) for p in plots if p.exists()),
    f"<h2>Answers RLHB changed: {changed['changed']} of {changed['total']}</h2>",
  ]
  if not changed["changed"]:
    parts.append("<p>RLHB answered every query exactly as SFT did.</p>")
  rows = [("largest gain", g) for g in changed["gains"]]
  if changed["loss"] is not None:
    rows.append(("largest loss", changed["loss"]))
  if rows:
    parts.append("<table><tr><th></th><th>query</th><th>SFT</th><th>RLHB</th></tr>")
    for label, d in rows:
      parts.append(
        f"<tr><td>{label} ({d['diff']:+.3f})</td><td>{esc(d['query'])}</td>"
        f"<td>{esc(d['sft'])} [{d['like_sft']:.3f}]</td>"
        f"<td>{esc(d['rlhb'])} [{d['like_rlhb']:.3f}]</td></tr>"
      )
    parts.append("</table>")
  if knob_results:
    parts.append("<h2>The behavior knob (the RLHB generator, one sentence at a time)</h2>")
    parts.append(f"<pre>{esc(knob_table(knob_results))}</pre><table>")
    for name, v in knob_results.items():
      ex = v["example"]
      parts.append(
        f"<tr><td>{esc(name)}</td><td><i>{esc(v['behavior'])}</i><br>{esc(ex['query'])} &rarr; "
        f"{esc(ex['answer'])}</td></tr>"
      )
    parts.append("</table>")
  parts.append("</body></html>")
  path.write_text("\n".join(parts))
  return path
