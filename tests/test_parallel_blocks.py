"""Block-parallel training (the block axis sharded on 'block'): B=3 blocks on 3 fake CPU devices, one each.

The 3-device run is this file as a script in a subprocess (the device count is fixed before JAX starts);
the step-level check runs in the test process on its single device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import HANG_GUARD_S, ROOT, shipped_config, subprocess_env

TIMEOUT_S = HANG_GUARD_S


def parallel_config(data_path: str = ''):
  """configs/testing.py with 3 independent blocks trained in parallel on an npz file."""
  config = shipped_config('testing.py:dblock')
  config.model.num_layers = config.model.num_blocks = 3
  config.model.independent_blocks = True
  config.parallel_blocks = True
  config.data.source, config.data.path = 'npz', data_path
  config.data.pad_crop, config.data.flip = 0, False
  return config


# ------------------------------------------------------------------------------------------ in the subprocess

def parallel_worker(workdir: str, out: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.tasks import classification  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.training import checkpointing, experiment, sharding, train  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 3, jax.devices()
  rng = np.random.default_rng(0)
  data = os.path.join(workdir, 'data.npz')
  os.makedirs(workdir, exist_ok=True)
  np.savez(data, x_train=rng.integers(0, 256, (48, 8, 8, 3), dtype=np.uint8), y_train=rng.integers(0, 5, 48),
           x_test=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), y_test=rng.integers(0, 5, 20))
  config = parallel_config(data)
  result = train.train_and_evaluate(config, os.path.join(workdir, 'run'))

  # Restored with the per-block placement: block b on device b only, and the same model as trained.
  exp, state = experiment.load_trained(config, os.path.join(workdir, 'run'))
  report = {'result': result, 'step': int(state.step), 'total_steps': exp.total_steps,
            'steps_per_epoch': exp.steps_per_epoch,
            'restored_accuracy': classification.evaluate_params(exp, state.params)}
  stacks = jax.tree.leaves((state.params['blocks'], state.opt_state['blocks']))
  assert all(leaf.shape[0] == 3 for leaf in stacks)  # Independent blocks are stacked: one leading block axis.
  report['block_devices'] = [sorted({shard.device.id for leaf in stacks for shard in leaf.addressable_shards
                                     if b in range(3)[shard.index[0]]}) for b in range(3)]
  report['block_bytes'] = [sum(leaf.nbytes // 3 for leaf in stacks) for b in range(3)]
  held = sharding.bytes_per_device((state.params, state.opt_state))
  report['device_bytes'] = {d.id: n for d, n in held.items()}

  # A save/restore round trip keeps the values and the per-block shardings.
  with checkpointing.Checkpointer(os.path.join(workdir, 'again')) as ckpt:
    ckpt.save(int(state.step), state, force=True)
    ckpt.wait()
    again, _ = ckpt.restore(exp.abstract_state)
  same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b)) and a.sharding == b.sharding),
                      state, again)
  report['round_trip_equal'] = all(jax.tree.leaves(same))
  with open(out, 'w') as f:
    json.dump(report, f)


# ---------------------------------------------------------------------------------------------------- tests

@pytest.mark.slow
@pytest.mark.long  # 46 s; by default the block-parallel run on 3 devices runs in tests/test_block_jobs.py's
def test_three_blocks_on_three_devices(tmp_path):  # equivalence, and its step in the test below.
  out = tmp_path / 'report.json'
  env = subprocess_env(XLA_FLAGS='--xla_force_host_platform_device_count=3')
  try:
    proc = subprocess.run([sys.executable, __file__, 'parallel', str(tmp_path), str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
  except subprocess.TimeoutExpired as e:  # subprocess.run kills the child before raising.
    pytest.fail(f'timed out after {TIMEOUT_S} s:\n{e.stderr}')
  assert proc.returncode == 0, proc.stderr[-6000:]
  r = json.loads(out.read_text())
  # Each block trains num_epochs * steps_per_epoch steps (not x B): every step trains all three.
  assert r['step'] == r['total_steps'] == r['steps_per_epoch'] == r['result']['step'] == 6
  accuracy = r['result']['eval/accuracy']
  assert accuracy * 20 == pytest.approx(round(accuracy * 20))  # A fraction of the 20 test images, each scored once.
  assert r['restored_accuracy'] == pytest.approx(r['result']['eval/accuracy'])
  for b in range(3):
    assert np.isfinite(r['result'][f'train/loss_block{b}'])
  # Block b lives on device b alone; each device holds exactly its block: 1/B of all blocks' state.
  assert r['block_devices'] == [[0], [1], [2]]
  total = sum(r['block_bytes'])
  assert {int(d): n for d, n in r['device_bytes'].items()} == {b: r['block_bytes'][b] for b in range(3)}
  assert all(n == pytest.approx(total / 3, rel=0.01) for n in r['device_bytes'].values())
  assert r['round_trip_equal']


@pytest.mark.slow
def test_parallel_step_equals_each_block_trained_alone(tiny_config, tiny_model, tiny_batch, jitter_params):
  """The vmapped all-blocks step updates block b exactly as the sequential step fixed to b (rng folded by b)."""
  import jax  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.core import blocks, optim, steps  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.tasks import classification  # pylint: disable=g-import-not-at-top
  config = tiny_config(model__independent_blocks=True)
  _, graphdef, params = tiny_model(config)
  state = steps.init_state(jitter_params(params), seed=0)
  schedule = optim.make_schedule(config.optim, 10, 0)
  images, labels = tiny_batch(8)
  per_block = [tiny_batch(8, seed=b) for b in range(3)]  # Each block its own batch.
  parallel = steps.make_parallel_step(graphdef, classification.Classification.from_config(config),
                                      classification.partition(config), config.optim, schedule)
  got, got_metrics = jax.jit(parallel)(state, np.stack([x for x, _ in per_block]),
                                       np.stack([y for _, y in per_block]))
  assert int(got.step) == 1 and int(got_metrics['block']) == -1
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  for b, (images, labels) in enumerate(per_block):
    step = classification.make_train_step(graphdef, config, schedule, block=b)
    folded = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), b))
    want, want_metrics = jax.jit(step)(state.replace(rng=folded), images, labels)
    jax.tree.map(close, blocks.block_tree(got.params, b), blocks.block_tree(want.params, b))
    jax.tree.map(close, blocks.block_tree(got.opt_state, b), blocks.block_tree(want.opt_state, b))
    close(got_metrics[f'loss_block{b}'], want_metrics['loss'])
  np.testing.assert_array_equal(got.rng, state.rng)  # The state's own rng is unchanged.


def test_too_few_devices_is_named():
  from diffblocks_jax.training import sharding  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  config = parallel_config()
  config.model.num_layers = config.model.num_blocks = jax.device_count() + 1
  with pytest.raises(sharding.MeshError, match='config.parallel_blocks'):
    sharding.make_mesh(config)


if __name__ == '__main__':
  if sys.argv[1] != 'parallel':
    raise SystemExit(f'unknown mode {sys.argv[1]!r}')
  parallel_worker(sys.argv[2], sys.argv[3])
