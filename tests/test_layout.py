"""The package's layering: data flows config → data → models/tasks → core → loop, and nothing imports back up.

Read from the source with `ast` (nothing is imported), so a new module that reaches up the chain fails here.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'diffblocks_jax'

# What each layer may import from the package (besides itself), bottom to top. The kind registry imports
# nothing, so everything may read it (the config's validation first). The entry points (main, cli, tools) sit on
# top and may import anything but each other's flags.
ALLOWED = {
    'tasks.registry': set(),
    'config': {'tasks.registry'},
    'core': set(),
    'data': {'tasks.registry'},
    'models': {'core', 'tasks.registry'},
    'tasks': {'core', 'models', 'config', 'data', 'tasks.registry'},  # A task makes its batches from data rows.
    'training': {'tasks', 'models', 'core', 'config', 'data', 'tasks.registry'},
    'cli': {'training', 'tasks', 'models', 'core', 'config', 'data', 'tasks.registry'},
    'tools': {'training', 'tasks', 'models', 'core', 'config', 'data', 'tasks.registry'},
    'main': {'cli', 'training', 'tasks', 'models', 'core', 'config', 'data', 'tasks.registry'},
}
TOP_LEVEL_MODULES = 4  # __init__, main, cli, config: everything else lives in a package that says what it is.


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def layer(name: str) -> str:
  """The most specific ALLOWED key that `name` (a dotted module name) falls under."""
  found = [key for key in ALLOWED if name == key or name.startswith(key + '.')]
  assert found, f'diffblocks_jax.{name} belongs to no layer of tests/test_layout.py'
  return max(found, key=len)


def imported_modules(path: pathlib.Path) -> set[str]:
  """Dotted names (e.g. 'core.steps', 'tasks.registry', 'config') that `path` imports from diffblocks_jax."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('diffblocks_jax'):
      base = node.module.removeprefix('diffblocks_jax').lstrip('.')
      for alias in node.names:
        full = f'{base}.{alias.name}' if base else alias.name
        is_module = (PACKAGE / (full.replace('.', '/') + '.py')).exists() or (PACKAGE / full.replace('.', '/')).is_dir()
        out.add(full if is_module else base)
    elif isinstance(node, ast.Import):
      out.update(a.name.removeprefix('diffblocks_jax.') for a in node.names if a.name.startswith('diffblocks_jax.'))
  return {name for name in out if name}


def package_imports(path: pathlib.Path) -> set[str]:
  """Top-level package names (e.g. 'core', 'train') that `path` imports from diffblocks_jax."""
  return {name.split('.')[0] for name in imported_modules(path)}


def modules():
  return sorted(PACKAGE.rglob('*.py'))


def test_no_module_imports_up_the_chain():
  """Every module of the package has a layer, and imports only from its own layer or the ones ALLOWED."""
  problems = []
  assert not imported_modules(PACKAGE / '__init__.py')  # Importing the package loads nothing else.
  for path in modules():
    if path == PACKAGE / '__init__.py':
      continue
    own = layer(module_name(path))
    bad = sorted(name for name in imported_modules(path)
                 if layer(name) != own and layer(name) not in ALLOWED[own])
    if bad:
      problems.append(f'{path.relative_to(PACKAGE)} ({own}) imports {bad}')
  assert not problems, problems


def test_the_package_has_few_top_level_modules():
  top = sorted(p.name for p in PACKAGE.glob('*.py'))
  assert len(top) <= TOP_LEVEL_MODULES, top


def test_each_model_kind_is_named_in_at_most_two_modules():
  """A kind's quoted name appears in its registry entry and at most one other module (its model or task); the
  loop, evaluation and config look kinds up instead (tools/ may name them: they pick settings)."""
  from diffblocks_jax.tasks import registry  # pylint: disable=g-import-not-at-top
  sources = {p: p.read_text() for p in PACKAGE.rglob('*.py') if 'tools' not in p.relative_to(PACKAGE).parts}
  for kind in registry.KINDS:
    named = sorted(str(p.relative_to(PACKAGE)) for p, text in sources.items()
                   if f"'{kind}'" in text or f'"{kind}"' in text)
    assert 'tasks/registry.py' in named and len(named) <= 2, (kind, named)


def test_no_import_cycles_between_modules():
  """Module-level graph (diffblocks_jax.a.b → diffblocks_jax.c): acyclic."""
  graph = {module_name(path): imported_modules(path) - {module_name(path)} for path in modules()}
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
  bad.write_text('from diffblocks_jax.training import train\nfrom diffblocks_jax.core import blocks\n'
                 'from diffblocks_jax import config\n')
  assert imported_modules(bad) == {'training.train', 'core.blocks', 'config'}
  assert package_imports(bad) == {'training', 'core', 'config'}
  # As a module of core/, both imports from above its layer are refused.
  assert sorted(n for n in imported_modules(bad) if layer(n) != 'core' and layer(n) not in ALLOWED['core']) == [
      'config', 'training.train']
  assert layer('tasks.registry') == 'tasks.registry' and layer('tasks.generation') == 'tasks'
