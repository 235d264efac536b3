"""The package's layering: data flows config → data → models/tasks → core → loop, and nothing imports back up.

Read from the source with `ast` (nothing is imported), so a new module that reaches up the chain fails here.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'diffblocks_jax'

# What each layer may import from the package (besides itself). The loop (train.py and its helpers) and the
# tools sit on top and may import anything below them.
ALLOWED = {
    'core': {'core'},
    'data': {'data'},
    'models': {'models', 'core'},
    'tasks': {'tasks', 'core', 'models', 'config', 'data'},  # A task makes its batches from the data's rows.
    'config': set(),
}


def layer(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE).with_suffix('').parts
  return parts[0]


def package_imports(path: pathlib.Path) -> set[str]:
  """Top-level package names (e.g. 'core', 'train') that `path` imports from diffblocks_jax."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('diffblocks_jax'):
      rest = node.module.split('.')[1:]
      out.update([rest[0]] if rest else [alias.name for alias in node.names])
    elif isinstance(node, ast.Import):
      out.update(a.name.split('.')[1] for a in node.names if a.name.startswith('diffblocks_jax.'))
  return out


def modules():
  return sorted(p for p in PACKAGE.rglob('*.py') if p.name != '__init__.py')


def test_no_module_imports_up_the_chain():
  problems = []
  for path in modules():
    name = layer(path)
    if name not in ALLOWED:
      continue
    bad = package_imports(path) - ALLOWED[name] - {name}
    if bad:
      problems.append(f'{path.relative_to(PACKAGE)} imports {sorted(bad)}')
  assert not problems, problems


def test_no_import_cycles_between_modules():
  """Module-level graph (diffblocks_jax.a.b → diffblocks_jax.c): acyclic."""
  graph = {}
  for path in modules():
    name = '.'.join(path.relative_to(PACKAGE).with_suffix('').parts)
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('diffblocks_jax'):
        base = node.module.removeprefix('diffblocks_jax').lstrip('.')
        for alias in node.names:
          full = f'{base}.{alias.name}' if base else alias.name
          targets.add(full if (PACKAGE / (full.replace('.', '/') + '.py')).exists() else base)
    graph[name] = {t for t in targets if t and t != name}
  seen, stack = set(), []

  def visit(node):
    if node in stack:
      raise AssertionError(f'import cycle: {" -> ".join(stack[stack.index(node):] + [node])}')
    if node in seen:
      return
    stack.append(node)
    for nxt in graph.get(node, ()):
      visit(nxt)
    stack.pop()
    seen.add(node)

  for node in graph:
    visit(node)
  assert 'core.steps' in graph and 'training.train' in graph  # The walk saw the package.


def test_the_checker_sees_an_upward_import(tmp_path):
  bad = tmp_path / 'm.py'
  bad.write_text('from diffblocks_jax import train\nfrom diffblocks_jax.core import blocks\n')
  assert package_imports(bad) == {'train', 'core'}
