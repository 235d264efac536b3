"""One job per block (training/block_jobs.py, docs/block_jobs.md): B jobs + merge against the block-parallel run.

The equivalence runs as this file's script in subprocesses (a device count is fixed before JAX starts): the
block-parallel run on 3 fake CPU devices, the 3 block jobs on 1 device, the merge through the command line. The
refusals run in the test process on small fake job workdirs (no training).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import HANG_GUARD_S, ROOT, cached_env, run_cli, tiny_config

# The jobs' parameters against the block-parallel run's: not bit-exact. XLA compiles the block update vmapped
# over 3 rows (partitioned over 3 devices) and over 1 row (a job) into programs whose reductions round
# differently (2e-10 in the head's kernel after one step); over 44 steps that grows to at most 2e-7 (measured),
# far below these bounds. Longer runs at larger learning rates grow it further: Adam divides gradients that are
# rounding noise (an attention key's bias has none) by their own tiny size (docs/block_jobs.md).
ATOL, RTOL = 1e-5, 1e-4
STEPS = 44


def job_config(blocks=()):
  """Digits, B = 3 independent blocks of one layer, block-parallel; one epoch of 44 steps; `blocks`: a job's."""
  return tiny_config('dblock', 'digits', model__independent_blocks=True, parallel_blocks=True,
                     train__batch_size=32, train__num_epochs=1, train__steps_per_call=44, train__log_every_steps=44,
                     train__eval_every_epochs=0.0, eval__batch_size=360, train__blocks=tuple(blocks))


# ------------------------------------------------------------------------------------------ in the subprocesses

def jobs_worker(root: str) -> None:
  """Each block's job, one after another, on this process's one device."""
  from diffblocks_jax.training import train  # pylint: disable=g-import-not-at-top
  for b in range(3):
    train.train_and_evaluate(job_config((b,)), os.path.join(root, f'job{b}'))


def reference_worker(root: str, out: str) -> None:
  """The block-parallel run on 3 devices; then, once the merged run exists, that run resumed (it is finished, so
  it is evaluated) and its parameters compared with the reference's."""
  import jax  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.training import experiment, train  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 3, jax.devices()
  config = job_config()
  reference = train.train_and_evaluate(config, os.path.join(root, 'parallel'))
  _, ref_state = experiment.load_trained(config, os.path.join(root, 'parallel'))
  deadline = time.monotonic() + HANG_GUARD_S
  while not os.path.exists(os.path.join(root, 'merged.done')):
    if time.monotonic() > deadline:
      raise TimeoutError('the merged run never came')
    time.sleep(0.2)
  merged_dir = os.path.join(root, 'merged')
  resumed = train.train_and_evaluate(config, merged_dir)
  _, merged_state = experiment.load_trained(config, merged_dir)
  leaves = lambda s: jax.tree_util.tree_flatten_with_path((s.params, s.opt_state))[0]
  diffs = {jax.tree_util.keystr(p): float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for (p, a), (_, b) in zip(leaves(ref_state), leaves(merged_state))}
  close = all(np.allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL)
              for (_, a), (_, b) in zip(leaves(ref_state), leaves(merged_state)))
  report = {'reference': reference, 'resumed': resumed, 'diffs': diffs, 'close': close,
            'steps': [int(ref_state.step), int(merged_state.step)],
            'rng_equal': bool(np.array_equal(ref_state.rng, merged_state.rng)),
            'merged_devices': sorted({s.device.id for leaf in jax.tree.leaves(merged_state.params['blocks'])
                                      for s in leaf.addressable_shards})}
  with open(out, 'w') as f:
    json.dump(report, f)


# ---------------------------------------------------------------------------------------------------- tests

@pytest.mark.slow
def test_block_jobs_merge_to_the_block_parallel_run(tmp_path):
  """B = 3 jobs on one device each, merged, against the block-parallel run of the same config on 3 devices: the
  same parameters (to float32 rounding) and the same test accuracy; the merged run resumes on 3 devices."""
  report = tmp_path / 'report.json'
  cache = tmp_path / 'xla_cache'
  script = [sys.executable, __file__]
  reference = subprocess.Popen(  # pylint: disable=consider-using-with
      script + ['reference', str(tmp_path), str(report)], cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True,
      env=cached_env(cache, XLA_FLAGS='--xla_force_host_platform_device_count=3'))
  try:
    jobs = subprocess.run(script + ['jobs', str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          env=cached_env(cache), timeout=HANG_GUARD_S, check=False)
    assert jobs.returncode == 0, jobs.stderr[-6000:]
    merged = tmp_path / 'merged'
    sources = ','.join(str(tmp_path / f'job{b}') for b in (2, 0, 1))  # Any order.
    cli = run_cli('--mode=merge', f'--workdir={merged}', f'--from={sources}', env=cached_env(cache))
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert cli.stdout.startswith(f'Merged blocks (0, 1, 2) at step {STEPS}'), cli.stdout
    (tmp_path / 'merged.done').touch()
    _, err = reference.communicate(timeout=HANG_GUARD_S)
  finally:
    if reference.poll() is None:
      reference.kill()
      reference.communicate()
  assert reference.returncode == 0, err[-6000:]
  r = json.loads(report.read_text())
  assert r['steps'] == [STEPS, STEPS] and r['rng_equal']
  assert r['close'], {k: v for k, v in r['diffs'].items() if v > ATOL}
  assert r['resumed']['eval/accuracy'] == r['reference']['eval/accuracy'] and r['resumed']['step'] == STEPS
  assert r['merged_devices'] == [0, 1, 2]  # Restored in the block-parallel placement.
  with open(merged / 'config.json') as f:
    assert json.load(f)['train']['blocks'] == []
  # Read back here, on one device (fewer than B): the blocks unsharded, the same accuracy.
  from diffblocks_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.tasks import classification  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.training import experiment  # pylint: disable=g-import-not-at-top
  exp, state = experiment.load_trained(config_lib.load_workdir(str(merged)), str(merged))
  assert int(state.step) == STEPS and not exp.config.parallel_blocks
  assert classification.evaluate_params(exp, state.params) == pytest.approx(r['reference']['eval/accuracy'])
  with pytest.raises(config_lib.ConfigError, match='is a block job'):
    experiment.load_trained(config_lib.load_workdir(str(tmp_path / 'job0')), str(tmp_path / 'job0'))


# ---------------------------------------------------------------------------- a job's shapes; refused block lists

def test_a_job_holds_only_its_blocks():
  import jax  # pylint: disable=g-import-not-at-top
  from diffblocks_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.training import experiment  # pylint: disable=g-import-not-at-top
  assert config_lib.trained_blocks(job_config((2, 0))) == (0, 2) and config_lib.trained_blocks(job_config()) == (0, 1, 2)
  config = job_config((2,))
  data = input_pipeline.load_dataset(config.data)
  exp = experiment.experiment_from_data(config, data)  # One device: one group, for the one block it owns.
  assert exp.blocks == (2,) and exp.is_block_job and exp.num_blocks == 3
  whole = experiment.experiment_from_data(job_config(), data, mesh=jax.sharding.Mesh(jax.devices()[:1], ('data',)))
  assert not whole.is_block_job
  for part, full_part in ((exp.abstract_state.params, whole.abstract_state.params),
                          (exp.abstract_state.opt_state, whole.abstract_state.opt_state)):
    assert set(part) == {'blocks'}  # Nothing shared: no other block's parameters nor Adam state.
    for leaf, full_leaf in zip(jax.tree.leaves(part), jax.tree.leaves(full_part), strict=True):
      assert full_leaf.shape[0] == 3 and leaf.shape == (1,) + full_leaf.shape[1:]


@pytest.mark.parametrize('overrides, says', [
    (dict(train__blocks=(3,)), 'names a block outside 0..2'),
    (dict(train__blocks=('',)), 'must name blocks by number'),  # --config.train.blocks= (empty)
    (dict(train__blocks=(1, 1)), 'names a block twice'),
    (dict(train__blocks=(0,), model__independent_blocks=False, parallel_blocks=False),
     'needs config.parallel_blocks=True and either config.model.independent_blocks=True .* or the shared outer '
     r'parts frozen from a trained run \(config.train.init_from=WORKDIR and config.train.freeze_shared=True\)'),
    (dict(train__blocks=(0,), parallel_blocks=False), 'config.parallel_blocks=True'),
])
def test_bad_block_lists_are_refused_in_one_line(overrides, says):
  from diffblocks_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = job_config()
  for k, v in overrides.items():
    *path, leaf = k.split('__')
    node = config
    for part in path:
      node = node[part]
    node[leaf] = v
  with pytest.raises(config_lib.ConfigError, match=says) as e:
    config_lib.validate(config)
  assert len(str(e.value).splitlines()) == 2  # 'Invalid config:' and the one error.


def test_an_end_to_end_kind_has_no_blocks_to_own():
  from diffblocks_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(config_lib.ConfigError, match="needs a block-wise config.model.kind .*not 'vit'"):
    config_lib.validate(tiny_config('vit', 'digits', train__blocks=(0,)))


# ------------------------------------------------------------------------------ merge: refusals, on fake jobs

def fake_job(root, name: str, blocks, *, step: int = 4, rng=(0, 7), seed: int = 0):
  """A block job's workdir without training: its config and one checkpoint whose stack rows are the block numbers."""
  from diffblocks_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  config = job_config(blocks)
  config.seed = seed
  workdir = os.path.join(root, name)
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  owned = sorted(blocks) or [0, 1, 2]
  rows = np.asarray([[b, b] for b in owned], np.float32)
  state = {'step': np.int32(step), 'params': {'blocks': {'w': rows}},
           'opt_state': {'blocks': {'count': np.full((len(owned),), step, np.int32), 'mu': {'w': rows + 0.5}}},
           'rng': np.asarray(rng, np.uint32)}
  with checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints')) as ckpt:
    ckpt.save(step, state, metadata={'epoch': 1.0, 'blocks': list(blocks)},
              config=json.loads(config.to_json_best_effort()), force=True)
  return workdir


def test_merge_puts_rows_in_block_order(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.training import block_jobs, checkpointing  # pylint: disable=g-import-not-at-top
  sources = [fake_job(tmp_path, 'a', (2,)), fake_job(tmp_path, 'b', (1, 0))]
  out = tmp_path / 'merged'
  line = block_jobs.merge(str(out), sources)
  assert line.startswith('Merged blocks (0, 1, 2) at step 4')
  with checkpointing.Checkpointer(out / 'checkpoints') as ckpt:
    leaves = ckpt.manifest(4)['leaves']
    target = block_jobs._nest({k: jax.ShapeDtypeStruct(tuple(v['shape']), np.dtype(v['dtype']))  # pylint: disable=protected-access
                               for k, v in leaves.items()})
    state, _ = ckpt.restore(target)
    meta = ckpt.metadata(4)
  np.testing.assert_array_equal(state['params']['blocks']['w'], [[0, 0], [1, 1], [2, 2]])
  np.testing.assert_array_equal(state['opt_state']['blocks']['mu']['w'], [[0.5, 0.5], [1.5, 1.5], [2.5, 2.5]])
  assert meta['merged_from'] == {'0': sources[1], '1': sources[1], '2': sources[0]} and 'blocks' not in meta
  with open(out / 'config.json') as f:
    assert json.load(f)['train']['blocks'] == []


@pytest.mark.parametrize('jobs, says', [
    ([('a', (0,), {}), ('b', (1, 2), dict(seed=1))], r'different configs \(config.seed: 1 vs 0\)'),
    ([('a', (0, 1), {}), ('b', (1, 2), {})], 'block 1 is owned by both'),
    ([('a', (0,), {}), ('b', (2,), {})], r'blocks \(1,\) of B=3 are owned by no --from workdir'),
    ([('a', (0,), {}), ('b', (1, 2), dict(step=6))], 'the jobs are at different steps'),
    ([('a', (0,), {}), ('b', (1, 2), dict(rng=(0, 8)))], 'rng differs between'),
    ([('a', (0,), {}), ('b', (), {})], 'is not a block job'),
    ([('a', (0,), {}), ('missing', None, {})], 'which does not exist'),
    ([], 'names no workdir'),
])
def test_bad_merges_are_refused_in_one_line_writing_nothing(tmp_path, jobs, says):
  from diffblocks_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.training import block_jobs  # pylint: disable=g-import-not-at-top
  sources = []
  for name, blocks, kw in jobs:
    sources.append(str(tmp_path / name) if blocks is None else fake_job(tmp_path, name, blocks, **kw))
  out = tmp_path / 'merged'
  with pytest.raises(config_lib.ConfigError, match=says) as e:
    block_jobs.merge(str(out), sources)
  assert len(str(e.value).splitlines()) == 1
  assert not out.exists()


def test_merge_refuses_a_workdir_that_holds_a_run(tmp_path):
  from diffblocks_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.training import block_jobs  # pylint: disable=g-import-not-at-top
  sources = [fake_job(tmp_path, 'a', (0,)), fake_job(tmp_path, 'b', (1, 2))]
  out = tmp_path / 'merged'
  out.mkdir()
  (out / 'config.json').write_text('{}')
  with pytest.raises(config_lib.ConfigError, match='already holds a run'):
    block_jobs.merge(str(out), sources)
  assert sorted(os.listdir(out)) == ['config.json']
  with pytest.raises(config_lib.ConfigError, match='is one of the --from workdirs'):
    block_jobs.merge(sources[0], sources)


if __name__ == '__main__':
  if sys.argv[1] == 'jobs':
    jobs_worker(sys.argv[2])
  elif sys.argv[1] == 'reference':
    reference_worker(sys.argv[2], sys.argv[3])
  else:
    raise SystemExit(f'unknown mode {sys.argv[1]!r}')
