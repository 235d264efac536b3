"""Data parallelism on 8 fake CPU devices equals one device at the same global batch (sharding.py, train.py).

The multi-device part runs this file as a script in a subprocess: XLA_FLAGS must set the device count
before JAX starts, and the rest of the suite keeps its single device.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from helpers import HANG_GUARD_S, ROOT, shipped_config, subprocess_env

TIMEOUT_S = HANG_GUARD_S


def run_script(args: list[str], num_devices: int, timeout: float = TIMEOUT_S) -> None:
  """This test file as a script on `num_devices` fake CPU devices; raises with its output if it fails."""
  env = subprocess_env(XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}')
  try:
    proc = subprocess.run([sys.executable, __file__, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired as e:  # subprocess.run kills the child before raising.
    pytest.fail(f'{args} timed out after {timeout} s:\n{e.stderr}')
  if proc.returncode:
    pytest.fail(f'{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}')


def synthetic_data(num_train: int = 70, num_test: int = 20, seed: int = 0):
  """Random 8x8 RGB uint8 images in 5 classes; 70 rows do not divide over 8 devices (padding is used)."""
  from diffblocks_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  images = lambda n: rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
  labels = lambda n: rng.integers(0, 5, n).astype(np.int32)
  return input_pipeline.Dataset(images(num_train), labels(num_train), images(num_test), labels(num_test), 5,
                                'synthetic')


def cifar_shaped_config(kind: str = 'vit'):
  """configs/testing.py (CIFAR-100-shaped) with batches of 16: two rows per device on 8 devices."""
  return shipped_config(f'testing.py:{kind}', train__batch_size=16)


# ------------------------------------------------------------------------------------------ in the subprocess

def _train(config, data, num_steps: int):
  """Loss per step and final parameters of `num_steps` steps on the config's mesh."""
  import jax  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.training import experiment, train  # pylint: disable=g-import-not-at-top
  exp = experiment.experiment_from_data(config, data)
  state = exp.init_state()
  arrays = experiment.put_train_split(exp)
  chunk = train.make_train_chunk(exp)
  state, first = chunk(state, arrays, num_steps // 2)
  state, second = chunk(state, arrays, num_steps - num_steps // 2)
  losses = np.concatenate([np.asarray(first['loss']), np.asarray(second['loss'])])
  params = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state.params)}
  return losses, params, exp.mesh.size, arrays[0].sharding


def data_parallel_worker(out: str, kind: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.training import sharding  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8, jax.devices()
  data = synthetic_data()
  results = {}
  for devices in (1, 8):
    config = cifar_shaped_config(kind)
    config.mesh.data = devices
    losses, params, mesh_size, split_sharding = _train(config, data, num_steps=6)
    assert mesh_size == devices and len(split_sharding.device_set) == devices, (mesh_size, split_sharding)
    results[f'losses_{devices}'] = losses
    results.update({f'{devices}/{k}': v for k, v in params.items()})
  # The gather of a batch from the row-sharded split, padding included (70 rows over 8 devices).
  mesh = sharding.make_mesh(cifar_shaped_config(kind))
  split = sharding.put_rows(mesh, data.train_images)
  rows = np.array([69, 0, 8, 9, 35, 63, 64, 1, 2, 3, 4, 5, 6, 7, 17, 68])
  padded = sharding.padded_rows(mesh, len(data.train_images))
  gathered = jax.jit(lambda x, r: sharding.gather_rows(mesh, (x,), sharding.global_rows(r, 70, padded))[0])(
      split, rows)
  results['gathered'], results['expected'] = np.asarray(gathered), data.train_images[rows]
  results['padded'] = padded
  np.savez(out, **results)


# ---------------------------------------------------------------------------------------------------- tests

# Generation (labels are the inputs, images the target) is long: 39 s more for the same sharding code.
@pytest.mark.parametrize('kind', ['vit', pytest.param('dit_dblock', marks=pytest.mark.long)])
@pytest.mark.slow
def test_eight_devices_match_one(tmp_path, kind):
  out = tmp_path / 'results.npz'
  run_script(['data_parallel', str(out), kind], num_devices=8)
  r = dict(np.load(out))
  np.testing.assert_array_equal(r['gathered'], r['expected'])
  assert r['padded'] == 72
  assert np.all(np.isfinite(r['losses_1'])) and len(r['losses_1']) == 6
  np.testing.assert_allclose(r['losses_8'], r['losses_1'], rtol=1e-4)
  names = sorted(k[2:] for k in r if k.startswith('1/'))
  assert names
  for name in names:
    # atol: the attention key bias has an exactly zero gradient (softmax ignores a shift), so it holds
    # rounding noise of ~1e-6 whose sign depends on the summation order.
    np.testing.assert_allclose(r[f'8/{name}'], r[f'1/{name}'], rtol=1e-4, atol=1e-5, err_msg=name)


def test_global_rows_skip_padding():
  from diffblocks_jax.training import sharding  # pylint: disable=g-import-not-at-top
  # Two processes with 5 examples each, padded to 6 rows: example 5 is process 1's first row (row 6).
  np.testing.assert_array_equal(np.asarray(sharding.global_rows(np.arange(10), 5, 6)),
                                [0, 1, 2, 3, 4, 6, 7, 8, 9, 10])


def test_single_device_mesh_and_split():
  import jax  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.training import sharding  # pylint: disable=g-import-not-at-top
  config = cifar_shaped_config()
  mesh = sharding.make_mesh(config)
  assert mesh.axis_names == ('data',) and mesh.size == jax.device_count()
  config.mesh.data = jax.device_count() + 1
  with pytest.raises(sharding.MeshError, match='config.mesh.data'):
    sharding.make_mesh(config)
  rows = sharding.put_rows(mesh, np.arange(10, dtype=np.int32))
  assert rows.shape[0] == sharding.padded_rows(mesh, 10) >= 10


if __name__ == '__main__':
  if sys.argv[1] == 'data_parallel':
    data_parallel_worker(sys.argv[2], sys.argv[3])
  else:
    raise SystemExit(f'unknown mode {sys.argv[1]!r}')
