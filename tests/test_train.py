"""The loop (training/train.py) stopped from outside: SIGTERM at several points saves the current step, exits 75
and the same command resumes bit for bit; SIGKILL mid-run (no handler runs) then resume matches an uninterrupted
run. Real CLI runs in subprocesses on the digits, sharing one persistent XLA cache per test."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import chex
import numpy as np
import pytest

from diffblocks_jax import config as config_lib
from diffblocks_jax.training import experiment, train
from helpers import HANG_GUARD_S, ROOT, cached_env, cli_command, run_cli, subprocess_env


def final_state(workdir):
  """The finished run's restored state (every step trained)."""
  config = config_lib.load_workdir(str(workdir))
  exp, state = experiment.load_trained(config, str(workdir))
  assert int(state.step) == exp.total_steps
  return state


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


# Points in a run where SIGTERM lands: while loading the data (a debug line, hence --verbosity=1), while compiling
# the first chunk, after progress lines early, mid-way and late in the run, right after a checkpoint save starts,
# after an evaluation, and on the last progress line (the only one that may come too late: three steps are left
# when it is printed). The default suite stops at one of them, before the first step (Ctrl-C, the same stop flag, is
# pressed mid-run in tests/test_failures.py); all eight are opt-in (`long`): each point costs two CLI runs.
POINTS = ['Loaded digits', 'Starting from scratch', 'step 3/33', 'Started save checkpoint', 'step 9/33',
          'test accuracy', 'step 21/33', 'step 30/33']


def check_sigterm_points(tmp_path, points):
  # One persistent XLA cache: the runs compile once, not once per run.
  clean, env = tmp_path / 'clean', cached_env(tmp_path / 'xla_cache')
  result = run_cli(*digits_flags(clean), env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  want = final_state(clean)
  preempted = []
  for i, point in enumerate(points):
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
  # Only the last of all points may come too late (three steps were left when its line was printed).
  must = [p for p in points if p != POINTS[-1]]
  assert [p for p in preempted if p in must] == must, preempted


@pytest.mark.slow
def test_sigterm_while_loading_saves_step_zero_and_resumes_bit_for_bit(tmp_path):
  check_sigterm_points(tmp_path, POINTS[:1])


@pytest.mark.long
def test_sigterm_at_every_point_saves_and_resumes_bit_for_bit(tmp_path):
  check_sigterm_points(tmp_path, POINTS)


# ----------------------------------------------------------------------------------------------- SIGKILL

def _kill_config_flags(workdir):
  """The testing DiffusionBlocks model on the digits: 2 epochs, a checkpoint every 40 steps, the last two kept."""
  return ['--config=configs/testing.py:dblock', f'--workdir={workdir}', '--config.data.source=digits',
          '--config.data.mean=(0.3,)', '--config.data.std=(0.4,)', '--config.model.patch_size=2',
          '--config.train.num_epochs=2', '--config.train.checkpoint_every_steps=40',
          '--config.train.keep_checkpoints=2']


def _start(workdir):
  # One persistent XLA cache for the three runs (killed, resumed, clean): one compile, the same executable.
  env = cached_env(os.path.join(os.path.dirname(workdir), 'xla_cache'))
  return subprocess.Popen(cli_command(*_kill_config_flags(workdir)), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(tmp_path):
  killed, clean = str(tmp_path / 'killed'), str(tmp_path / 'clean')
  proc = _start(killed)
  try:
    # Wait for a checkpoint past the first, then SIGKILL: no handler runs, nothing gets flushed.
    deadline = time.time() + HANG_GUARD_S
    while time.time() < deadline and proc.poll() is None:
      folder = os.path.join(killed, 'checkpoints')
      # Orbax renames a finished save to its bare step number; in-flight ones carry a tmp suffix.
      steps = sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []
      if steps and steps[-1] >= 80:
        break
      time.sleep(0.2)
    assert proc.poll() is None, f'run ended before it could be killed: {proc.stderr.read()[-2000:]}'
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=HANG_GUARD_S)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL
  for workdir in (killed, clean):
    proc = _start(workdir)
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 0, err[-3000:]
  chex.assert_trees_all_equal(final_state(killed), final_state(clean))
  assert np.isfinite(float(np.asarray(final_state(clean).params['shared']['head']['kernel']).sum()))
