"""Training steps (SPEC §5, §6): one block per step, per-group Adam state, loss weighting, determinism."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from diffblocks_jax import diffusion, optim, steps

NUM_BLOCKS = 3
BATCH = 8


def changed_leaves(old, new):
  """Per leaf: True where the arrays are not bit-identical."""
  return [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new))]


def assert_all_changed(old, new, what):
  flags = changed_leaves(old, new)
  assert flags and all(flags), f'{what}: {flags.count(False)} of {len(flags)} leaves unchanged'


class Setup:
  """A jitted DiffusionBlocks (or baseline) step on a tiny config, compiled once per module."""

  def __init__(self, tiny_config, tiny_model, kind='dblock', **overrides):
    # lr 3e-3 so that a few dozen steps visibly fit the tiny batch. Dropout off: it is covered in
    # test_models, and its random-bit generators dominate the compile time of these steps on CPU.
    overrides = dict(dict(model__dropout=0.0, model__attention_dropout=0.0), **overrides)
    self.config = tiny_config(kind, optim__lr=3e-3, **overrides)
    _, self.graphdef, self.params = tiny_model(self.config)
    self.schedule = optim.make_schedule(self.config.optim, total_steps=1000, warmup_steps=0)
    self.step = jax.jit(steps.make_train_step(self.graphdef, self.config, self.schedule,
                                              NUM_BLOCKS if kind == 'dblock' else 1))
    graphdef = self.graphdef
    self.denoise = jax.jit(lambda p, x, z, s, key, b: nnx.merge(graphdef, p).denoise(x, z, s, b, key=key),
                           static_argnums=5)

  def state(self, params=None, seed=0):
    return steps.init_state(self.params if params is None else params, self.config.model.kind, seed)


@pytest.fixture(scope='module')
def dblock_setup(tiny_config, tiny_model):
  return Setup(tiny_config, tiny_model)


@pytest.fixture(scope='module')
def batch(tiny_batch):
  images, labels = tiny_batch(BATCH)
  return jnp.asarray(images), jnp.asarray(labels)


def test_opt_state_layout(dblock_setup):
  state = dblock_setup.state()
  assert sorted(state.opt_state) == ['blocks', 'shared']
  assert sorted(state.opt_state['blocks']) == list(range(NUM_BLOCKS))
  for group in [state.opt_state['shared'], *state.opt_state['blocks'].values()]:
    assert isinstance(group, optim.AdamState) and int(group.count) == 0
  chex.assert_trees_all_equal_shapes(state.opt_state['shared'].mu, state.params['shared'])
  chex.assert_trees_all_equal_shapes(state.opt_state['blocks'][1].nu, state.params['blocks'][1])


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
    assert np.isfinite(float(metrics['loss'])) and float(metrics['grad_norm']) > 0
    assert_all_changed(state.params['shared'], new.params['shared'], f'step {i}: shared params')
    assert_all_changed(state.params['blocks'][b], new.params['blocks'][b], f'step {i}: block {b} params')
    old_groups, new_groups = state.opt_state['blocks'], new.opt_state['blocks']
    for k in range(NUM_BLOCKS):
      if k == b:
        continue
      chex.assert_trees_all_equal(new.params['blocks'][k], state.params['blocks'][k])
      chex.assert_trees_all_equal(new_groups[k], old_groups[k])  # count, mu and nu
    assert int(new_groups[b].count) == int(old_groups[b].count) + 1
    assert_all_changed(old_groups[b].mu, new_groups[b].mu, f'step {i}: block {b} mu')
    assert int(new.opt_state['shared'].count) == i + 1
    state = new
  counts = np.bincount(chosen, minlength=NUM_BLOCKS)
  assert np.all(counts > 0), f'a block was never drawn in 24 steps: {chosen}'
  assert [int(state.opt_state['blocks'][k].count) for k in range(NUM_BLOCKS)] == counts.tolist()


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
  sigmas, block = diffusion.sample_training_sigmas(sigma_key, BATCH, NUM_BLOCKS, setup.config.diffusion.overlap)
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
  """`steps.dblock_loss` under both settings (per_sample = mean(w·ce), the paper's formula)."""
  config = dblock_setup.config.copy_and_resolve_references()
  config.diffusion.loss_weighting = weighting
  graphdef = dblock_setup.graphdef
  loss_fn = jax.jit(lambda p, x, y, s, n, k, b: steps.dblock_loss(nnx.merge(graphdef, p), x, y, s, n, b, config, k),
                    static_argnums=6)
  params = jitter_params(dblock_setup.params, scale=0.1)
  for seed in (0, 1):
    state = dblock_setup.state(params, seed=seed)
    sigmas, block, noise, dropout_key = _step_draws(dblock_setup, state)
    loss, ce = loss_fn(params, *batch, sigmas, noise, dropout_key, int(block))
    _, expected = expected_losses(dblock_setup, state, *batch)
    np.testing.assert_allclose(float(ce), expected['ce'], rtol=1e-4)
    np.testing.assert_allclose(float(loss), expected[weighting], rtol=1e-4)


def dblock_eval_ce(setup, params, images, labels):
  """Mean CE of each block at its inference σ (80 / 0.3012 / 0.002), fixed noise, no dropout."""
  noise = np.random.default_rng(5).normal(size=(BATCH, setup.config.model.hidden_size))
  table = np.asarray(params['shared']['label_embed'], np.float64)[np.asarray(labels)]
  z = table / np.linalg.norm(table, axis=-1, keepdims=True)
  out = []
  for sigma in diffusion.inference_sigmas(NUM_BLOCKS):
    b = diffusion.route_static(sigma, NUM_BLOCKS)
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
  assert all('shared' in state.params['blocks'][k] for k in range(NUM_BLOCKS))
  chosen = []
  for i in range(12):
    new, metrics = setup.step(state, *batch)
    b = int(metrics['block'])
    chosen.append(b)
    assert_all_changed(state.params['blocks'][b], new.params['blocks'][b], f'step {i}: block {b}')
    assert_all_changed(state.params['blocks'][b]['shared'], new.params['blocks'][b]['shared'],
                       f'step {i}: block {b} shared copy')
    for k in range(NUM_BLOCKS):
      if k != b:
        chex.assert_trees_all_equal(new.params['blocks'][k], state.params['blocks'][k])
        chex.assert_trees_all_equal(new.opt_state['blocks'][k], state.opt_state['blocks'][k])
    assert int(new.opt_state['blocks'][b].count) == int(state.opt_state['blocks'][b].count) + 1
    state = new
  assert [int(state.opt_state['blocks'][k].count) for k in range(NUM_BLOCKS)] == \
      np.bincount(chosen, minlength=NUM_BLOCKS).tolist()
  assert len(set(chosen)) == NUM_BLOCKS
