"""The sampler over blocks: Euler steps from the partition's highest level down, with guidance (SPEC §7).

The level schedule is known when tracing, so each step's block is a Python int: every step runs only the
block that owns its level (with B = N = 3 each block runs once, the cost of one pass through the depth).
The task says how a block's output becomes an estimate x̂ of the clean target and what an unconditional
input is; the partition says where to start and how to step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def guided(task, model, inputs, x: jax.Array, level: float, block: int, cfg_scale: float):
  """u + s·(c − u) of the conditional output c and the unconditional u, batched in one pass; s = 1: c alone."""
  levels = jnp.full((x.shape[0],), level, jnp.float32)
  if cfg_scale == 1.0:
    return task.denoise(model, inputs, x, levels, block, None)
  both_inputs = jax.tree.map(lambda a, u: jnp.concatenate([a, u]), inputs, task.unconditional(inputs))
  both = task.denoise(model, both_inputs, jnp.concatenate([x, x]), jnp.concatenate([levels, levels]), block,
                      None)
  cond, uncond = jnp.split(both, 2)
  return uncond + cfg_scale * (cond - uncond)


def sample(task, model, inputs, key: jax.Array, *, partition, num_steps: int, cfg_scale: float = 1.0,
           return_trajectory: bool = False):
  """The last step's output; with `return_trajectory`, also the list of every step's output."""
  levels = partition.inference_levels(num_steps)
  x = partition.prior(key, task.target_shape(model, inputs), float(levels[0]))
  outputs = []
  for i in range(num_steps - 1):
    block = partition.route_static(levels[i])
    out = guided(task, model, inputs, x, float(levels[i]), block, cfg_scale)
    outputs.append(out)
    x = partition.euler(x, task.estimate(model, out, block), float(levels[i]), float(levels[i + 1]))
  block = partition.route_static(levels[-1])
  out = guided(task, model, inputs, x, float(levels[-1]), block, cfg_scale)
  return (out, outputs + [out]) if return_trajectory else out


def plan(partition, num_steps: int, grid: str = 'quantile') -> tuple[np.ndarray, np.ndarray]:
  """(levels (N,), blocks (N,)): the sampler's descending levels and the block that owns each."""
  levels = partition.inference_levels(num_steps, grid)
  return levels, np.array([partition.route_static(level) for level in levels], np.int32)


def at_block(fn, model, block, *args):
  """fn(model, block, *args) for a traced block index: stacked blocks (or one block) slice it; a list of
  blocks switches, so that only the chosen block runs."""
  if model.num_blocks == 1 or getattr(model, 'stacked', False):
    return fn(model, block, *args)
  graphdef, state = nnx.split(model)  # Branches get the model as state: they must not close over NNX objects.
  branch = lambda b: lambda s, *a: fn(nnx.merge(graphdef, s), b, *a)
  return jax.lax.switch(block, [branch(b) for b in range(model.num_blocks)], state, *args)


def _guided_at(task, model, inputs, x, level, block, cfg_scale):
  """`guided` for a traced block index."""
  return at_block(lambda m, b, i, y, lv: guided(task, m, i, y, lv, b, cfg_scale), model, block, inputs, x, level)


def sample_loop(task, model, inputs, key: jax.Array, *, partition, num_steps: int, cfg_scale: float = 1.0,
                solver: str = 'euler', grid: str = 'quantile', return_trajectory: bool = False):
  """`sample` as one `lax.scan` over steps, for many steps (image generation: 50): the program holds one step
  body, not N. Each step's block comes from `plan`, so a step still runs only the block that owns its level.

  solver 'heun' adds EDM's second-order correction: x̂ again at the next level, by that level's block.
  """
  if solver not in ('euler', 'heun'):
    raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")
  levels, owners = plan(partition, num_steps, grid)
  x = partition.prior(key, task.target_shape(model, inputs), float(levels[0]))
  lv, own = jnp.asarray(levels, jnp.float32), jnp.asarray(owners)

  def estimate(y, i):
    out = _guided_at(task, model, inputs, y, lv[i], own[i], cfg_scale)
    return out, task.estimate(model, out, own[i])

  def step(y, i):
    out, x_hat = estimate(y, i)
    y_next = partition.euler(y, x_hat, lv[i], lv[i + 1])
    if solver == 'heun':
      _, x_hat_next = estimate(y_next, i + 1)
      slope = (partition.velocity(y, x_hat, lv[i]) + partition.velocity(y_next, x_hat_next, lv[i + 1])) / 2
      y_next = y + (lv[i + 1] - lv[i]) * slope
    return y_next, out

  x, outputs = jax.lax.scan(step, x, jnp.arange(num_steps - 1))
  out, _ = estimate(x, num_steps - 1)
  if not return_trajectory:
    return out
  return out, jnp.concatenate([outputs, out[None]])
