"""Weight-tied blocks (`model.weight_tied`; core/blocks.py `row_of`): one row of block parameters serves all B
noise slices. The reference throughout is the untied twin: an untied model whose B rows all equal the tied row
(same outer parts), which must compute what the tied model computes, slice by slice, step by step."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffblocks_jax import models
from diffblocks_jax.core import blocks, optim, partitions, steps
from diffblocks_jax.models import dblock
from diffblocks_jax.tasks import classification
from diffblocks_jax.tools import bench, memory
from diffblocks_jax.training import experiment, sharding
from helpers import TINY_DIMS

NUM_BLOCKS, BATCH = 3, 8
# Compiling dominates on a CPU: a lower LLVM optimisation level compiles the steps faster, with the same numbers.
FAST_COMPILE = memory.FAST_COMPILE  # The planner's cheaper CPU compilation (one definition).


def tile_rows(tree):
  """A tree of one-row stacks as B equal rows (parameters, or an AdamState with its per-row count)."""
  return jax.tree.map(lambda x: jnp.repeat(x, NUM_BLOCKS, axis=0), tree)


def twin_state(state: steps.TrainState) -> steps.TrainState:
  """The untied twin of a tied train state: every block row and Adam row a copy of the tied one."""
  return state.replace(params=dict(state.params, blocks=tile_rows(state.params['blocks'])),
                       opt_state=dict(state.opt_state, blocks=tile_rows(state.opt_state['blocks'])))


class Twins:
  """The tiny DiffusionBlocks ViT (B = 3, a layer per block), tied and untied, dropout off (test_steps.py's)."""

  def __init__(self, tiny_config, tiny_model, jitter_params):
    common = dict(model__dropout=0.0, model__attention_dropout=0.0, optim__lr=3e-3)
    self.tied_config = tiny_config('dblock', model__weight_tied=True, **common)
    self.config = tiny_config('dblock', **common)
    _, self.tied_graphdef, params = tiny_model(self.tied_config)
    self.graphdef, self.untied_params = models.split(nnx.eval_shape(lambda: models.build(self.config.model,
                                                                                         **TINY_DIMS)))
    self.params = jitter_params(params, seed=5, scale=0.1)  # The zero-initialised head no longer hides the block.
    self.tied = nnx.merge(self.tied_graphdef, self.params)
    self.untied = nnx.merge(self.graphdef, twin_state(steps.init_state(self.params, 0)).params)


@pytest.fixture(scope='module')
def twins(tiny_config, tiny_model, jitter_params):
  return Twins(tiny_config, tiny_model, jitter_params)


def test_one_row_of_block_parameters(twins):
  """The tied tree is the untied one with a block axis of 1: same outer parts, same row."""
  tied, untied = twins.params, twins.untied_params
  assert twins.tied.num_blocks == NUM_BLOCKS and twins.tied.num_rows == 1 and twins.untied.num_rows == NUM_BLOCKS
  assert all(x.shape[0] == 1 for x in jax.tree.leaves(tied['blocks']))
  row_shapes = lambda tree: jax.tree.map(lambda x: x.shape[1:], tree)
  assert row_shapes(tied['blocks']) == row_shapes(untied['blocks'])
  assert jax.tree.map(lambda x: x.shape, tied['shared']) == jax.tree.map(lambda x: x.shape, untied['shared'])
  assert all(x.shape[0] == NUM_BLOCKS for x in jax.tree.leaves(untied['blocks']))
  assert [blocks.row_of(b, 1) for b in range(NUM_BLOCKS)] == [0, 0, 0]
  assert [blocks.row_of(b, NUM_BLOCKS) for b in range(NUM_BLOCKS)] == [0, 1, 2]


def test_every_slice_runs_the_one_block(twins, tiny_batch):
  """Slice b of the tied model is slice b of the twin; the σ conditioning is what tells the slices apart, so the
  same block gives different outputs at different levels."""
  images = jnp.asarray(tiny_batch(4, seed=2)[0])
  z = jax.random.normal(jax.random.key(0), (4, twins.config.model.hidden_size))
  outs = []
  for b, sigma in zip(range(NUM_BLOCKS), (20.0, 0.5, 0.05)):
    s = jnp.full((4,), sigma, jnp.float32)
    out = twins.tied.denoise(images, z, s, b)
    np.testing.assert_allclose(out, twins.untied.denoise(images, z, s, b), rtol=1e-6, atol=1e-6)
    outs.append(np.asarray(out))
  assert not np.allclose(outs[0], outs[1])


def test_the_step_trains_row_zero_on_the_drawn_slice(twins, tiny_batch):
  """Each step equals the untied twin's step: the same slice drawn (so the same σ), the same loss, and the tied
  row updated as the twin's row b; the tied Adam count grows at every step, whatever slice was drawn."""
  schedule = optim.make_schedule(twins.config.optim, total_steps=100, warmup_steps=0)
  images, labels = map(jnp.asarray, tiny_batch(BATCH))
  state, drawn = steps.init_state(twins.params, seed=1), []
  compile_step = lambda graphdef, config, state: jax.jit(classification.make_train_step(
      graphdef, config, schedule)).lower(state, images, labels).compile(FAST_COMPILE)
  tied_step = compile_step(twins.tied_graphdef, twins.tied_config, state)
  untied_step = compile_step(twins.graphdef, twins.config, twin_state(state))
  for i in range(6):
    new, metrics = tied_step(state, images, labels)
    twin_new, twin_metrics = untied_step(twin_state(state), images, labels)
    b = int(metrics['block'])
    drawn.append(b)
    assert b == int(twin_metrics['block'])
    np.testing.assert_allclose(metrics['loss'], twin_metrics['loss'], rtol=1e-6)
    chex.assert_trees_all_close(blocks.block_tree(new.params, 0), blocks.block_tree(twin_new.params, b),
                                rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(new.params['shared'], twin_new.params['shared'], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(blocks.block_tree(new.opt_state, 0).mu, blocks.block_tree(twin_new.opt_state, b).mu,
                                rtol=1e-5, atol=1e-7)
    assert np.asarray(new.opt_state['blocks'].count).tolist() == [i + 1]
    moved = [not np.array_equal(a, c) for a, c in zip(jax.tree.leaves(new.params['blocks']),
                                                      jax.tree.leaves(state.params['blocks']))]
    assert all(moved), moved
    state = new
  assert len(set(drawn)) > 1, drawn  # Different slices, one row.


@pytest.mark.parametrize('num_steps', [1, 5])
def test_the_sampler_runs_the_block_n_times(twins, tiny_batch, monkeypatch, num_steps):
  """N sampler steps (any N, here 1 and 5 with B = 3) call the block N times, each on the slice owning its σ, and
  give the twin's logits."""
  calls = []
  original = dblock.DiffusionBlocksViT.denoise

  def recording(self, images, z_t, sigmas, block, **kwargs):
    calls.append((self.num_rows, block))
    return original(self, images, z_t, sigmas, block, **kwargs)

  monkeypatch.setattr(dblock.DiffusionBlocksViT, 'denoise', recording)
  images, key = jnp.asarray(tiny_batch(4, seed=3)[0]), jax.random.key(7)
  tied = classification.sample(twins.tied, images, key, num_steps=num_steps)
  slices = [partitions.route_static(s, NUM_BLOCKS) for s in partitions.inference_sigmas(num_steps)]
  assert calls == [(1, b) for b in slices]
  calls.clear()
  np.testing.assert_allclose(tied, classification.sample(twins.untied, images, key, num_steps=num_steps),
                             rtol=1e-5, atol=1e-5)
  assert calls == [(NUM_BLOCKS, b) for b in slices]


def test_the_train_state_is_one_blocks_whatever_b(tiny_config):
  """The benchmark's state bytes: weight-tied B = 3 holds what an untied B = 1 model of one block's depth holds,
  a third of the untied B = 3 stack (shapes only: nothing is compiled)."""
  def state_of(**overrides):
    config = tiny_config('dblock', **overrides)
    setting = bench.Setting('tied', config, 8, 1, 10)
    exp = experiment.experiment_from_data(config, bench.synthetic_data(setting),
                                          mesh=sharding.make_mesh(config, jax.local_devices()[:1]))
    return exp.abstract_state, bench.state_bytes(exp)['state_device_bytes']

  tied, tied_bytes = state_of(model__weight_tied=True)
  one, one_bytes = state_of(model__num_layers=1, model__num_blocks=1)
  untied, untied_bytes = state_of()
  chex.assert_trees_all_equal_shapes(tied, one)
  assert tied_bytes == one_bytes
  block_bytes = lambda s: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((s.params['blocks'],
                                                                                  s.opt_state['blocks'])))
  assert block_bytes(untied) == NUM_BLOCKS * block_bytes(tied) and untied_bytes - tied_bytes == 2 * block_bytes(tied)


def test_the_wrapper_refuses_what_cannot_be_tied():
  layer = lambda rngs: nnx.Linear(2, 2, rngs=rngs)
  outer = lambda rngs: nnx.Linear(2, 2, rngs=rngs)
  with pytest.raises(ValueError, match='weight_tied=True needs blocks of equal depth'):
    blocks.DiffusionBlocks(layer, [2, 1], make_outer=outer, rngs=nnx.Rngs(0), weight_tied=True)
  with pytest.raises(ValueError, match='independent=True'):
    blocks.DiffusionBlocks(layer, [1, 1], make_outer=outer, rngs=nnx.Rngs(0), independent=True, weight_tied=True)


def test_the_release_checkpoints_are_not_imported_into_one_block(tiny_config):
  from diffblocks_jax.tools import import_torch  # pylint: disable=g-import-not-at-top
  with pytest.raises(import_torch.CheckpointImportError, match='set config.model.weight_tied=False'):
    import_torch.convert({}, tiny_config('dblock', model__weight_tied=True, model__label_token='replace'))
