"""rlhb_jax's layers, read from its source: `python experiments/layers.py [OUT.png]`.

Module-level imports between rlhb_jax modules (`ast`; not under `if TYPE_CHECKING:` nor inside
functions), one box per subpackage and per root module. The top row: main.py (and any root module
nothing imports) and config.py, which every package reads and which imports each package's config
section; below, a topological order (a box above what it imports), run.py included. A package-level
cycle is printed, and its weaker edge (fewer imports) drawn in red. Writes docs/img/layers.png.
"""

from __future__ import annotations

import ast
import collections
import graphlib
import math
import pathlib
import sys
import textwrap

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

STYLES = {  # the edge of a cycle cut; to and from config; an edge a longer path also gives
  "cut": {"color": "#c0392b", "lw": 1.5},
  "config": {"color": "#9aa5b1", "lw": 0.6, "linestyle": ":"},
  True: {"color": "#b0b8c0", "lw": 0.7},
}
ROOT = pathlib.Path(__file__).resolve().parents[1] / "rlhb_jax"
MODULES = {
  ".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): p
  for p in sorted(ROOT.rglob("*.py"))
}


def module_imports(name: str) -> set[str]:
  """The rlhb_jax modules `name` imports at module level (read as tests/test_layout.py does)."""
  path, out = MODULES[name], set()
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]

  def visit(stmts):
    for node in stmts:
      if isinstance(node, ast.If):  # not the body of `if TYPE_CHECKING:`
        visit(node.orelse if "TYPE_CHECKING" in ast.unparse(node.test) else node.body + node.orelse)
      elif isinstance(node, ast.Try):
        visit(node.body + node.orelse + node.finalbody + [n for h in node.handlers for n in h.body])
      elif isinstance(node, ast.Import):
        out.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the package, level - 1 steps up
          parts = package.split(".")[: len(package.split(".")) - node.level + 1]
          base = ".".join(parts + ([base] if base else []))
        subs = [f"{base}.{a.name}" for a in node.names]  # `from pkg import sub` names sub
        out.update(sub if sub in MODULES else base for sub in subs)

  visit(ast.parse(path.read_text(encoding="utf-8")).body)
  return {m for m in out if m in MODULES and m != name}


def box(module: str) -> str:
  """rlhb_jax.methods.ppo.step -> methods; rlhb_jax.run -> run."""
  return module.split(".")[1] if "." in module else module


def package_graph() -> dict[tuple[str, str], list[str]]:
  """(importer box, imported box) -> the module-level imports behind that edge."""
  edges = collections.defaultdict(list)
  for name in MODULES:
    for dep in module_imports(name):
      if box(name) != box(dep) and "rlhb_jax" not in (box(name), box(dep)):
        edges[box(name), box(dep)].append(f"{name} -> {dep}")
  return dict(edges)


def layers(nodes: list[str], edges: dict) -> tuple[list[list[str]], set[tuple[str, str]]]:
  """`nodes` in rows (each above what it imports) and the edges cut to break cycles (printed)."""
  kept, cuts = {e for e in edges if e[0] in nodes and e[1] in nodes}, set()

  def cut(cycle: list[str]) -> None:
    print("package cycle: " + " -> ".join(cycle))
    pairs = list(zip(cycle, cycle[1:], strict=False))
    for p in pairs:
      print(f"  {p[0]} -> {p[1]}: " + "; ".join(sorted(edges[p])))
    weak = min(pairs, key=lambda p: len(edges[p]))
    kept.discard(weak)
    cuts.add(weak)

  for a, b in sorted(kept):  # two boxes importing each other first: the weaker way is cut
    if {(a, b), (b, a)} <= kept and len(edges[a, b]) <= len(edges[b, a]):
      cut([a, b, a])
  deps = lambda n: {b for a, b in kept if a == n}
  while True:
    try:  # dependencies first
      order = list(graphlib.TopologicalSorter({n: deps(n) for n in nodes}).static_order())
      break
    except graphlib.CycleError as e:
      cut(e.args[1][::-1])  # graphlib lists it against the import direction
  height = {}
  for n in order:
    height[n] = 1 + max((height[b] for b in deps(n)), default=-1)
  top = max(height.values())
  return [sorted(n for n in nodes if height[n] == h) for h in range(top, -1, -1)], cuts


def shortcuts(edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
  """The edges a -> b that a longer path a -> c -> ... -> b also gives."""
  out = collections.defaultdict(set)
  for a, b in edges:
    out[a].add(b)
  reach = dict(out)
  for _ in out:  # transitive closure, one more step per round
    reach = {a: s.union(*(reach.get(b, ()) for b in s)) for a, s in reach.items()}
  return {(a, b) for a, b in edges if any(b in reach.get(c, ()) for c in out[a] - {b})}


def draw(rows: list[list[str]], edges: dict, cuts: set, out: pathlib.Path) -> None:
  plt.switch_backend("agg")
  fig, ax = plt.subplots(figsize=(13, 1.6 * len(rows)))
  pos, w, h, dy = {}, 2.3, 0.7, 1.6
  for r, row in enumerate(rows):  # below row 1, each row ordered by the mean x of its importers
    xs = lambda n: [pos[a][0] for a, b in edges if b == n and a in pos] or [6.0]
    row.sort(key=lambda n: sum(xs(n)) / len(xs(n)) if r > 1 else 0)
    for i, n in enumerate(row):
      pos[n] = ((i + 0.5) * 12.0 / len(row) + 0.7 * (r % 2 - 0.5) * (len(row) == 2), -dy * r)
  for n, (x, y) in pos.items():
    mods = sorted({m.rsplit(".", 1)[-1] for m in MODULES if box(m) == n} - {n})
    face = "#fff4e0" if (ROOT / n).is_dir() else "#e8eef7"
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, "round,pad=0.03", fc=face, ec="k"))
    ax.text(x, y + (0.15 if mods else 0), n, ha="center", va="center", fontsize=11, weight="bold")
    ax.text(x, y - 0.14, textwrap.fill(", ".join(mods), 44), ha="center", va="center", fontsize=6)
  light = shortcuts({e for e in edges if "config" not in e and e not in cuts})
  spread = lambda d: max(-0.35 * w, min(0.35 * w, 0.12 * d))
  for (a, b), why in sorted(edges.items()):
    (xa, ya), (xb, yb) = pos[a], pos[b]
    sign = 1 if ya > yb else -1  # 1: down the rows; -1: up (or sideways in the top row)
    start = (xa + spread(xb - xa), ya - sign * h / 2)
    end = (xb + spread(xa - xb), yb + sign * h / 2)
    if ya == yb:
      side = math.copysign(w / 2, xb - xa)
      start, end = (xa + side, ya), (xb - side, yb)
    kind = "cut" if (a, b) in cuts else "config" if "config" in (a, b) else (a, b) in light
    style = STYLES.get(kind, {"color": "#333", "lw": 0.6 + 0.3 * min(len(why), 6)})
    arc = f"arc3,rad={0.0 if sign == 1 or ya == yb else 0.2}"
    ax.add_patch(
      FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=9, connectionstyle=arc, **style)
    )
  ax.set(xlim=(-0.3, 12.3), ylim=(-dy * (len(rows) - 1) - 0.6, 0.6))
  ax.axis("off")
  legend = "dotted: to and from config; light: also via another package; red: cut from a cycle"
  ax.set_title(f"rlhb_jax: imports between packages (importer -> imported)\n{legend}", fontsize=9)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=130, bbox_inches="tight")
  print(f"wrote {out}")


def main() -> None:
  out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ROOT.parent / "docs/img/layers.png")
  edges = package_graph()
  boxes = sorted({box(m) for m in MODULES} - {"rlhb_jax"})
  for a, b in sorted(e for e in edges if e[0] == "config" and (e[1], e[0]) in edges):
    print(f"mutual: {a} <-> {b} ({len(edges[a, b])} and {len(edges[b, a])} imports)")
  top = [n for n in boxes if n not in {b for _, b in edges} and not (ROOT / n).is_dir()]
  top.insert(1, "config")  # main, config, then any other root module nothing imports
  rows, cuts = layers([n for n in boxes if n not in top], edges)
  print("\n".join("layer: " + ", ".join(row) for row in rows))
  draw([top, *rows], edges, cuts, out)


if __name__ == "__main__":
  main()
