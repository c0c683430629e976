"""The package's shape: imports go one way, and no strategy is named outside strategies/.

Both read the source (ast), so they hold for imports inside functions too.
"""

import ast
import os

import ccr_jax
from ccr_jax import strategies

ROOT = os.path.dirname(ccr_jax.__file__)


def _modules() -> dict[str, str]:
  """Dotted module name -> path, for every module of ccr_jax."""
  out = {}
  for dirpath, _, names in os.walk(ROOT):
    for name in names:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, name), os.path.dirname(ROOT))
        module = rel[:-3].replace(os.sep, ".")
        out[module.removesuffix(".__init__")] = os.path.join(dirpath, name)
  return out


def import_graph() -> dict[str, set[str]]:
  """module -> the ccr_jax modules it imports (at any depth of its code)."""
  modules = _modules()
  graph = {}
  for module, path in modules.items():
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    deps = set()
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                          + ([base] if base else []))
        # `from a import b` imports a.b when b is a module, else a.
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in node.names]
      else:
        continue
      deps |= {n for n in names if n in modules and n != module}
    graph[module] = deps
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None (depth-first search)."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for dep in sorted(graph[node]):
      if state.get(dep) == 1:
        return path[path.index(dep):] + [dep]
      if dep not in state:
        found = visit(dep)
        if found:
          return found
    state[node] = 2
    path.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_find_cycle_finds_one_and_only_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [
      "a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
  graph = import_graph()
  # The graph is real: the loop reaches the stages, the stages the library.
  assert {"ccr_jax.run.training", "ccr_jax.run.results"} <= graph["ccr_jax.run.loop"]
  assert "ccr_jax.strategies.base" in graph["ccr_jax.strategies.importance"]
  assert find_cycle(graph) is None, find_cycle(graph)


def test_nothing_below_the_run_package_imports_it():
  graph = import_graph()
  upward = {m: sorted(d for d in deps if d.startswith("ccr_jax.run"))
            for m, deps in graph.items()
            if not m.startswith("ccr_jax.run") and m != "ccr_jax.main"}
  assert not {m: d for m, d in upward.items() if d}


def test_no_strategy_is_named_outside_strategies():
  """No identifier or string literal outside strategies/ is a strategy's name."""
  names = set(strategies.names())
  found = []
  for module, path in _modules().items():
    if module.startswith("ccr_jax.strategies"):
      continue
    for node in ast.walk(ast.parse(open(path).read())):
      value = (node.id if isinstance(node, ast.Name) else node.attr
               if isinstance(node, ast.Attribute) else node.arg
               if isinstance(node, ast.arg) else node.value
               if isinstance(node, ast.Constant) and isinstance(node.value, str)
               else None)
      if value in names:
        found.append(f"{module}:{node.lineno} {value}")
  assert not found
