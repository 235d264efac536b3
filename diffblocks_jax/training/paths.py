"""Paths as a person means them: relative to where they typed the command, or to the repository root (where
the README's commands run, while notebooks' kernels run in notebooks/)."""

from __future__ import annotations

import os


def resolve_path(path: str) -> str:
  """A path as the person meant it: absolute; or relative to the current folder if it exists there; else
  relative to the repository root. Notebooks' kernels run in notebooks/, while paths like
  'workdirs/digits_dblock' are written from the root, where the README's commands run."""
  path = os.path.expanduser(path)
  if os.path.isabs(path) or os.path.exists(path):
    return path
  root = repository_root()
  return os.path.join(root, path) if root else path


def repository_root() -> str | None:
  """The folder holding pyproject.toml: above the current folder, else above this package (an editable
  install); None if neither has one (an installed wheel run elsewhere)."""
  for start in (os.getcwd(), os.path.dirname(os.path.abspath(__file__))):
    folder = os.path.abspath(start)
    while True:
      if os.path.exists(os.path.join(folder, 'pyproject.toml')):
        return folder
      parent = os.path.dirname(folder)
      if parent == folder:
        break
      folder = parent
  return None
