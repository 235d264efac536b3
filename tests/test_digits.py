"""Real offline training on scikit-learn's digits: the accuracy targets, and resume after SIGKILL."""

import os
import signal
import subprocess
import time

import chex
import numpy as np
import pytest

from diffblocks_jax.training import experiment, train
from diffblocks_jax import config as config_lib
from helpers import HANG_GUARD_S, ROOT, cached_env, cli_command, shipped_config

pytestmark = pytest.mark.slow  # Real trainings: minutes each.


# Opt-in trainings: DIFFBLOCKS_LONG_TESTS=1 (the default suite must stay within its time budget on 2 cores).
LONG = pytest.mark.skipif(os.environ.get('DIFFBLOCKS_LONG_TESTS') != '1',
                          reason='a long CPU training: run with DIFFBLOCKS_LONG_TESTS=1')


# Measured on the development machine: digits_vit 98.9 %; digits_dblock.py (its default, the validated recipe)
# 97.5 / 95.6 / 95.8 % (seeds 0, 1, 2), so the issue's targets hold with margin for another CPU's float rounding.
# The baseline's run (3 min) is opt-in: the suite's budget goes to the DiffusionBlocks claim.
@pytest.mark.slow
@pytest.mark.parametrize('name, target', [pytest.param('digits_vit.py', 0.95, marks=LONG),
                                          ('digits_dblock.py', 0.93)])
def test_digits_config_reaches_target_accuracy(tmp_path, name, target):
  """The shipped digits configs, unchanged, through the same library code as the CLI."""
  config = shipped_config(name)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result['eval/accuracy'] >= target, result


# Measured on the development machine (README, Image generation), equal layer-updates: sample accuracy 1.000 for
# both models; eval/fd 1.6 (DiffusionBlocks) against 1.8 (end to end), with the floor at 0.36.
@LONG
def test_digits_generation_reaches_the_issue_targets(tmp_path):
  """Both digits DiT configs, unchanged, judged by the digits ViT: DiffusionBlocks' samples are assigned to
  their class >= 90 % of the time, and its FD is at most 1.25x the end-to-end DiT's."""
  classifier = str(tmp_path / 'vit')
  train.train_and_evaluate(shipped_config('digits_vit.py'), classifier)
  results = {}
  for name in ('digits_dit.py', 'digits_dit_dblock.py'):
    config = shipped_config(name, eval__classifier_workdir=classifier)
    results[name] = train.train_and_evaluate(config, str(tmp_path / name))
  dblock, e2e = results['digits_dit_dblock.py'], results['digits_dit.py']
  assert dblock['eval/sample_accuracy'] >= 0.9, results
  assert dblock['eval/fd'] <= 1.25 * e2e['eval/fd'], results


def _kill_config_flags(workdir):
  return ['--config=configs/testing.py:dblock', f'--workdir={workdir}', '--config.data.source=digits',
          '--config.data.mean=(0.3,)', '--config.data.std=(0.4,)', '--config.model.patch_size=2',
          '--config.train.num_epochs=2', '--config.train.checkpoint_every_steps=40',
          '--config.train.keep_checkpoints=2']


def _start(workdir):
  # One persistent XLA cache for the three runs (killed, resumed, clean): one compile, the same executable.
  env = cached_env(os.path.join(os.path.dirname(workdir), 'xla_cache'))
  return subprocess.Popen(cli_command(*_kill_config_flags(workdir)), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def _final_params(workdir):
  config = config_lib.load_workdir(workdir)
  exp, state = experiment.load_trained(config, workdir)
  assert int(state.step) == exp.total_steps
  return state


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
  chex.assert_trees_all_equal(_final_params(killed), _final_params(clean))
  assert np.isfinite(float(np.asarray(_final_params(clean).params['shared']['head']['kernel']).sum()))
