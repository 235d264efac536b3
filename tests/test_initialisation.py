"""A new run's weights from a trained run (config.train.init_from, training/initialisation.py), and block jobs
that share outer parts frozen from it (config.train.freeze_shared, docs/block_jobs.md).

One source run (digits, B = 3 blocks sharing their outer parts) is trained once per module; the tests start
runs from it, in the test process.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from helpers import run_cli, tiny_config

from diffblocks_jax import config as config_lib
from diffblocks_jax.core import steps
from diffblocks_jax.training import block_jobs, checkpointing, experiment, initialisation, train


def source_config(**overrides):
  """Digits, B = 3 blocks of one layer sharing their outer parts; one epoch of 11 steps."""
  return tiny_config('dblock', 'digits', train__batch_size=128, train__steps_per_call=11,
                     train__log_every_steps=11, train__eval_every_epochs=0.0, eval__batch_size=360,
                     train__scale_epochs_by_blocks=False, **overrides)


def frozen_job_config(source: str, blocks=()):
  """The block-parallel run of the source's config with the outer parts frozen from it; `blocks`: a job's."""
  return source_config(train__init_from=source, train__freeze_shared=True, parallel_blocks=True,
                       train__blocks=tuple(blocks))


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('init') / 'source')
  train.train_and_evaluate(source_config(), workdir)
  return workdir


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b):
  flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def job_params(source: str, b: int, workdir: str):
  """Block job b's saved parameters (a job is not loaded by load_trained: it holds one block)."""
  exp = experiment.build_experiment(frozen_job_config(source, (b,)))
  with checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints')) as ckpt:
    state, _ = ckpt.restore(exp.abstract_state)
  return host(state.params)


@pytest.mark.slow
def test_a_new_run_starts_from_the_source_weights_and_a_fresh_optimizer(source):
  config = source_config(train__init_from=source)
  exp = experiment.build_experiment(config)
  state = exp.init_state(initialisation.initial_params(config, exp.data))
  _, trained = experiment.load_trained(source_config(), source)
  assert_trees_equal(host(state.params), host(trained.params))
  assert int(state.step) == 0 and int(trained.step) == 11
  fresh = host(steps.init_opt_state(state.params))
  assert_trees_equal(host(state.opt_state), fresh)  # Zero moments, zero counts: fine-tuning starts afresh.


@pytest.mark.slow
@pytest.mark.long  # 60 s; by default: the frozen step (below), the jobs' command lines (test_launch.py), the merge
def test_block_jobs_with_frozen_shared_parts_merge_into_a_run(source, tmp_path):  # (test_block_jobs.py).
  """Three jobs, one per block, each training its row with the outer parts frozen from the source: the merge
  holds the source's shared parts bit for bit, each job's row, no Adam state for the shared parts, and
  evaluates."""
  jobs = [str(tmp_path / f'job{b}') for b in range(3)]
  for b, workdir in enumerate(jobs):
    train.train_and_evaluate(frozen_job_config(source, (b,)), workdir)
  merged = str(tmp_path / 'merged')
  block_jobs.merge(merged, jobs)
  config = config_lib.load_workdir(merged)
  assert config.train.freeze_shared and not config.train.blocks
  exp, state = experiment.load_trained(config, merged)  # One device: read back with the blocks unsharded.
  _, src = experiment.load_trained(source_config(), source)
  params, src_params = host(state.params), host(src.params)
  assert_trees_equal(params['shared'], src_params['shared'])
  assert set(state.opt_state) == {'blocks'}
  for b, workdir in enumerate(jobs):
    job = job_params(source, b, workdir)
    assert_trees_equal(jax.tree.map(lambda x: x[b:b + 1], params['blocks']), job['blocks'])
    assert_trees_equal(job['shared'], src_params['shared'])
    # Each block trained: its row moved away from the source's.
    moved = [np.max(np.abs(x[b] - y[b])) for x, y in zip(jax.tree.leaves(params['blocks']),
                                                          jax.tree.leaves(src_params['blocks']))]
    assert max(moved) > 0, b
  metrics, _ = exp.task.make_evaluator(exp, merged)(state.params, int(state.step))
  assert 0.0 <= float(metrics['eval/accuracy']) <= 1.0


def test_frozen_shared_parts_take_no_gradient_and_no_adam_state():
  """The block step with freeze_shared: the shared parts stay bit for bit, the drawn row moves."""
  config = source_config(train__init_from='unused', train__freeze_shared=True)
  exp = experiment.experiment_from_data(config, _digits(config))
  state = exp.init_state()
  assert 'shared' not in state.opt_state
  step = jax.jit(exp.task.make_train_step(exp.graphdef, config, exp.schedule, data=exp.data))
  images, labels = exp.data.train_arrays()[0][:128], exp.data.train_arrays()[1][:128]
  new, metrics = step(state, *exp.task.train_batch(jax.random.key(0), (images, labels.astype(np.int32)),
                                                   config.data))
  assert_trees_equal(host(new.params['shared']), host(state.params['shared']))
  b = int(metrics['block'])
  moved = [np.max(np.abs(np.asarray(x[b]) - np.asarray(y[b])))
           for x, y in zip(jax.tree.leaves(new.params['blocks']), jax.tree.leaves(state.params['blocks']))]
  assert max(moved) > 0


def _digits(config):
  from diffblocks_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.load_dataset(config.data)


# ------------------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize('overrides, says', [
    (dict(train__freeze_shared=True), 'would freeze randomly initialised outer parts'),
    (dict(train__freeze_shared=True, train__init_from='/x', model__independent_blocks=True), 'none is shared'),
    (dict(parallel_blocks=True), 'config.train.freeze_shared=True'),
])
def test_freezing_needs_a_source_and_shared_parts(overrides, says):
  with pytest.raises(config_lib.ConfigError, match=says):
    config_lib.validate(source_config(**overrides))


def test_freezing_an_end_to_end_model_is_refused():
  with pytest.raises(config_lib.ConfigError, match='an end-to-end model has no shared parts'):
    config_lib.validate(tiny_config('vit', 'digits', train__freeze_shared=True, train__init_from='/x'))


@pytest.mark.parametrize('make, says', [
    (lambda tmp, src: str(tmp / 'nowhere'), 'does not exist'),
    (lambda tmp, src: str(tmp), 'has no config.json'),
    (lambda tmp, src: 'hf:' + str(tmp / 'nowhere'), 'name a Hugging Face folder'),
])
def test_a_missing_source_is_refused_before_the_data_loads(tmp_path, make, says):
  config = source_config(train__init_from=make(tmp_path, None))
  with pytest.raises(config_lib.ConfigError, match=says):
    initialisation.check_source(config)


@pytest.mark.slow
def test_a_source_that_does_not_fit_is_one_line_and_writes_nothing(source, tmp_path):
  """Sources that do not fit the config's model, from the command line: exit 2, one line naming the parameter
  or the kinds, and no workdir."""
  # The shipped model is deeper than the tiny source: its second layer per block is missing there.
  for name, says in [('digits_dblock.py', 'do not match the model (config.model): missing'),
                     ('digits_dit_dblock.py', "is a 'dblock' run; a 'dit_dblock' run starts from")]:
    workdir = tmp_path / name
    result = run_cli(f'--config=configs/{name}', f'--workdir={workdir}', f'--config.train.init_from={source}')
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith('error: config.train.init_from='), result.stderr[-2000:]
    assert says in last, last
    assert not workdir.exists()  # The folder the run's lock made goes with the refusal (training/locking.py).


def test_a_leaf_of_another_shape_or_not_finite_is_named():
  abstract = {'shared': {'w': jax.ShapeDtypeStruct((2, 3), np.float32)}}
  config = source_config(train__init_from='/src')
  with pytest.raises(config_lib.ConfigError, match=r'parameter shared/w has shape \(3, 2\); the model'):
    initialisation._check(config, {'shared': {'w': np.zeros((3, 2))}}, abstract)  # pylint: disable=protected-access
  with pytest.raises(config_lib.ConfigError, match='parameter shared/w holds NaN or infinite values'):
    initialisation._check(config, {'shared': {'w': np.full((2, 3), np.nan)}}, abstract)  # pylint: disable=protected-access
