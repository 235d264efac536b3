"""Training steps (SPEC §5, §6): one block per step, per-group Adam state, loss weighting, determinism."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from diffblocks_jax.core import partitions
from diffblocks_jax.core import blocks, optim, steps
from diffblocks_jax.tasks import classification

NUM_BLOCKS = 3
BATCH = 8


def changed_leaves(old, new):
  """Per leaf: True where the arrays are not bit-identical."""
  return [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new))]


def assert_all_changed(old, new, what):
  flags = changed_leaves(old, new)
  assert flags and all(flags), f'{what}: {flags.count(False)} of {len(flags)} leaves unchanged'


def moment_gradient_norm(old, new, b, b1):
  """The global norm of the (clipped) gradient that a step folded into the first moments of the shared parts and
  block b, read back from mu' = b1·mu + (1 − b1)·g (float64)."""
  moments = [(old.opt_state['shared'].mu, new.opt_state['shared'].mu),
             (blocks.block_tree(old.opt_state, b).mu, blocks.block_tree(new.opt_state, b).mu)]
  return float(np.sqrt(sum(
      np.sum(((np.asarray(m, np.float64) - b1 * np.asarray(m0, np.float64)) / (1 - b1))**2)
      for before, after in moments for m0, m in zip(jax.tree.leaves(before), jax.tree.leaves(after)))))


class Setup:
  """A jitted DiffusionBlocks (or baseline) step on a tiny config, compiled once per module."""

  def __init__(self, tiny_config, tiny_model, kind='dblock', **overrides):
    # lr 3e-3 so that a few dozen steps visibly fit the tiny batch. Dropout off: it is covered in
    # test_models, and its random-bit generators dominate the compile time of these steps on CPU.
    overrides = dict(dict(model__dropout=0.0, model__attention_dropout=0.0), **overrides)
    self.config = tiny_config(kind, optim__lr=3e-3, **overrides)
    _, self.graphdef, self.params = tiny_model(self.config)
    self.schedule = optim.make_schedule(self.config.optim, total_steps=1000, warmup_steps=0)
    self.step = jax.jit(classification.make_train_step(self.graphdef, self.config, self.schedule))
    graphdef = self.graphdef
    self.denoise = jax.jit(lambda p, x, z, s, key, b: nnx.merge(graphdef, p).denoise(x, z, s, b, key=key),
                           static_argnums=5)

  def state(self, params=None, seed=0):
    return steps.init_state(self.params if params is None else params, seed)


@pytest.fixture(scope='module')
def dblock_setup(tiny_config, tiny_model):
  return Setup(tiny_config, tiny_model)


@pytest.fixture(scope='module')
def batch(tiny_batch):
  images, labels = tiny_batch(BATCH)
  return jnp.asarray(images), jnp.asarray(labels)


def test_opt_state_layout(dblock_setup):
  """Stacked blocks: one Adam group over the stacks with a count per block; the shared parts their own."""
  state = dblock_setup.state()
  assert sorted(state.opt_state) == ['blocks', 'shared']
  group = state.opt_state['blocks']
  assert isinstance(group, optim.AdamState) and group.count.shape == (NUM_BLOCKS,)
  assert np.all(np.asarray(group.count) == 0) and int(state.opt_state['shared'].count) == 0
  chex.assert_trees_all_equal_shapes(state.opt_state['shared'].mu, state.params['shared'])
  chex.assert_trees_all_equal_shapes(group.nu, state.params['blocks'])
  assert all(leaf.shape[0] == NUM_BLOCKS for leaf in jax.tree.leaves(state.params['blocks']))


def test_dblock_step_updates_only_its_block(dblock_setup, batch, jitter_params):
  """Over many steps: only the drawn block (and the shared parts) move; idle Adam state is untouched."""
  state = dblock_setup.state(jitter_params(dblock_setup.params, scale=0.05))
  chosen = []
  for i in range(24):
    new, metrics = dblock_setup.step(state, *batch)
    b = int(metrics['block'])
    assert 0 <= b < NUM_BLOCKS
    chosen.append(b)
    assert int(new.step) == i + 1
    assert np.isfinite(float(metrics['loss']))
    # The reported gradient norm is the norm of the gradient Adam received, capped at optim.grad_clip (1 here).
    o = dblock_setup.config.optim
    np.testing.assert_allclose(moment_gradient_norm(state, new, b, o.b1),
                               min(float(metrics['grad_norm']), o.grad_clip or np.inf), rtol=1e-3)
    assert_all_changed(state.params['shared'], new.params['shared'], f'step {i}: shared params')
    assert_all_changed(blocks.block_tree(state.params, b), blocks.block_tree(new.params, b), f'step {i}: block {b} params')
    for k in range(NUM_BLOCKS):
      if k == b:
        continue
      chex.assert_trees_all_equal(blocks.block_tree(new.params, k), blocks.block_tree(state.params, k))
      chex.assert_trees_all_equal(blocks.block_tree(new.opt_state, k), blocks.block_tree(state.opt_state, k))  # count, mu and nu
    assert int(blocks.block_tree(new.opt_state, b).count) == int(blocks.block_tree(state.opt_state, b).count) + 1
    assert_all_changed(blocks.block_tree(state.opt_state, b).mu, blocks.block_tree(new.opt_state, b).mu, f'step {i}: block {b} mu')
    assert int(new.opt_state['shared'].count) == i + 1
    state = new
  counts = np.bincount(chosen, minlength=NUM_BLOCKS)
  assert np.all(counts > 0), f'a block was never drawn in 24 steps: {chosen}'
  assert [int(blocks.block_tree(state.opt_state, k).count) for k in range(NUM_BLOCKS)] == counts.tolist()


def test_dblock_step_is_deterministic(dblock_setup, batch, jitter_params):
  state = dblock_setup.state(jitter_params(dblock_setup.params, seed=3))
  a = dblock_setup.step(state, *batch)
  b = dblock_setup.step(state, *batch)
  chex.assert_trees_all_equal(a, b)
  # A different run seed draws a different block/σ/noise/dropout, so the update differs.
  c = dblock_setup.step(state.replace(rng=dblock_setup.state(seed=1).rng), *batch)
  assert any(changed_leaves(a[0].params, c[0].params))


def step_draws(setup, state):
  """The step's own random draws (SPEC §5.1-5.5): σ, block, label noise and the dropout key."""
  sigma_key, noise_key, _, dropout_key = steps.step_keys(state, 4)
  sigmas, block = partitions.sample_training_sigmas(sigma_key, BATCH, NUM_BLOCKS, setup.config.diffusion.overlap)
  noise = jax.random.normal(noise_key, (BATCH, setup.config.model.hidden_size), jnp.float32)
  return sigmas, block, noise, dropout_key


_step_draws = jax.jit(step_draws, static_argnums=0)


def expected_losses(setup, state, images, labels):
  """SPEC §5.5-5.6 recomputed from the step's draws and the model's logits, in NumPy float64."""
  sigmas, block, noise, dropout_key = _step_draws(setup, state)
  block = int(block)
  table = np.asarray(state.params['shared']['label_embed'], np.float64)
  z = table[np.asarray(labels)]
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  s = np.asarray(sigmas, np.float64)
  z_t = z + s[:, None] * np.asarray(noise, np.float64)
  logits = np.asarray(setup.denoise(state.params, images, jnp.asarray(z_t, jnp.float32), sigmas, dropout_key,
                                    block), np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  ce = -log_probs[np.arange(BATCH), np.asarray(labels)]
  w = (s**2 + 0.25) / (s * 0.5)**2
  expected = dict(batch_mean=w.mean() * ce.mean(), per_sample=(w * ce).mean(), ce=ce.mean())
  # The two weightings really differ on these draws, so a check against one tells them apart.
  assert abs(expected['per_sample'] - expected['batch_mean']) > 1e-3 * expected['batch_mean']
  return block, expected


def test_step_loss_is_batch_mean(dblock_setup, batch, jitter_params):
  """The default (release) weighting through the jitted step: mean(w)·mean(ce)."""
  assert dblock_setup.config.diffusion.loss_weighting == 'batch_mean'
  params = jitter_params(dblock_setup.params, scale=0.1)  # non-uniform logits: ce varies over the batch
  seen = set()
  for seed in (0, 1, 2, 3):
    state = dblock_setup.state(params, seed=seed)
    _, metrics = dblock_setup.step(state, *batch)
    block, expected = expected_losses(dblock_setup, state, *batch)
    seen.add(block)
    assert int(metrics['block']) == block
    np.testing.assert_allclose(float(metrics['ce']), expected['ce'], rtol=1e-4)
    np.testing.assert_allclose(float(metrics['loss']), expected['batch_mean'], rtol=1e-4)
  assert len(seen) > 1


@pytest.mark.parametrize('weighting', ['batch_mean', 'per_sample'])
def test_dblock_loss_weighting(dblock_setup, batch, jitter_params, weighting):
  """The classification task's loss under both settings (per_sample = mean(w·ce), the paper's formula)."""
  task = classification.Classification(loss_weighting=weighting)
  graphdef = dblock_setup.graphdef

  def loss_fn(p, x, y, s, n, k, b):
    model = nnx.merge(graphdef, p)
    z_t = task.target(model, y, b) + s[:, None] * n
    return task.loss(task.denoise(model, x, z_t, s, b, k), y, s)

  loss_fn = jax.jit(loss_fn, static_argnums=6)
  params = jitter_params(dblock_setup.params, scale=0.1)
  for seed in (0, 1):
    state = dblock_setup.state(params, seed=seed)
    sigmas, block, noise, dropout_key = _step_draws(dblock_setup, state)
    loss, aux = loss_fn(params, *batch, sigmas, noise, dropout_key, int(block))
    _, expected = expected_losses(dblock_setup, state, *batch)
    np.testing.assert_allclose(float(aux['ce']), expected['ce'], rtol=1e-4)
    np.testing.assert_allclose(float(loss), expected[weighting], rtol=1e-4)


def dblock_eval_ce(setup, params, images, labels):
  """Mean CE of each block at its inference σ (80 / 0.3012 / 0.002), fixed noise, no dropout."""
  noise = np.random.default_rng(5).normal(size=(BATCH, setup.config.model.hidden_size))
  table = np.asarray(params['shared']['label_embed'], np.float64)[np.asarray(labels)]
  z = table / np.linalg.norm(table, axis=-1, keepdims=True)
  out = []
  for sigma in partitions.inference_sigmas(NUM_BLOCKS):
    b = partitions.route_static(sigma, NUM_BLOCKS)
    s = jnp.full((BATCH,), sigma, jnp.float32)
    logits = setup.denoise(params, images, jnp.asarray(z + sigma * noise, jnp.float32), s, None, b)
    out.append(float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()))
  return np.array(out)


def test_dblock_loss_decreases(dblock_setup, batch):
  state = dblock_setup.state()
  before = dblock_eval_ce(dblock_setup, state.params, *batch)
  np.testing.assert_allclose(before, np.log(5), rtol=1e-6)  # zero head: uniform logits
  for _ in range(40):
    state, _ = dblock_setup.step(state, *batch)
  after = dblock_eval_ce(dblock_setup, state.params, *batch)
  assert after.mean() < 0.85 * before.mean(), (before, after)
  assert np.all(after < before), (before, after)


def test_baseline_step(tiny_config, tiny_model, batch, jitter_params):
  setup = Setup(tiny_config, tiny_model, kind='vit')
  state = setup.state()
  assert isinstance(state.opt_state, optim.AdamState)
  new, metrics = setup.step(state, *batch)
  assert_all_changed(state.params, new.params, 'baseline params')
  assert int(new.opt_state.count) == 1 and int(new.step) == 1 and int(metrics['block']) == 0
  chex.assert_trees_all_equal(setup.step(state, *batch), (new, metrics))  # deterministic
  # Loss on the fixed batch falls within a few dozen steps.
  first = float(metrics['loss'])
  for _ in range(30):
    new, metrics = setup.step(new, *batch)
  assert float(metrics['loss']) < 0.7 * first


def test_independent_blocks_step(tiny_config, tiny_model, batch, jitter_params):
  setup = Setup(tiny_config, tiny_model, model__independent_blocks=True)
  state = setup.state(jitter_params(setup.params, seed=5))
  assert 'shared' not in state.params and 'shared' not in state.opt_state
  assert all('shared' in blocks.block_tree(state.params, k) for k in range(NUM_BLOCKS))
  chosen = []
  for i in range(12):
    new, metrics = setup.step(state, *batch)
    b = int(metrics['block'])
    chosen.append(b)
    assert_all_changed(blocks.block_tree(state.params, b), blocks.block_tree(new.params, b), f'step {i}: block {b}')
    assert_all_changed(blocks.block_tree(state.params, b)['shared'], blocks.block_tree(new.params, b)['shared'],
                       f'step {i}: block {b} shared copy')
    for k in range(NUM_BLOCKS):
      if k != b:
        chex.assert_trees_all_equal(blocks.block_tree(new.params, k), blocks.block_tree(state.params, k))
        chex.assert_trees_all_equal(blocks.block_tree(new.opt_state, k), blocks.block_tree(state.opt_state, k))
    assert int(blocks.block_tree(new.opt_state, b).count) == int(blocks.block_tree(state.opt_state, b).count) + 1
    state = new
  assert [int(blocks.block_tree(state.opt_state, k).count) for k in range(NUM_BLOCKS)] == \
      np.bincount(chosen, minlength=NUM_BLOCKS).tolist()
  assert len(set(chosen)) == NUM_BLOCKS


# ------------------------------------------------------------------------------ stacked blocks (core/blocks.py)

def list_layout_setup(setup):
  """The same model (same seed, so the same initial parameters) with its blocks as a list: the switch path."""
  from diffblocks_jax.models import dblock  # pylint: disable=g-import-not-at-top
  from helpers import TINY_DIMS  # pylint: disable=g-import-not-at-top
  model = dblock.DiffusionBlocksViT(setup.config.model, rngs=nnx.Rngs(0), stack=False, **TINY_DIMS)
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  step = jax.jit(classification.make_train_step(graphdef, setup.config, setup.schedule))
  return params, step


def test_stacked_and_switched_blocks_give_the_same_updates(dblock_setup, batch, jitter_params):
  """Stacked rows sliced and written in place ≡ a lax.switch over a list of blocks, step after step."""
  list_params, list_step = list_layout_setup(dblock_setup)
  chex.assert_trees_all_equal(blocks.restack(list_params), dblock_setup.params)  # Same init, other layout.
  stacked = dblock_setup.state(jitter_params(dblock_setup.params, seed=7))
  listed = steps.init_state(blocks.unstack(stacked.params), 0)
  drawn = set()
  for _ in range(12):
    stacked, m_stacked = dblock_setup.step(stacked, *batch)
    listed, m_listed = list_step(listed, *batch)
    assert int(m_stacked['block']) == int(m_listed['block'])
    drawn.add(int(m_stacked['block']))
    np.testing.assert_allclose(float(m_stacked['loss']), float(m_listed['loss']), rtol=1e-5)
  assert drawn == set(range(NUM_BLOCKS))
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  jax.tree.map(close, blocks.unstack(stacked.params), listed.params)
  for b in range(NUM_BLOCKS):
    jax.tree.map(close, blocks.block_tree(stacked.opt_state, b), listed.opt_state['blocks'][b])


_HLO_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(\w+\[[\d,]*\])(?:\{[^}]*\})?\s+([\w\-]+)\(')


def stacked_copies(hlo: str, state) -> list[str]:
  """HLO `copy` instructions whose result has the shape of a block-stacked leaf (rank >= 2, leading B)."""
  names = {jnp.dtype(jnp.float32): 'f32', jnp.dtype(jnp.int32): 's32'}
  shapes = {f'{names[x.dtype]}[{",".join(map(str, x.shape))}]' for x in jax.tree.leaves(state)
            if x.ndim >= 2 and x.shape[0] == NUM_BLOCKS}
  assert shapes, 'no block-stacked leaves to look for'
  return [line for line in hlo.splitlines()
          if (m := _HLO_INSTRUCTION.match(line)) and m[2] in ('copy', 'copy-start') and m[1] in shapes]


@pytest.mark.parametrize('independent', [False, True])
def test_compiled_step_copies_no_block_stack(dblock_setup, tiny_config, tiny_model, batch, independent):
  """The drawn block's row is written in place: no copy of any stacked parameter or Adam moment (with
  independent blocks the outer parts' copies are stacked too)."""
  setup = Setup(tiny_config, tiny_model, model__independent_blocks=True) if independent else dblock_setup
  state = setup.state()
  step = classification.make_train_step(setup.graphdef, setup.config, setup.schedule)
  hlo = jax.jit(step, donate_argnums=0).lower(state, *batch).compile().as_text()
  assert 'dynamic-update-slice' in hlo  # The checker looks at a program that does write rows.
  assert not stacked_copies(hlo, (state.params['blocks'], state.opt_state['blocks'])), \
      stacked_copies(hlo, (state.params['blocks'], state.opt_state['blocks']))[:5]


def test_stacked_copy_checker_sees_a_copy():
  """The HLO check above can fail: a row written while the old stack is still read forces a copy, caught."""
  stack = jnp.zeros((NUM_BLOCKS, 24, 24))

  def write_and_read_old(x):
    return jax.lax.dynamic_update_slice_in_dim(x, jnp.ones((1, 24, 24)), 1, 0), jnp.sum(x)

  hlo = jax.jit(write_and_read_old, donate_argnums=0).lower(stack).compile().as_text()
  assert stacked_copies(hlo, stack)


def test_offloaded_blocks_give_the_same_updates(dblock_setup, batch, jitter_params):
  """`train.offload_idle_blocks`: the stacks live in host memory, a row at a time on the device; same results.

  On CPU every memory kind is the same RAM, so this checks the program (fetch/store around every row), not
  the bytes saved: the benchmark reports those.
  """
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  device = jax.local_devices()[0]
  mesh = jax.sharding.Mesh(np.array([device]), ('data',))
  here, host = NamedSharding(mesh, P()), NamedSharding(mesh, P(), memory_kind='pinned_host')
  state = dblock_setup.state(jitter_params(dblock_setup.params, seed=2))
  place = lambda tree: dict(jax.tree.map(lambda _: here, tree), blocks=jax.tree.map(lambda _: host, tree['blocks']))
  shardings = state.replace(step=here, rng=here, params=place(state.params), opt_state=place(state.opt_state))
  step = classification.make_train_step(dblock_setup.graphdef, dblock_setup.config, dblock_setup.schedule,
                                        placement=blocks.Placement(host=True))
  offloaded = jax.jit(step, in_shardings=(shardings, here, here), out_shardings=(shardings, here))
  host_state = jax.device_put(state, shardings)
  assert host_state.params['blocks']['layers'][0]['attn']['query']['kernel'].sharding.memory_kind == 'pinned_host'
  for _ in range(6):
    state, m_plain = dblock_setup.step(state, *batch)
    host_state, m_host = offloaded(host_state, *batch)
    assert int(m_plain['block']) == int(m_host['block'])
  leaf = host_state.opt_state['blocks'].mu['layers'][0]['mlp']['fc1']['kernel']
  assert leaf.sharding.memory_kind == 'pinned_host'  # Still on the host after the updates.
  chex.assert_trees_all_close(jax.device_get(host_state), jax.device_get(state), rtol=1e-6, atol=1e-7)
