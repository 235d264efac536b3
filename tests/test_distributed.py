"""Two local processes joined by `jax.distributed` train like one process with the same devices.

Each process runs this file as a script with 2 fake CPU devices (gloo collectives over 127.0.0.1), trains the
tiny baseline through `train.train_and_evaluate` (its own half of the training split, checkpoints written by
both), restores the last checkpoint and saves its parameters; a single process with 4 devices does the same
on the whole split. The parameters must agree.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import HANG_GUARD_S, ROOT, shipped_config, subprocess_env

TIMEOUT_S = HANG_GUARD_S


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def write_data(path: pathlib.Path) -> None:
  """70 training images: 35 per process, which 2 devices hold as 18 + 17 (one padding row)."""
  rng = np.random.default_rng(0)
  np.savez(path, x_train=rng.integers(0, 256, (70, 8, 8, 3), dtype=np.uint8), y_train=rng.integers(0, 5, 70),
           x_test=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), y_test=rng.integers(0, 5, 20))


def spawn(args: list[str], num_devices: int, log: pathlib.Path) -> subprocess.Popen:
  env = subprocess_env(XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}')
  with open(log, 'w') as f:  # The child keeps its own descriptor.
    return subprocess.Popen([sys.executable, __file__, *args], env=env, cwd=ROOT, stdout=f,
                            stderr=subprocess.STDOUT)


def wait_all(procs: dict[str, subprocess.Popen], logs: dict[str, pathlib.Path], timeout: float) -> None:
  """Waits for every process; on a failure or the deadline, kills the rest and fails with their logs."""
  deadline = time.monotonic() + timeout
  try:
    pending = dict(procs)
    while pending:
      for name, p in list(pending.items()):
        if p.poll() is not None:
          del pending[name]
          if p.returncode:
            raise AssertionError(f'{name} exited with {p.returncode}')
      if time.monotonic() > deadline:
        raise AssertionError(f'{sorted(pending)} still running after {timeout} s')
      time.sleep(0.2)
  except AssertionError as e:
    tails = '\n'.join(f'--- {n}:\n{logs[n].read_text()[-4000:]}' for n in procs)
    pytest.fail(f'{e}\n{tails}')
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()


# ------------------------------------------------------------------------------------------ in the subprocess

def train_and_save(data: str, workdir: str, out: str, port: int = 0, num_processes: int = 1,
                   process_id: int = 0) -> None:
  config = shipped_config('testing.py:vit')
  config.data.source, config.data.path = 'npz', data
  config.data.pad_crop, config.data.flip = 0, False
  if num_processes > 1:
    config.distributed.enabled = True
    config.distributed.coordinator_address = f'127.0.0.1:{port}'
    config.distributed.num_processes = num_processes
    config.distributed.process_id = process_id
  from diffblocks_jax.tasks import classification  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.training import distributed, experiment, train  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  distributed.maybe_initialize(config)
  assert jax.process_count() == num_processes and jax.device_count() == 4, (jax.process_count(), jax.devices())
  result = train.train_and_evaluate(config, workdir)
  exp, state = experiment.load_trained(config, workdir)  # Every process restores the checkpoint all wrote.
  assert int(state.step) == exp.total_steps == result['step'], (int(state.step), exp.total_steps, result)
  # Scored again from the restored parameters: the accuracy training reported.
  assert classification.evaluate_params(exp, state.params) == pytest.approx(result['eval/accuracy']), result
  leaves = jax.tree_util.tree_leaves_with_path(state.params)
  np.savez(out, step=int(state.step), accuracy=result['eval/accuracy'],
           **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})


# ---------------------------------------------------------------------------------------------------- tests

@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  data = tmp_path / 'data.npz'
  write_data(data)
  port = free_port()
  runs = {f'process{i}': ['worker', str(data), str(tmp_path / 'multi'), str(tmp_path / f'process{i}.npz'),
                          str(port), '2', str(i)] for i in range(2)}
  runs['reference'] = ['worker', str(data), str(tmp_path / 'single'), str(tmp_path / 'reference.npz')]
  logs = {name: tmp_path / f'{name}.log' for name in runs}
  procs = {}
  try:
    for name, args in runs.items():
      procs[name] = spawn(args, num_devices=2 if name.startswith('process') else 4, log=logs[name])
  finally:
    wait_all(procs, logs, TIMEOUT_S)  # Also kills whatever started if a later spawn failed.
  reference = dict(np.load(tmp_path / 'reference.npz'))
  assert reference['step'] > 1
  for i in range(2):
    got = dict(np.load(tmp_path / f'process{i}.npz'))
    assert sorted(got) == sorted(reference)
    assert got['step'] == reference['step'] and got['accuracy'] == pytest.approx(reference['accuracy'])
    for name in reference:
      # Equal up to the order of the gradient sums (gloo vs. in-process); atol for the attention key bias,
      # whose gradient is exactly zero in exact arithmetic, so it holds ~1e-6 of rounding noise.
      np.testing.assert_allclose(got[name], reference[name], rtol=1e-4, atol=1e-5, err_msg=f'process {i}: {name}')
  # Only process 0 writes metrics (the processes share the workdir: two writers would double the lines).
  metrics = lambda run: (tmp_path / run / 'metrics.jsonl').read_text().splitlines()
  assert len(metrics('multi')) == len(metrics('single')) > 0
  checkpoints = lambda run: sorted(os.listdir(tmp_path / run / 'checkpoints'))
  assert checkpoints('multi') == checkpoints('single')


def test_initialize_arguments(monkeypatch):
  from diffblocks_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.training import distributed  # pylint: disable=g-import-not-at-top
  config = config_lib.get_base_config()
  monkeypatch.delenv('SLURM_NTASKS', raising=False)
  assert distributed.initialize_kwargs(config) == {}  # Everything auto-detected.
  assert not distributed.maybe_initialize(config)  # Neither asked for nor under SLURM: a single process.
  config.distributed.coordinator_address = '127.0.0.1:1234'
  config.distributed.num_processes, config.distributed.process_id = 2, 1
  assert distributed.initialize_kwargs(config) == {
      'coordinator_address': '127.0.0.1:1234', 'coordinator_bind_address': '127.0.0.1:1234',
      'num_processes': 2, 'process_id': 1}
  monkeypatch.setenv('SLURM_NTASKS', '4')
  monkeypatch.setenv('SLURM_PROCID', '0')
  assert distributed.under_slurm()


if __name__ == '__main__':
  mode, *rest = sys.argv[1:]
  if mode != 'worker':
    raise SystemExit(f'unknown mode {mode!r}')
  data_path, workdir_path, out_path, *cluster = rest
  if cluster:
    train_and_save(data_path, workdir_path, out_path, port=int(cluster[0]), num_processes=int(cluster[1]),
                   process_id=int(cluster[2]))
  else:
    train_and_save(data_path, workdir_path, out_path)
