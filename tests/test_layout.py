"""The package's structure, read from its source (ast): small modules, no import circle, and each
registry the only place that branches on its config string."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "rlhb_jax"
MODULES = {
  ".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): p
  for p in sorted(ROOT.rglob("*.py"))
}
MAX_LINES = 400


def _tree(name: str) -> ast.Module:
  return ast.parse(MODULES[name].read_text(encoding="utf-8"), filename=str(MODULES[name]))


def _module_level_imports(name: str) -> set[str]:
  """The rlhb_jax modules that `name` imports by name in its top-level import statements (also
  under if/try at top level, not under `if TYPE_CHECKING:` nor inside functions or classes)."""
  out: set[str] = set()
  package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]

  def visit(stmts):
    for node in stmts:
      if isinstance(node, ast.If):
        if "TYPE_CHECKING" not in ast.unparse(node.test):
          visit(node.body)
        visit(node.orelse)
      elif isinstance(node, ast.Try):
        visit(node.body + node.orelse + node.finalbody)
        for handler in node.handlers:
          visit(handler.body)
      elif isinstance(node, ast.Import):
        out.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative import
          parts = package.split(".")[: len(package.split(".")) - node.level + 1]
          base = ".".join(parts + ([base] if base else []))
        for alias in node.names:  # `from pkg import sub` names the submodule, else pkg
          out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)

  visit(_tree(name).body)
  # Only the modules named: the parent packages a submodule's import runs first are not edges
  # (Python has run them before the submodule starts, so they cannot close a circle at import).
  return {m for m in out if m in MODULES and m != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}
  stack: list[str] = []

  def dfs(node: str) -> list[str] | None:
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state and (found := dfs(nxt)):
        return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (found := dfs(node)):
      return found
  return None


def test_no_module_is_over_400_lines():
  long = {n: c for n, p in MODULES.items() if (c := len(p.read_text().splitlines())) > MAX_LINES}
  assert long == {}


def test_no_import_circle_between_modules():
  graph = {name: _module_level_imports(name) for name in MODULES}
  assert _cycle(graph) is None
  assert "rlhb_jax.config" in graph["rlhb_jax.run"]  # the reader sees real edges


def test_the_cycle_finder_finds_a_circle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def _compared_attributes(name: str) -> set[str]:
  """Dotted attribute chains (e.g. `cfg.reward.source`) compared with ==, !=, in or match."""
  out = set()
  for node in ast.walk(_tree(name)):
    if isinstance(node, ast.Compare):
      operands = [node.left, *node.comparators]
    elif isinstance(node, ast.Match):
      operands = [node.subject]
    else:
      continue
    out.update(ast.unparse(o) for o in operands if isinstance(o, ast.Attribute))
  return out


@pytest.mark.parametrize(
  "suffix, owner",
  [
    ("reward.source", "rlhb_jax.methods.ppo.rewards"),
    ("ppo.advantage", "rlhb_jax.methods.ppo.advantages"),
    (".mode", "rlhb_jax.main"),
  ],
)
def test_a_config_string_is_branched_only_in_its_registry(suffix, owner):
  branched = {
    name: hits
    for name in MODULES
    if name != owner and (hits := {a for a in _compared_attributes(name) if a.endswith(suffix)})
  }
  assert branched == {}


def test_modes_are_listed_once():
  """MODES in main.py is the only table of modes: no other module spells three mode names."""
  from rlhb_jax.main import MODES

  for name in MODULES:
    if name == "rlhb_jax.main":
      continue
    strings = {
      n.value for n in ast.walk(_tree(name)) if isinstance(n, ast.Constant) and n.value in MODES
    }
    assert len(strings & {"pipeline", "generate", "simulate", "inspect_logs", "serve"}) < 3, name


def test_only_the_http_layer_imports_the_web_framework():
  """Serving logic is free of HTTP: fastapi, starlette and uvicorn are imported in http.py only."""
  web = ("fastapi", "starlette", "uvicorn")
  users = set()
  for name in MODULES:
    for node in ast.walk(_tree(name)):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        targets = [node.module or ""]
      else:
        continue
      if any(t.split(".")[0] in web for t in targets):
        users.add(name)
  assert users == {"rlhb_jax.serving.http"}
