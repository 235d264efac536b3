"""Paths as a person means them (relative to where they typed the command, or to the repository root, where the
README's commands run while notebooks' kernels run in notebooks/), and a workdir that cannot be written, said in
one line."""

from __future__ import annotations

import errno
import glob
import os
import shutil

# Failed writes that are the disk's or the folder's, not the program's: a full disk or quota, a read-only mount,
# no permission.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class WorkdirWriteError(OSError):
  """A write in the workdir failed for want of space or permission; the message names the folder, the free space
  and what was saved last."""

  @classmethod
  def of(cls, error: OSError, workdir: str) -> WorkdirWriteError:
    where = error.filename or workdir
    return cls(error.errno, f'cannot write {where}: {os.strerror(error.errno).lower()} '
                            f'({free_space(where)}). {last_saved(workdir)} Free space (or fix the permissions) and run '
                            'the same command again to resume.')

  def __str__(self) -> str:
    return self.strerror


def free_space(path: str) -> str:
  """'12 MB free of 3.0 GB' on the disk holding `path` (or its nearest existing folder)."""
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  usage = shutil.disk_usage(path)
  return f'{_size(usage.free)} free of {_size(usage.total)}'


def _size(n: float) -> str:
  for unit in ('B', 'kB', 'MB', 'GB'):
    if n < 1000:
      return f'{n:.3g} {unit}'
    n /= 1000
  return f'{n:.3g} TB'


def last_saved(workdir: str) -> str:
  """Which checkpoint a person can resume from, read off the folder (no Orbax: the disk may be failing)."""
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, 'checkpoints', '*'))
                 if os.path.basename(p).isdigit())
  return (f'Checkpoint step {steps[-1]} in {os.path.join(os.path.abspath(workdir), "checkpoints")} is saved and '
          'intact.' if steps else 'No checkpoint was saved yet.')


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
