"""One run per workdir (training/locking.py): a second run fails at once naming the holder, a killed holder
leaves no lock, and the CLI refuses a busy workdir in one message. (SIGTERM and resume: tests/test_train.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from diffblocks_jax.training import locking
from helpers import ROOT, run_cli

HOLD = """
import sys, time
from diffblocks_jax.training import locking
with locking.WorkdirLock(sys.argv[1]):
  print('held', flush=True)
  time.sleep(600)
"""


def hold_in_subprocess(workdir) -> subprocess.Popen:
  proc = subprocess.Popen([sys.executable, '-c', HOLD, str(workdir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'held'
  return proc


def test_second_lock_fails_at_once_naming_the_holder(tmp_path):
  with locking.WorkdirLock(str(tmp_path)):
    with pytest.raises(locking.WorkdirBusyError, match=rf'in use by process {os.getpid()} on .*--workdir'):
      with locking.WorkdirLock(str(tmp_path)):
        pass
  with locking.WorkdirLock(str(tmp_path)):  # Released on exit: the next run gets it.
    pass


def test_a_killed_holder_leaves_no_lock(tmp_path):
  proc = hold_in_subprocess(tmp_path)
  try:
    with pytest.raises(locking.WorkdirBusyError, match=f'process {proc.pid}'):
      locking.WorkdirLock(str(tmp_path)).__enter__()
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  with locking.WorkdirLock(str(tmp_path)):  # The kernel dropped the dead process's lock.
    pass


@pytest.mark.slow  # A CLI run.
def test_cli_refuses_a_busy_workdir_with_one_message(tmp_path):
  proc = hold_in_subprocess(tmp_path)
  try:
    result = run_cli('--config=configs/testing.py:vit', f'--workdir={tmp_path}')
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert result.returncode == 2, result.stderr[-2000:]
  assert f'is in use by process {proc.pid}' in result.stderr and 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'config.json')  # Refused before writing anything.


def test_a_run_refused_before_writing_leaves_no_folder_it_made(tmp_path):
  """The lock makes a new workdir; a run that fails before writing anything takes it away again, and leaves a
  folder that existed, or one something was written into, as it is."""
  new = tmp_path / 'new'
  with pytest.raises(ValueError), locking.WorkdirLock(str(new)):
    raise ValueError('refused')
  assert not new.exists()
  with pytest.raises(ValueError), locking.WorkdirLock(str(new)):
    (new / 'config.json').write_text('{}')
    raise ValueError('refused after writing')
  assert (new / 'config.json').exists()
  old = tmp_path / 'old'
  old.mkdir()
  with pytest.raises(ValueError), locking.WorkdirLock(str(old)):
    raise ValueError('refused')
  assert old.exists()
  with locking.WorkdirLock(str(tmp_path / 'done')):
    pass
  assert (tmp_path / 'done' / locking.LOCK_FILE).exists()  # A run that ends normally keeps its folder.
