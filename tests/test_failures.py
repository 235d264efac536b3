"""Nothing lost, every failure one line (docs/operations.md): a torn metrics line, Ctrl-C, a full or read-only
disk, a damaged config.json, falling back past an unreadable checkpoint, and the values a mode takes.

Each case asserts the exit status (or the exception a command turns into one), that the message is one line naming
the file or folder, and that nothing that was saved is lost.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess

import chex
import pytest

from diffblocks_jax import config as config_lib
from diffblocks_jax.training import checkpointing, evaluation, experiment, paths, reporting, train
from helpers import HANG_GUARD_S, ROOT, cached_env, cli_command, run_cli, shipped_config


# Trainings and CLI runs: the full suite, not the quick tier.
pytestmark = pytest.mark.slow

def tiny_config(**train):
  """digits, a one-layer ViT: 11 steps an epoch, a checkpoint and an evaluation at each."""
  config = shipped_config('digits_vit.py')
  config.model.update(num_layers=1, hidden_size=32, mlp_dim=64)
  config.train.update(batch_size=128, num_epochs=2, steps_per_call=11, log_every_steps=11,
                      checkpoint_every_steps=11, eval_every_epochs=1.0)
  config.train.update(train)
  return config


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A finished two-epoch run (steps 11 and 22 checkpointed and evaluated); tests copy it."""
  workdir = tmp_path_factory.mktemp('finished') / 'run'
  result = train.train_and_evaluate(tiny_config(), str(workdir))
  assert result['step'] == 22
  return workdir


def copy_run(finished, tmp_path) -> pathlib.Path:
  workdir = tmp_path / 'run'
  shutil.copytree(finished, workdir)
  return workdir


def train_steps(workdir) -> list[int]:
  return [r['step'] for r in reporting.read_metrics(str(workdir)) if 'train/loss' in r]


def one_line_error(result: subprocess.CompletedProcess) -> str:
  """The error of a command that failed with status 2 and printed that one line and nothing else."""
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-3000:]
  return lines[0]


def listing(folder) -> dict[str, int]:
  return {str(p.relative_to(folder)): p.stat().st_size for p in pathlib.Path(folder).rglob('*') if p.is_file()}


# ------------------------------------------------------------------------------------------ the metrics log

def test_a_torn_last_line_is_skipped_then_cut_and_kept_beside_on_resume(finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  before = reporting.read_metrics(str(workdir))
  torn = b'{"step": 33, "train/loss": 0.41, "train/loss_bl'  # A kill while the record was written.
  with open(workdir / 'metrics.jsonl', 'ab') as f:
    f.write(torn)
  assert reporting.read_metrics(str(workdir)) == before  # Skipped (and reported), not a JSONDecodeError.
  result = train.train_and_evaluate(tiny_config(num_epochs=3), str(workdir))  # Resumes at 22, runs to 33.
  assert result['step'] == 33
  kept = glob.glob(str(workdir / 'metrics.torn-*.jsonl'))
  assert len(kept) == 1 and pathlib.Path(kept[0]).read_bytes() == torn
  lines = (workdir / 'metrics.jsonl').read_bytes().splitlines()
  records = [json.loads(line) for line in lines]  # Every line whole: the next record was not glued onto it.
  assert records[:len(before)] == before and train_steps(workdir) == [11, 22, 33]
  assert any(r['step'] == 33 and 'eval/accuracy' in r for r in records)
  # A rerun of the finished workdir reads the log and answers.
  again = train.train_and_evaluate(tiny_config(num_epochs=3), str(workdir))
  assert again['step'] == 33 and again['eval/accuracy'] == result['eval/accuracy']


def test_falling_back_past_an_unreadable_checkpoint_logs_each_step_once(finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  old = reporting.read_metrics(str(workdir))
  for path in (workdir / 'checkpoints' / '22' / 'state').rglob('*'):
    if path.is_file():
      path.write_bytes(b'')  # Damaged: restore walks back to step 11.
  result = train.train_and_evaluate(tiny_config(), str(workdir))
  assert result['step'] == 22
  assert train_steps(workdir) == [11, 22]  # Steps 12-22 were trained again and logged once, not twice.
  aside = glob.glob(str(workdir / 'metrics.superseded-*.jsonl'))
  assert len(aside) == 1
  moved = [json.loads(line) for line in pathlib.Path(aside[0]).read_text().splitlines()]
  assert moved == [r for r in old if r['step'] > 11]  # Nothing lost: the first attempt's records, kept.
  assert glob.glob(str(workdir / 'checkpoints' / '22.unreadable-*'))  # The damaged step, kept aside too.


# ---------------------------------------------------------------------------------------------------- Ctrl-C

def digits_args(workdir) -> list[str]:
  """A short digits baseline as a command: 3 epochs x 11 steps, 3 steps per call, checkpoint every 6."""
  return ['--config=configs/digits_vit.py', f'--workdir={workdir}', '--config.train.num_epochs=3',
          '--config.train.batch_size=128', '--config.train.steps_per_call=3', '--config.train.log_every_steps=3',
          '--config.train.checkpoint_every_steps=6', '--config.train.eval_every_epochs=1',
          '--config.model.num_layers=2', '--config.model.hidden_size=32', '--config.model.mlp_dim=64',
          '--verbosity=1']  # The data loader's line is a debug line.


def interrupt(workdir, point: str, env, times: int = 1) -> subprocess.CompletedProcess:
  """Runs `digits_args`, sends Ctrl-C (SIGINT) `times` times as `point` is printed, returns its output."""
  proc = subprocess.Popen(cli_command(*digits_args(workdir)), cwd=ROOT, stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True, env=env)
  log, sent = [], 0
  for line in proc.stderr:
    log.append(line)
    # The first as `point` is printed; another each time the run says it is stopping (as a person presses again).
    if (point in line and not sent) or (sent and line.startswith('Ctrl-C: stopping')):
      proc.send_signal(signal.SIGINT)
      sent += 1
      if sent == times:
        break
  log += proc.stderr.readlines()
  proc.wait(timeout=HANG_GUARD_S)
  return subprocess.CompletedProcess(proc.args, proc.returncode, '', ''.join(log))


def final_state(workdir):
  config = config_lib.load_workdir(str(workdir))
  exp, state = experiment.load_trained(config, str(workdir))
  assert int(state.step) == exp.total_steps
  return state


def last_line(stderr: str) -> str:
  return [line for line in stderr.splitlines() if line.strip()][-1]


def check_ctrl_c(tmp_path, points):
  env = cached_env(tmp_path / 'xla_cache')  # The runs compile once, and still match bit for bit.
  clean = run_cli(*digits_args(tmp_path / 'clean'), env=env)
  assert clean.returncode == 0, clean.stderr[-3000:]
  want = final_state(tmp_path / 'clean')
  for i, point in enumerate(points):
    workdir = tmp_path / f'int{i}'
    stopped = interrupt(workdir, point, env)
    assert stopped.returncode == train.EXIT_INTERRUPTED, (point, stopped.stderr[-3000:])
    assert 'Traceback' not in stopped.stderr, (point, stopped.stderr[-3000:])
    line = last_line(stopped.stderr)
    assert 'Stopped by Ctrl-C at step' in line and 'Run the same command to resume' in line, (point, line)
    saved = checkpointing.Checkpointer(workdir / 'checkpoints').all_steps()
    assert f'checkpoint step {saved[-1]} is saved' in line, (point, line)  # The step it stopped at, saved.
    resumed = run_cli(*digits_args(workdir), env=env)
    assert resumed.returncode == 0, (point, resumed.stderr[-3000:])
    chex.assert_trees_all_equal(final_state(workdir), want)
    assert train_steps(workdir) == sorted(set(train_steps(workdir)))  # No step logged twice.
  # Twice: the second Ctrl-C stops at once, without saving, and says so; the saved steps still resume.
  workdir = tmp_path / 'twice'
  stopped = interrupt(workdir, 'step 9/33', env, times=2)
  assert stopped.returncode == train.EXIT_INTERRUPTED and 'Traceback' not in stopped.stderr, stopped.stderr[-3000:]
  assert 'Stopped at once by a second Ctrl-C' in last_line(stopped.stderr), stopped.stderr[-3000:]
  assert run_cli(*digits_args(workdir), env=env).returncode == 0
  chex.assert_trees_all_equal(final_state(workdir), want)


# The default suite presses Ctrl-C after a progress line (SIGTERM, the same stop flag, is tested before the first
# step and after an evaluation in tests/test_train.py); the opt-in run also presses it while the data loads and
# right after an evaluation.
@pytest.mark.long  # 135 s; the stop flag's save-and-resume by default: SIGTERM while loading (tests/test_train.py).
def test_ctrl_c_saves_the_step_and_resumes_bit_for_bit_a_second_stops_at_once(tmp_path):
  check_ctrl_c(tmp_path, ['step 6/33'])


@pytest.mark.long
def test_ctrl_c_at_every_point(tmp_path):
  check_ctrl_c(tmp_path, ['Loaded digits', 'step 6/33', 'test accuracy'])


def test_an_evaluation_interrupted_at_a_checkpoint_is_redone_on_resume(finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  # As if the run were stopped during its evaluation at step 11 (and nothing later happened): the checkpoint of
  # step 11 is on disk, its evaluation record is not.
  shutil.rmtree(workdir / 'checkpoints' / '22')
  metrics = workdir / 'metrics.jsonl'
  kept = [r for r in reporting.read_metrics(str(workdir)) if r['step'] < 11 or (r['step'] == 11 and 'train/loss' in r)]
  metrics.write_text(''.join(json.dumps(r) + '\n' for r in kept))
  train.train_and_evaluate(tiny_config(), str(workdir))
  evaluated = [r['step'] for r in reporting.read_metrics(str(workdir)) if 'eval/accuracy' in r]
  assert evaluated == [11, 22]


# -------------------------------------------------------------------------------------- full or read-only disk

@contextlib.contextmanager
def small_disk(folder: pathlib.Path, size: str):
  """A tmpfs of `size` mounted at `folder` (root on Linux); skips the test where that is not allowed."""
  folder.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(folder)],
                           capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f'cannot mount a tmpfs here ({mounted.stderr.strip()}); the simulated cases still run')
  try:
    yield folder
  finally:
    subprocess.run(['umount', '-l', str(folder)], check=False)


@pytest.mark.long  # 69 s on a real tmpfs; by default test_a_failed_write_is_one_line_naming_the_folder_simulated.
def test_a_full_disk_at_a_checkpoint_is_one_line_and_removes_the_partial_step(tmp_path):
  with small_disk(tmp_path / 'disk', '3m') as disk:
    workdir = disk / 'run'
    # digits_vit.py's 6-layer ViT: its state (parameters and Adam) is ~1.5 MB, so the second checkpoint cannot fit.
    result = run_cli('--config=configs/digits_vit.py', f'--workdir={workdir}', '--config.train.num_epochs=10',
                     '--config.train.checkpoint_every_steps=22', '--config.train.eval_every_epochs=5')
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    line = last_line(result.stderr)
    # Which save meets the full disk depends on how Orbax lays out its writes; what holds is the one line and
    # that every step it says is intact restores.
    found = re.match(rf'error: cannot write checkpoint step (\d+) in {re.escape(str(workdir))}/checkpoints: no space '
                     r'left on device \([0-9.]+ [kMG]?B free of [0-9.]+ [kMG]?B\)\. The steps on disk are intact: '
                     r'\[([0-9, ]*)\]; the partial step was removed\.', line)
    assert found, line
    assert not glob.glob(str(workdir / 'checkpoints' / '*tmp*'))  # The partial step is gone.
    intact = [int(s) for s in found.group(2).split(',') if s.strip()]
    if intact:
      config = config_lib.load_workdir(str(workdir))
      _, state = experiment.load_trained(config, str(workdir))  # What was saved is whole.
      assert int(state.step) == intact[-1] < int(found.group(1))


def test_a_failed_write_is_one_line_naming_the_folder_simulated(tmp_path, monkeypatch):
  """The same failures where no tmpfs can be mounted: a checkpoint write and a metrics write that find no space."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  real_save, calls = ocp.CheckpointManager.save, []

  def save(self, step, *args, **kwargs):
    calls.append(step)
    if len(calls) == 2:
      raise OSError(errno.ENOSPC, 'No space left on device', str(tmp_path / 'a' / 'checkpoints'))
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', save)
  with pytest.raises(checkpointing.CheckpointError) as e:
    train.train_and_evaluate(tiny_config(), str(tmp_path / 'a'))
  message = str(e.value)
  assert '\n' not in message and message.startswith(f'cannot write checkpoint step 22 in {tmp_path / "a"}'), message
  assert 'no space left on device' in message and 'free of' in message and 'intact: [11]' in message, message
  monkeypatch.setattr(ocp.CheckpointManager, 'save', real_save)
  assert int(experiment.load_trained(tiny_config(), str(tmp_path / 'a'))[1].step) == 11

  real_write, writes = reporting.MetricWriter.write, []

  def full(self, step, metrics):  # The records of step 11 land; then the disk is full.
    writes.append(step)
    if step > 11:
      raise OSError(errno.ENOSPC, 'No space left on device', os.path.join(str(tmp_path / 'b'), 'metrics.jsonl'))
    return real_write(self, step, metrics)

  monkeypatch.setattr(reporting.MetricWriter, 'write', full)
  with pytest.raises(paths.WorkdirWriteError) as e:
    train.train_and_evaluate(tiny_config(), str(tmp_path / 'b'))
  message = str(e.value)
  assert '\n' not in message and message.startswith(f'cannot write {tmp_path / "b" / "metrics.jsonl"}: no space left '
                                                    'on device (') and 'Checkpoint step 11' in message, message


def test_a_read_only_workdir_refuses_training_and_evaluates_without_writing(finished, tmp_path):
  with small_disk(tmp_path / 'disk', '8m') as disk:
    workdir = disk / 'run'
    shutil.copytree(finished, workdir)
    subprocess.run(['mount', '-o', 'remount,ro', str(disk)], check=True)
    before = listing(workdir)
    line = one_line_error(run_cli(f'--workdir={workdir}'))  # Resuming (or rerunning) the run.
    assert f'--workdir={workdir}: {workdir} is not writable' in line and 'Checkpoint step 22' in line, line
    evaluated = run_cli(f'--workdir={workdir}', '--mode=eval')
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert evaluated.stdout.startswith('Checkpoint step 22: test accuracy') and (
        f'Could not write {workdir}/eval.json: read-only file system' in evaluated.stdout), evaluated.stdout
    assert listing(workdir) == before


def test_eval_says_it_could_not_write_eval_json_simulated(finished, tmp_path, monkeypatch):
  workdir = copy_run(finished, tmp_path)
  real_open = open

  def read_only(path, mode='r', *args, **kwargs):
    if str(path).endswith('eval.json') and 'w' in mode:
      raise OSError(errno.EROFS, 'Read-only file system', str(path))
    return real_open(path, mode, *args, **kwargs)

  monkeypatch.setattr('builtins.open', read_only)
  result, answer = evaluation.evaluate(config_lib.load_workdir(str(workdir)), str(workdir))
  assert result['step'] == 22 and answer.startswith('Checkpoint step 22: test accuracy'), answer
  assert answer.endswith(f'(Could not write {workdir}/eval.json: read-only file system.)'), answer


# -------------------------------------------------------------------------------------------- config.json

def test_a_damaged_config_json_is_one_line_naming_the_file_and_the_copy_that_restores_it(finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  saved = workdir / 'config.json'
  good = saved.read_text()
  saved.write_text(good[:200])  # Truncated.
  for args in ([f'--workdir={workdir}'], [f'--workdir={workdir}', '--mode=eval']):
    line = one_line_error(run_cli(*args))
    assert f'{saved} is damaged (' in line and 'line' in line and 'column' in line, line
    assert 'allow_config_change=True' in line, line
  copy = workdir / 'checkpoints' / '22' / 'config' / 'metadata'
  assert f'cp {copy} {saved}' in line, line
  shutil.copy(copy, saved)  # The fix, as the line gives it.
  assert json.loads(saved.read_text()) == json.loads(good)
  evaluated = run_cli(f'--workdir={workdir}', '--mode=eval')
  assert evaluated.returncode == 0 and evaluated.stdout.startswith('Checkpoint step 22'), evaluated.stderr[-3000:]
  # Training without --config reads the restored config.json too: the run is finished, and that is all it says.
  rerun = run_cli(f'--workdir={workdir}')
  lines = [line for line in rerun.stderr.splitlines() if line.strip()]
  assert rerun.returncode == 0 and len(lines) == 1 and 'Already finished at step 22 of 22: eval/accuracy' in lines[0], (
      rerun.stderr[-3000:])


def test_a_damaged_config_json_when_resuming_with_a_config_file(finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  (workdir / 'config.json').write_text('{"model": ')
  with pytest.raises(config_lib.ConfigError, match=r'config.json is damaged \(Expecting value at line 1, column 11\)'):
    train.train_and_evaluate(tiny_config(num_epochs=3), str(workdir))


# ------------------------------------------------------------------------------------------ values and paths

def test_the_values_a_mode_takes_are_checked_before_any_work(tmp_path):
  workdir = tmp_path / 'new'
  line = one_line_error(run_cli('--config=configs/digits_dit.py', f'--workdir={workdir}', '--mode=sample',
                                '--num_samples=-1'))
  assert '--num_samples=-1 must be >= 1' in line, line
  assert not workdir.exists()
  line = one_line_error(run_cli('--config=configs', f'--workdir={workdir}'))
  assert '--config=configs is a folder, not a config file' in line and 'digits_dblock.py' in line, line
  afile = tmp_path / 'a_file'
  afile.write_text('not a folder')
  line = one_line_error(run_cli('--config=configs/digits_vit.py', f'--workdir={afile}'))
  assert f'--workdir={afile} is a file, not a folder' in line, line
  assert afile.read_text() == 'not a folder'
