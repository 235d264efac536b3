"""The public wrapper (core/blocks.py): a layer stack that is not the ViT, wrapped, trained and sampled.

The wrapping example is the README's own code block, executed as written, so the README cannot drift.
"""

from __future__ import annotations

import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffblocks_jax.core import blocks

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def readme_example() -> str:
  """The python block that follows the `<!-- wrapping-example -->` marker in the README."""
  text = README.read_text()
  match = re.search(r'<!-- wrapping-example -->\s*```python\n(.*?)```', text, re.S)
  assert match, 'README.md lost its wrapping example'
  return match.group(1)


def test_readme_example_is_short():
  # 35, not 25, since the example also loads the digits, trains and reports its accuracy (it runs as written).
  code = [line for line in readme_example().splitlines() if line.strip() and not line.lstrip().startswith('#')]
  assert len(code) <= 35, len(code)


@pytest.fixture(scope='module')
def wrapped():
  """The README example's namespace after it ran: its model, trained state, step, data and accuracy."""
  namespace = {}
  exec(compile(readme_example(), 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  return namespace


def digits_split():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  d = datasets.load_digits()
  x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)
  perm = np.random.default_rng(0).permutation(len(x))
  x, y = x[perm], y[perm]
  return x[:1400], y[:1400], x[1400:], y[1400:]


def test_wrapped_stack_trains_and_samples(wrapped):
  """The README's residual-MLP stack, trained by the README's own loop (1,500 steps of 64 digits) through the same
  step and sampler as the ViT: it learns the digits.

  Measured on the 2-core CPU machine: 98.5 % on the 397 held-out digits after 1,500 steps.
  """
  model, state, train_step = wrapped['model'], wrapped['state'], wrapped['train_step']
  classification, graphdef, plan = wrapped['classification'], wrapped['graphdef'], wrapped['plan']
  x, y, metrics, accuracy = wrapped['x'], wrapped['y'], wrapped['metrics'], wrapped['accuracy']
  assert model.stacked and model.num_blocks == 3 and not isinstance(model.outer(model.block(0)), nnx.List)
  assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(state.params['blocks']))
  x_train, y_train, x_test, y_test = digits_split()  # The example's split is the seeded 1,400 / 397 one.
  np.testing.assert_array_equal(x[:1400], x_train)
  np.testing.assert_array_equal(y[:1400], y_train)
  np.testing.assert_array_equal(x[1400:], x_test)
  np.testing.assert_array_equal(y[1400:], y_test)
  assert int(state.step) == 1500 and np.isfinite(float(metrics['loss']))
  assert accuracy >= 0.90, accuracy
  # One Adam count per block, advanced only by the steps that drew it: all 1,500 of the example's, then a few more
  # whose draws are recorded here.
  counts = np.asarray(state.opt_state['blocks'].count)
  assert counts.sum() == 1500, counts
  rng, drawn, more = np.random.default_rng(1), [], state
  for _ in range(60):
    idx = rng.integers(0, len(x_train), 64)
    more, metrics = train_step(more, x_train[idx], y_train[idx])
    drawn.append(int(metrics['block']))
  np.testing.assert_array_equal(np.asarray(more.opt_state['blocks'].count) - counts, np.bincount(drawn, minlength=3))
  logits, probs = classification.sample(nnx.merge(graphdef, state.params), x_test, jax.random.key(0), num_steps=3,
                                        edm=plan.edm, return_trajectory=True)
  assert float(np.mean(np.argmax(logits, -1) == y_test)) >= 0.90
  assert probs.shape == (len(x_test), 3, 10)


def test_wrapped_stack_sampler_calls_each_block_at_its_own_levels(wrapped):
  """With B = N = 3 the sampler's steps run blocks 0, 1, 2 in turn, each once (one pass through the depth)."""
  model, plan, classification = wrapped['model'], wrapped['plan'], wrapped['classification']
  calls = []
  original = blocks.DiffusionBlocks.denoise

  def spy(self, *inputs, block, key=None):
    calls.append(block)
    return original(self, *inputs, block=block, key=key)

  try:
    blocks.DiffusionBlocks.denoise = spy
    classification.sample(model, jnp.ones((2, 64)), jax.random.key(0), num_steps=3, edm=plan.edm)
    assert calls == [plan.route_static(s) for s in plan.inference_levels(3)] == [0, 1, 2]
    calls.clear()
    classification.sample(model, jnp.ones((2, 64)), jax.random.key(0), num_steps=6, edm=plan.edm)
    assert calls == [0, 0, 1, 1, 2, 2]  # Equal-mass steps: two per block.
  finally:
    blocks.DiffusionBlocks.denoise = original


# ---------------------------------------------------------------------------- layouts and row helpers

class Scale(nnx.Module):
  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (4,)))

  def __call__(self, x):
    return x * self.w[...]


class Head(nnx.Module):
  def __init__(self, rngs):
    self.b = nnx.Param(jax.random.normal(rngs.params(), (4,)))

  def __call__(self, layers, x, key=None):
    return layers(x) + self.b[...]


def build(counts, **kwargs):
  return blocks.DiffusionBlocks(Scale, counts, make_outer=Head, rngs=nnx.Rngs(0), **kwargs)


def test_equal_depths_stack_and_uneven_depths_list():
  stacked, listed = build([2, 2, 2]), build([2, 1])
  assert stacked.stacked and not listed.stacked
  params = nnx.to_pure_dict(nnx.split(stacked)[1])
  assert params['blocks']['layers'][0]['w'].shape == (3, 4) and params['shared']['b'].shape == (4,)
  assert sorted(nnx.to_pure_dict(nnx.split(listed)[1])['blocks']) == [0, 1]
  with pytest.raises(ValueError, match='equal depth'):
    build([2, 1], stack=True)
  with pytest.raises(ValueError, match='layer_counts'):
    build([])


def test_stacking_keeps_the_initial_draws():
  """Stacked and list layouts of one seed hold the same numbers: stacking changes the layout, not the init."""
  stacked = nnx.to_pure_dict(nnx.split(build([1, 1, 1]))[1])
  listed = nnx.to_pure_dict(nnx.split(build([1, 1, 1], stack=False))[1])
  chex.assert_trees_all_equal(blocks.restack(listed), stacked)
  chex.assert_trees_all_equal(blocks.unstack(stacked), listed)
  for b in range(3):
    chex.assert_trees_all_equal(blocks.block_tree(stacked, b), listed['blocks'][b])


def test_traced_block_index_selects_its_row():
  model = build([1, 1, 1])
  x = jnp.ones((2, 4))
  by_int = [model.denoise(x, block=b) for b in range(3)]
  graphdef, state = nnx.split(model)
  traced = jax.jit(lambda s, b: nnx.merge(graphdef, s).denoise(x, block=b))
  for b in range(3):
    chex.assert_trees_all_close(traced(state, jnp.int32(b)), by_int[b])
  assert not np.allclose(by_int[0], by_int[1])


def test_take_and_put_touch_only_row_b():
  params = nnx.to_pure_dict(nnx.split(build([1, 1, 1]))[1])
  part = blocks.take(params, 1)
  assert part['block']['layers'][0]['w'].shape == (1, 4) and 'shared' in part
  new = jax.tree.map(lambda x: x + 1.0, part)
  out = blocks.put(params, new, 1)
  w, w0 = out['blocks']['layers'][0]['w'], params['blocks']['layers'][0]['w']
  np.testing.assert_array_equal(w[1], w0[1] + 1.0)
  np.testing.assert_array_equal(np.asarray(w)[[0, 2]], np.asarray(w0)[[0, 2]])
  np.testing.assert_array_equal(out['shared']['b'], params['shared']['b'] + 1.0)
  view, index = blocks.model_params(params, part, 1)
  assert index == 0 and view['blocks']['layers'][0]['w'].shape == (1, 4)


def test_independent_outer_parts_are_per_block_copies():
  model = build([1, 1], independent=True)
  params = nnx.to_pure_dict(nnx.split(model)[1])
  assert 'shared' not in params and params['blocks']['shared']['b'].shape == (2, 4)
  np.testing.assert_array_equal(params['blocks']['shared']['b'][0], params['blocks']['shared']['b'][1])
