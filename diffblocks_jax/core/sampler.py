"""The sampler over blocks: Euler steps from the partition's highest level down, with guidance (SPEC §7).

The level schedule is known when tracing, so each step's block is a Python int: every step runs only the
block that owns its level (with B = N = 3 each block runs once, the cost of one pass through the depth).
The task says how a block's output becomes an estimate x̂ of the clean target and what an unconditional
input is; the partition says where to start and how to step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
