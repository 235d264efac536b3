"""One run per workdir (locking.py), and SIGTERM: save the current step, exit 75, resume bit for bit (train.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import chex
import pytest

from diffblocks_jax import config as config_lib
from diffblocks_jax.training import experiment, locking, train
from helpers import HANG_GUARD_S, ROOT, cached_env, cli_command, run_cli, subprocess_env

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


# ----------------------------------------------------------------------------------------------- SIGTERM

def digits_flags(workdir) -> list[str]:
  """A short digits baseline: 3 epochs x 11 steps, a chunk of 3 steps per compiled call, checkpoint every 6."""
  return ['--config=configs/digits_vit.py', f'--workdir={workdir}', '--config.train.num_epochs=3',
          '--config.train.batch_size=128', '--config.train.steps_per_call=3', '--config.train.log_every_steps=3',
          '--config.train.checkpoint_every_steps=6', '--config.train.eval_every_epochs=1',
          '--config.model.num_layers=2', '--config.model.hidden_size=32', '--config.model.mlp_dim=64',
          '--library_logs',  # POINTS include an Orbax INFO line
          '--verbosity=1']  # and the data loader's debug line.


def run_and_terminate(workdir, after: str | None, env=None) -> subprocess.CompletedProcess:
  """Starts a run; sends SIGTERM once `after` appears in its log (at once if None); waits for it to end."""
  proc = subprocess.Popen(cli_command(*digits_flags(workdir)), cwd=ROOT, stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True, env=subprocess_env() if env is None else env)
  log = []
  deadline = time.monotonic() + HANG_GUARD_S
  try:
    if after is None:
      time.sleep(0.5)
      proc.send_signal(signal.SIGTERM)
    for line in proc.stderr:
      log.append(line)
      if after is not None and after in line:
        proc.send_signal(signal.SIGTERM)
        after = '\0'  # Once.
      if time.monotonic() > deadline:
        break
    proc.wait(timeout=HANG_GUARD_S)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return subprocess.CompletedProcess(proc.args, proc.returncode, '', ''.join(log))


def final_state(workdir):
  config = config_lib.load_workdir(str(workdir))
  exp, state = experiment.load_trained(config, str(workdir))
  assert int(state.step) == exp.total_steps
  return state


# Points in a run where SIGTERM lands: while loading the data (a debug line, hence --verbosity=1), while compiling the first chunk, after progress
# lines early, mid-way and late in the run, right after a checkpoint save starts, after an evaluation, and on the
# last progress line (the only one that may come too late: three steps are left when it is printed).
POINTS = ['Loaded digits', 'Starting from scratch', 'step 3/33', 'Started save checkpoint', 'step 9/33',
          'test accuracy', 'step 21/33', 'step 30/33']


@pytest.mark.slow
def test_sigterm_at_several_points_saves_and_resumes_bit_for_bit(tmp_path):
  # One persistent XLA cache: the 17 runs compile once, not 17 times.
  clean, env = tmp_path / 'clean', cached_env(tmp_path / 'xla_cache')
  result = run_cli(*digits_flags(clean), env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  want = final_state(clean)
  preempted = []
  for i, point in enumerate(POINTS):
    workdir = tmp_path / f'term{i}'
    stopped = run_and_terminate(workdir, point, env)
    if stopped.returncode == 0:  # The run finished before the signal could land: nothing to check there.
      continue
    assert stopped.returncode == train.EXIT_PREEMPTED, (point, stopped.stderr[-3000:])
    preempted.append(point)
    assert 'Stopped by SIGTERM at step' in stopped.stderr and 'Run the same command to resume' in stopped.stderr
    assert 'Traceback' not in stopped.stderr, (point, stopped.stderr[-3000:])
    resumed = run_cli(*digits_flags(workdir), env=env)
    assert resumed.returncode == 0, (point, resumed.stderr[-3000:])
    chex.assert_trees_all_equal(final_state(workdir), want)
  # Only the last point may come too late (three steps were left when its line was printed).
  assert preempted[:len(POINTS) - 1] == POINTS[:-1], preempted
