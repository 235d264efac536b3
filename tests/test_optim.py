"""AdamW, gradient clipping and LR schedules against PyTorch's definitions (SPEC §6), in NumPy."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffblocks_jax import config as config_lib
from diffblocks_jax.core import optim


def optim_config(**overrides):
  c = config_lib.get_base_config().optim
  for k, v in overrides.items():
    c[k] = v
  return c


def torch_adamw_step(p, g, m, v, step, lr, b1, b2, eps, wd):
  """torch.optim.AdamW (single-tensor, amsgrad=False, maximize=False), written out in float64.

  `step` is the parameter's own step count *before* this update; torch increments it first.
  """
  step += 1
  p = p * (1 - lr * wd)  # decoupled decay
  m = m + (g - m) * (1 - b1)  # exp_avg.lerp_(grad, 1 - beta1)
  v = v * b2 + (1 - b2) * g * g
  bias_correction1 = 1 - b1**step
  bias_correction2 = 1 - b2**step
  step_size = lr / bias_correction1
  denom = np.sqrt(v) / math.sqrt(bias_correction2) + eps
  p = p - step_size * m / denom
  return p, m, v, step


@pytest.mark.parametrize('grad_scale', [1.0, 1e-8])  # 1e-8: √v̂ is of the order of eps
def test_adamw_matches_torch_over_steps(grad_scale):
  cfg = optim_config(lr=1e-2, weight_decay=0.1)
  rng = np.random.default_rng(0)
  shapes = {'w': (3, 4), 'b': (4,), 'nested': {'e': (2, 2, 2)}}
  params = jax.tree.map(lambda s: rng.normal(size=s), shapes, is_leaf=lambda x: isinstance(x, tuple))
  ref_p = params
  ref_m = jax.tree.map(np.zeros_like, params)
  ref_v = jax.tree.map(np.zeros_like, params)
  ref_step = 0
  jparams = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = optim.init_group(jparams)
  assert int(state.count) == 0
  update = jax.jit(lambda p, g, s, lr: optim.adamw(p, g, s, lr, cfg))
  # Several steps with varying gradient scales (tiny ones make eps matter) and a varying LR.
  for i, (scale, lr) in enumerate([(1.0, 1e-2), (1e-6, 1e-2), (3.0, 5e-3), (1e-3, 2e-2), (0.5, 1e-2),
                                   (2.0, 1e-3)]):
    grads = jax.tree.map(lambda x: grad_scale * scale * rng.normal(size=x.shape), params)
    jparams, state = update(jparams, jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads), state,
                            jnp.float32(lr))
    out = jax.tree.map(lambda p, g, m, v: torch_adamw_step(p, g, m, v, ref_step, lr, cfg.b1, cfg.b2, cfg.eps,
                                                           cfg.weight_decay),
                       ref_p, grads, ref_m, ref_v)
    is_out = lambda x: isinstance(x, tuple) and len(x) == 4
    ref_p = jax.tree.map(lambda o: o[0], out, is_leaf=is_out)
    ref_m = jax.tree.map(lambda o: o[1], out, is_leaf=is_out)
    ref_v = jax.tree.map(lambda o: o[2], out, is_leaf=is_out)
    ref_step += 1
    assert int(state.count) == ref_step
    chex.assert_trees_all_close(jparams, ref_p, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(state.mu, ref_m, rtol=1e-5, atol=1e-10 * grad_scale)
    chex.assert_trees_all_close(state.nu, ref_v, rtol=1e-5, atol=1e-14 * grad_scale**2)


def test_adamw_bias_correction_uses_group_count():
  """A group resuming at its own count k corrects with k+1, whatever the global step is."""
  cfg = optim_config()
  rng = np.random.default_rng(1)
  p, g = rng.normal(size=(5,)), rng.normal(size=(5,))
  m, v = 0.1 * rng.normal(size=(5,)), 0.01 * rng.random(size=(5,))
  for count in (0, 1, 7, 1000):
    state = optim.AdamState(count=jnp.int32(count), mu=jnp.asarray(m, jnp.float32),
                            nu=jnp.asarray(v, jnp.float32))
    new_p, new_state = optim.adamw(jnp.asarray(p, jnp.float32), jnp.asarray(g, jnp.float32), state,
                                   jnp.float32(1e-3), cfg)
    ref_p, ref_m, ref_v, ref_step = torch_adamw_step(p, g, m, v, count, 1e-3, 0.9, 0.999, 1e-8, 0.01)
    assert int(new_state.count) == ref_step == count + 1
    np.testing.assert_allclose(new_p, ref_p, rtol=1e-6, atol=1e-7, err_msg=f'count {count}')
    np.testing.assert_allclose(new_state.mu, ref_m, rtol=1e-6)
    np.testing.assert_allclose(new_state.nu, ref_v, rtol=1e-6)


def test_adamw_decay_applies_with_zero_gradient():
  """A parameter that *is* in the step but has a zero gradient still decays (torch: grad is not None)."""
  cfg = optim_config(lr=0.1, weight_decay=0.5)
  p = jnp.array([1.0, -2.0])
  new_p, state = optim.adamw(p, jnp.zeros(2), optim.init_group(p), jnp.float32(0.1), cfg)
  np.testing.assert_allclose(new_p, np.array([1.0, -2.0]) * (1 - 0.1 * 0.5), rtol=1e-6)
  assert int(state.count) == 1


# --- clipping (torch.nn.utils.clip_grad_norm_) ---

def torch_clip(grads, max_norm):
  norm = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in jax.tree.leaves(grads)))
  factor = min(1.0, max_norm / (norm + 1e-6))
  return jax.tree.map(lambda g: g * factor, grads), norm


@pytest.mark.parametrize('scale', [1e-3, 0.3, 1.0, 7.0, 1e4])
def test_clip_by_global_norm(scale):
  rng = np.random.default_rng(2)
  grads = {'a': scale * rng.normal(size=(3, 3)) / 3, 'b': [scale * rng.normal(size=(4,)) / 2]}
  grads = jax.tree.map(lambda g: g.astype(np.float32), grads)
  clipped, norm = optim.clip_by_global_norm(jax.tree.map(jnp.asarray, grads), 1.0)
  ref, ref_norm = torch_clip(grads, 1.0)
  np.testing.assert_allclose(norm, ref_norm, rtol=1e-6)
  chex.assert_trees_all_close(clipped, ref, rtol=1e-6, atol=1e-12)
  new_norm = math.sqrt(sum(float(np.sum(np.square(np.asarray(g, np.float64)))) for g in jax.tree.leaves(clipped)))
  if ref_norm > 1.0:
    np.testing.assert_allclose(new_norm, 1.0 * ref_norm / (ref_norm + 1e-6), rtol=1e-6)
  else:
    chex.assert_trees_all_equal(clipped, jax.tree.map(jnp.asarray, grads))  # factor clamped at 1


def test_clip_norm_just_above_max():
  """The 1e-6 in torch's denominator: a norm of exactly max_norm is still (very slightly) scaled."""
  g = {'x': jnp.array([3.0, 4.0])}  # norm 5
  clipped, norm = optim.clip_by_global_norm(g, 5.0)
  np.testing.assert_allclose(norm, 5.0)
  np.testing.assert_allclose(clipped['x'], np.array([3.0, 4.0]) * 5.0 / (5.0 + 1e-6), rtol=1e-7)


def test_clip_disabled():
  g = {'x': jnp.array([30.0, 40.0])}
  clipped, norm = optim.clip_by_global_norm(g, 0.0)
  chex.assert_trees_all_equal(clipped, g)
  np.testing.assert_allclose(norm, 50.0)


# --- schedules (transformers' get_constant_schedule_with_warmup / cosine_with_min_lr) ---

def lr_at(schedule, steps):
  return np.array([float(schedule(jnp.int32(s))) for s in steps])


def test_constant_schedule_no_warmup():
  sched = optim.make_schedule(optim_config(lr=1e-3), total_steps=100, warmup_steps=0)
  np.testing.assert_allclose(lr_at(sched, [0, 1, 50, 99, 1000]), 1e-3, rtol=1e-7)


def test_constant_schedule_with_warmup():
  sched = optim.make_schedule(optim_config(lr=1e-3), total_steps=100, warmup_steps=10)
  steps = [0, 1, 5, 9, 10, 11, 99]
  expected = [1e-3 * (s / 10 if s < 10 else 1.0) for s in steps]
  np.testing.assert_allclose(lr_at(sched, steps), expected, rtol=1e-6, atol=1e-12)
  assert float(sched(jnp.int32(0))) == 0.0


@pytest.mark.parametrize('warmup', [0, 10])
@pytest.mark.parametrize('min_lr', [0.0, 1e-5])
def test_cosine_with_min_lr(warmup, min_lr):
  lr, total = 1e-3, 100
  sched = optim.make_schedule(optim_config(lr=lr, schedule='cosine_with_min_lr', min_lr=min_lr), total, warmup)
  min_rate = min_lr / lr

  def expected(step):
    if step < warmup:
      return lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (min_rate + (1 - min_rate) * 0.5 * (1 + math.cos(math.pi * progress)))

  steps = [0, 1, 5, 9, 10, 11, 25, 50, 55, 77, 99, 100]
  np.testing.assert_allclose(lr_at(sched, steps), [expected(s) for s in steps], rtol=1e-5, atol=1e-10)
  np.testing.assert_allclose(float(sched(jnp.int32(total))), min_lr, atol=1e-10)  # ends at the floor


def test_schedule_under_jit():
  sched = optim.make_schedule(optim_config(lr=2e-3, schedule='cosine_with_min_lr', min_lr=1e-4), 50, 5)
  steps = jnp.arange(50, dtype=jnp.int32)
  np.testing.assert_allclose(jax.jit(jax.vmap(sched))(steps), lr_at(sched, range(50)), rtol=1e-6)


def test_unknown_schedule():
  with pytest.raises(ValueError, match='optim.schedule'):
    optim.make_schedule(optim_config(schedule='linear'), 10, 0)


def test_base_config_optimizer_defaults():
  c = config_lib.get_base_config().optim
  assert (c.lr, c.b1, c.b2, c.eps, c.weight_decay, c.grad_clip) == (1e-3, 0.9, 0.999, 1e-8, 0.01, 1.0)
  assert c.schedule == 'constant_with_warmup' and c.warmup_epochs == 0
  assert isinstance(c, ml_collections.ConfigDict)
