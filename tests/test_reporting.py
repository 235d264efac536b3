"""reporting.py: progress lines, the end-of-run summary, and paths as notebooks resolve them."""

import numpy as np
import pytest

from diffblocks_jax.training import paths, reporting
from helpers import ROOT


@pytest.fixture
def clock(monkeypatch):
  """time.perf_counter as a value the test sets."""
  now = [100.0]
  monkeypatch.setattr(reporting.time, 'perf_counter', lambda: now[0])
  return now


def test_progress_after_start_shows_throughput_eta_and_epochs_out_of_their_total(clock):
  progress = reporting.Progress(total_steps=3600, batch_size=128, steps_per_epoch=10)
  progress.start(0)  # Right after the first compiled call returned: its 10 steps now run.
  clock[0] += 2.0
  line = progress.line(10, {'train/loss': 0.5, 'train/loss_block0': 0.25, 'train/lr': 1e-3})
  # 10 steps in 2 s: 5 steps/s = 640 img/s; 3590 steps left = 718 s.
  assert line == 'step 10/3600 (epoch 1/360) loss 0.5 loss_block0 0.25 | 640 img/s | ETA 11m58s'
  clock[0] += 3.0
  assert '(epoch 2.5/360)' in progress.line(25, {})  # 25 steps in 5 s: still 5 steps/s.
  assert '| 640 img/s | ETA 11m55s' in progress.line(25, {})


def test_progress_without_start_times_from_its_first_line(clock):
  progress = reporting.Progress(total_steps=30, batch_size=4, steps_per_epoch=30)
  assert progress.line(3, {}) == 'step 3/30 (epoch 0.1/1) | ? img/s | ETA ?'
  clock[0] += 1.0
  assert progress.line(6, {}).endswith('| 12 img/s | ETA 0m08s')


def test_end_summary_names_results_and_where_everything_is(tmp_path):
  workdir = tmp_path / 'run'
  (workdir / 'tensorboard').mkdir(parents=True)
  result = {'step': 360, 'train/loss': 0.0123456, 'train/epoch': 36.0, 'eval/accuracy': 0.98766}
  text = reporting.end_summary(result, workdir=str(workdir), total_steps=360, wall_s=125.0, batch_size=64,
                               checkpoint_dir=str(workdir / 'checkpoints'), checkpoint_step=360)
  lines = text.splitlines()
  assert lines[0] == 'Finished 360/360 steps; this session took 2m05s (184 img/s).'
  assert 'accuracy (eval/accuracy) 0.9877' in text and 'loss 0.01235' in text
  assert f'checkpoints: {workdir / "checkpoints"} (latest step 360)' in text
  assert f'metrics: {workdir / "metrics.jsonl"}' in text
  assert f'tensorboard --logdir {workdir / "tensorboard"}' in text
  assert f'--mode=eval --workdir={workdir}' in text

  generation = {'step': 100, 'eval/fd': 1.5, 'eval/sample_accuracy': 1.0}
  text = reporting.end_summary(generation, workdir=str(tmp_path / 'gen'), total_steps=400, wall_s=float('nan'))
  assert text.splitlines()[0] == 'Stopped at step 100/400; this session took ?.'
  assert 'FD (eval/fd) 1.5' in text and 'sample accuracy (eval/sample_accuracy) 1' in text
  assert 'TensorBoard' not in text  # No tensorboard/ folder there.


def test_resolve_path_reads_relative_paths_from_the_repository_root(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT / 'notebooks')  # Where Jupyter starts a notebook's kernel.
  assert paths.repository_root() == str(ROOT)
  assert paths.resolve_path('configs/testing.py') == str(ROOT / 'configs' / 'testing.py')
  assert paths.resolve_path('evaluate.ipynb') == 'evaluate.ipynb'  # Found here: kept as given.
  assert paths.resolve_path(str(tmp_path)) == str(tmp_path)
  monkeypatch.chdir(tmp_path)  # Outside the repository: its root still comes from the package's location.
  assert paths.resolve_path('workdirs/x') == str(ROOT / 'workdirs' / 'x')


def test_read_metrics_round_trip(tmp_path):
  writer = reporting.MetricWriter(str(tmp_path))
  writer.write(5, {'train/loss': np.float32(0.5)})
  writer.close()
  assert reporting.read_metrics(str(tmp_path)) == [{'step': 5, 'train/loss': 0.5}]
