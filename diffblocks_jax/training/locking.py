"""One training run per workdir: an advisory lock held for the run's life (WORKDIR/.lock).

Two runs in one workdir would interleave metrics, overwrite each other's config.json and checkpoints, or crash
inside Orbax. The lock is `fcntl.flock` on an open file: the kernel drops it when the holder exits in any way
(SIGKILL included), so a killed run never leaves a lock that blocks the next one. The file keeps the holder's
host, pid and start time, for the message the second run prints. Only process 0 of a multi-host run takes it.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket

LOCK_FILE = '.lock'


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir; the message names it and what to do."""


class WorkdirLock:
  """`with WorkdirLock(workdir):` the body runs alone in `workdir`, or WorkdirBusyError is raised at once."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.enabled = enabled
    self._file = None
    self._made = False  # Whether __enter__ made the workdir (then a run refused before writing removes it).

  def __enter__(self) -> WorkdirLock:
    if not self.enabled:
      return self
    self._made = not os.path.exists(os.path.dirname(self.path))
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    f = open(self.path, 'a+')  # pylint: disable=consider-using-with  (held until __exit__)
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip()
      f.close()
      try:
        who = json.loads(holder)
        who = f'process {who["pid"]} on {who["host"]} (started {who["started"]})'
      except (ValueError, KeyError, TypeError):
        who = 'another process'
      raise WorkdirBusyError(
          f'{os.path.dirname(self.path)} is in use by {who}. Wait for that run to finish or stop it, or give '
          'this run another --workdir.') from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                        'started': datetime.datetime.now().isoformat(timespec='seconds')}))
    f.flush()
    self._file = f
    return self

  def __exit__(self, exc_type, *exc) -> None:
    if self._file is not None:
      workdir = os.path.dirname(self.path)
      if exc_type is not None and self._made and os.listdir(workdir) == [LOCK_FILE]:
        # A run refused before it wrote anything (a bad config, an init_from that does not fit) leaves no folder
        # behind. The file goes while still locked: a run that opens it meanwhile finds it busy.
        os.remove(self.path)
        try:
          os.rmdir(workdir)
        except OSError:  # Something appeared in it after all: keep the folder.
          pass
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None
