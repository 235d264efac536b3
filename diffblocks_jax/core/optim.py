"""AdamW with PyTorch's semantics per parameter group, gradient clipping and LR schedules (SPEC §6).

PyTorch with `zero_grad(set_to_none=True)` skips a parameter whose grad is None: no decay, no moment
update, and its step count stays. So each block is its own group with its own Adam state and count; a step
updates only the groups it has gradients for. The LR schedule follows the global step for everyone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from diffblocks_jax.core import blocks

PyTree = Any


@struct.dataclass
class AdamState:
  count: jax.Array  # int32: updates this group has received (drives its bias correction).
  mu: PyTree
  nu: PyTree


def init_group(params: PyTree) -> AdamState:
  zeros = lambda p: jnp.zeros(p.shape, jnp.float32)
  return AdamState(count=jnp.zeros((), jnp.int32), mu=jax.tree.map(zeros, params),
                   nu=jax.tree.map(zeros, params))


def moments(mu: PyTree, nu: PyTree, grads: PyTree, optim_config) -> tuple[PyTree, PyTree]:
  """Adam's first and second moments after one more gradient."""
  b1, b2 = optim_config.b1, optim_config.b2
  return (jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, mu, grads),
          jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), nu, grads))


def apply_moments(params: PyTree, mu: PyTree, nu: PyTree, count: jax.Array, lr: jax.Array, optim_config):
  """Decoupled decay, then the bias-corrected Adam step for the `count`-th update."""
  b1, b2, eps, wd = optim_config.b1, optim_config.b2, optim_config.eps, optim_config.weight_decay
  t = count.astype(jnp.float32)
  step_size = lr / (1 - b1**t)
  sqrt_bc2 = jnp.sqrt(1 - b2**t)

  def update(p, m, v):
    p = p * (1 - lr * wd)
    return p - step_size * m / (jnp.sqrt(v) / sqrt_bc2 + eps)

  return jax.tree.map(update, params, mu, nu)


def adamw(params: PyTree, grads: PyTree, state: AdamState, lr: jax.Array, optim_config):
  """One torch.optim.AdamW update of a group: decoupled decay, then the bias-corrected Adam step."""
  count = state.count + 1
  mu, nu = moments(state.mu, state.nu, grads, optim_config)
  return apply_moments(params, mu, nu, count, lr, optim_config), AdamState(count=count, mu=mu, nu=nu)


def init_stacked_group(params: PyTree) -> AdamState:
  """Adam state of block-stacked parameters: moments stacked like them, one count per block."""
  num_blocks = jax.tree.leaves(params)[0].shape[0]
  return init_group(params).replace(count=jnp.zeros((num_blocks,), jnp.int32))


def adamw_row(params: PyTree, grads: PyTree, state: AdamState, b: jax.Array, lr: jax.Array, optim_config,
              *, after: PyTree = (), placement=None):
  """`adamw` of row b of block-stacked params and state (grads: that row, leading axis 1), written in place.

  The order keeps XLA from copying the stacks (tests/test_steps.py reads the compiled HLO): the new moments
  and count are written first and the parameter update reads them back from the written stacks, and every
  parameter write waits for `after` (the loss and the gradients): otherwise XLA may recompute a piece of the
  forward pass from the old parameter row after overwriting it, which forces a copy of the whole stack.
  """
  placement = placement or blocks.ON_DEVICE  # Host-resident stacks: rows fetched and stored (core/blocks.py).
  rows = lambda tree: jax.tree.map(lambda x: placement.row(x, b), tree)
  write = lambda tree, new: jax.tree.map(lambda x, y: placement.write(x, y, b), tree, new)
  mu_row, nu_row = moments(rows(state.mu), rows(state.nu), grads, optim_config)
  state = AdamState(count=write(state.count, rows(state.count) + 1), mu=write(state.mu, mu_row),
                    nu=write(state.nu, nu_row))
  # 0·x is not folded away for floats, so this is a data dependence and adds exactly 0 (NaN if x is not
  # finite, and a non-finite loss stops training anyway).
  wait = sum(jnp.ravel(x)[0].astype(jnp.float32) for x in jax.tree.leaves(after))
  lr = lr + 0.0 * wait
  # count row (1,) broadcasts against the (1, ...) rows.
  new = apply_moments(rows(params), rows(state.mu), rows(state.nu), rows(state.count), lr, optim_config)
  return write(params, new), state


def global_norm(tree: PyTree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(tree)))


def clip_by_global_norm(grads: PyTree, max_norm: float):
  """torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)). Returns (grads, norm)."""
  norm = global_norm(grads)
  if not max_norm:
    return grads, norm
  factor = jnp.minimum(1.0, max_norm / (norm + 1e-6))
  return jax.tree.map(lambda g: g * factor, grads), norm


def make_schedule(optim_config, total_steps: int, warmup_steps: int) -> Callable[[jax.Array], jax.Array]:
  """LR at a 0-based global step, as PyTorch's LambdaLR gives the k-th optimizer step."""
  base, kind = optim_config.lr, optim_config.schedule
  if kind == 'constant_with_warmup':
    def factor(step):
      return jnp.minimum(1.0, step / max(1, warmup_steps))
  elif kind == 'cosine_with_min_lr':
    min_rate = optim_config.min_lr / base

    def factor(step):
      # Hugging Face's cosine-with-min-lr: half a cosine from 1 to min_lr/lr after a linear warm-up.
      progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
      cosine = 0.5 * (1.0 + jnp.cos(math.pi * jnp.clip(progress, 0.0, 1.0)))
      decayed = cosine * (1 - min_rate) + min_rate
      return jnp.where(step < warmup_steps, step / max(1, warmup_steps), decayed)
  else:
    raise ValueError(f"optim.schedule must be 'constant_with_warmup' or 'cosine_with_min_lr', got {kind!r}")
  if warmup_steps == 0 and kind == 'constant_with_warmup':
    return lambda step: jnp.asarray(base, jnp.float32)
  return lambda step: (base * factor(jnp.asarray(step, jnp.float32))).astype(jnp.float32)
