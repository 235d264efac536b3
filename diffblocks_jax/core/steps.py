"""Pure training steps `(state, inputs, targets) -> (state, metrics)`, jitted by the caller (SPEC §5, §6).

The block-wise step is blind to the task: it draws a block and its noise levels from the partition,
asks the task for the clean target, corrupts it, asks the task for the loss of the block's output, and
updates the shared parts and that block with AdamW. Gradients and activations of the other blocks never
exist, and their Adam state and count stay as they are (PyTorch skips parameters without a gradient).

Stacked blocks (equal depth): the drawn block is a traced index, its row of parameters and Adam state is
sliced out, updated and written back in place: no switch, one block body in the program whatever B is.
Uneven blocks: `lax.switch` over one branch per block (XLA then copies the idle blocks through the
conditional, which the stacked path avoids).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from diffblocks_jax.core import blocks, optim

PyTree = Any


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 global step: drives the LR schedule and every random draw.
  params: PyTree  # Pure nested dict from `models.split`.
  opt_state: PyTree  # AdamState per group: see `init_opt_state`.
  rng: jax.Array  # Raw uint32 key; step keys are fold_in(rng, step), so a resumed run redraws the same.


def init_opt_state(params: PyTree, *, freeze_shared: bool = False) -> PyTree:
  """End-to-end: one group. Blocks: 'shared' (if any, and not frozen) and the blocks (one count per block).

  Frozen shared parts (config.train.freeze_shared) have no group: a step finds no Adam state for them and
  neither differentiates nor updates them (`block_update`).
  """
  if 'blocks' not in params:
    return optim.init_group(params)
  if blocks.is_stacked(params['blocks']):
    groups = {'blocks': optim.init_stacked_group(params['blocks'])}
  else:
    groups = {'blocks': {b: optim.init_group(p) for b, p in params['blocks'].items()}}
  if 'shared' in params and not freeze_shared:
    groups['shared'] = optim.init_group(params['shared'])
  return groups


def init_state(params: PyTree, seed: int, *, freeze_shared: bool = False) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=init_opt_state(params, freeze_shared=freeze_shared),
                    rng=jax.random.key_data(jax.random.key(seed)))


def shared_is_frozen(state: TrainState) -> bool:
  """Shared parts without an Adam group are frozen (`init_opt_state`): the state says it, no flag travels."""
  return 'shared' in state.params and 'shared' not in state.opt_state


def step_keys(state: TrainState, num: int):
  return jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), num)


def make_end_to_end_step(graphdef, task, optim_config, schedule):
  """The ordinary step of a baseline: one AdamW group over everything."""

  def train_step(state: TrainState, inputs, targets):
    (dropout_key,) = step_keys(state, 1)

    def loss_fn(params):
      return task.end_to_end_loss(nnx.merge(graphdef, params), inputs, targets, dropout_key)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads, grad_norm = optim.clip_by_global_norm(grads, optim_config.grad_clip)
    lr = schedule(state.step)
    params, opt_state = optim.adamw(state.params, grads, state.opt_state, lr, optim_config)
    metrics = dict(aux, loss=loss, grad_norm=grad_norm, lr=lr, block=jnp.zeros((), jnp.int32))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def block_update(graphdef, task, partition, optim_config, schedule, placement=blocks.ON_DEVICE):
  """update(state, b, inputs, targets, levels, noise_key, dropout_key) -> (state, metrics) for block b.

  b is the slice the levels were drawn from: a Python int, or a traced int32 for stacked blocks. The row it
  trains is `blocks.row_of(b, rows)` (row 0 whatever b when weight-tied). The step counter is not advanced here.
  """

  def update(state: TrainState, slice_b, inputs, targets, levels, noise_key, dropout_key):
    b = blocks.row_of(slice_b, blocks.num_blocks_of(state.params))  # The parameter row serving this slice.
    whole = blocks.take(state.params, b, placement)
    # Frozen shared parts are read, not differentiated: their gradient would be computed for nothing.
    part = {'block': whole['block']} if shared_is_frozen(state) else whole

    def loss_fn(part):
      params, index = blocks.model_params(state.params, dict(whole, **part), b)
      model = nnx.merge(graphdef, params)
      x0 = task.target(model, targets, index)
      output = task.denoise(model, inputs, partition.corrupt(noise_key, x0, levels), levels, index, dropout_key)
      return task.loss(output, targets, levels)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(part)
    grads, grad_norm = optim.clip_by_global_norm(grads, optim_config.grad_clip)
    lr = schedule(state.step)
    opt = state.opt_state
    params, opt_state = dict(state.params), dict(opt)
    if 'shared' in part:
      params['shared'], opt_state['shared'] = optim.adamw(part['shared'], grads['shared'], opt['shared'], lr,
                                                          optim_config)
    if blocks.is_stacked(state.params['blocks']):
      params['blocks'], opt_state['blocks'] = optim.adamw_row(
          state.params['blocks'], grads['block'], opt['blocks'], b, lr, optim_config, after=(loss, grads),
          placement=placement)
    else:
      new_block, new_group = optim.adamw(part['block'], grads['block'], opt['blocks'][b], lr, optim_config)
      params['blocks'] = blocks.put(params, {'block': new_block}, b)['blocks']
      opt_state['blocks'] = blocks.put(opt_state, {'block': new_group}, b)['blocks']
    metrics = dict(aux, loss=loss, grad_norm=grad_norm, lr=lr)
    return state.replace(params=params, opt_state=opt_state), metrics

  return update


def make_block_step(graphdef, task, partition, optim_config, schedule, *, condition_dropout: float = 0.0,
                    block: int | None = None, placement: blocks.Placement = blocks.ON_DEVICE):
  """One DiffusionBlocks step: the block is drawn on the device (SPEC §5.1-5.4), or fixed to `block`.

  `placement`: where stacked blocks live (host memory: one block's state on the device at a time).
  """
  update = block_update(graphdef, task, partition, optim_config, schedule, placement)
  num_blocks = partition.num_blocks

  def train_step(state: TrainState, inputs, targets):
    level_key, noise_key, cond_key, dropout_key = step_keys(state, 4)
    batch_size = jax.tree.leaves(targets)[0].shape[0]
    levels, chosen = partition.sample(level_key, batch_size, block=block)
    if block is not None:
      chosen = jnp.asarray(block, jnp.int32)
    inputs = task.drop_condition(cond_key, inputs, condition_dropout)
    args = (inputs, targets, levels, noise_key, dropout_key)
    if block is not None:
      state, metrics = update(state, block, *args)
    elif blocks.is_stacked(state.params['blocks']):
      state, metrics = update(state, chosen, *args)
    else:
      branches = [functools.partial(_at_block, update, b) for b in range(num_blocks)]
      state, metrics = jax.lax.switch(chosen, branches, state, *args)
    return state.replace(step=state.step + 1), dict(metrics, block=chosen)

  return train_step


def _at_block(update, b, state, *args):
  return update(state, b, *args)


def make_parallel_step(graphdef, task, partition, optim_config, schedule, *, condition_dropout: float = 0.0,
                       block_ids=None):
  """Every block trains at once, each on its own noise range, data and draws: `block_update` vmapped over
  the block axis of stacked blocks, independent (no shared parameters) or sharing frozen outer parts (no Adam
  state: config.train.freeze_shared), which every block reads and none updates. Sharded `P('block')`, each
  device group holds and updates one block and XLA partitions the vmapped step along that axis.

  train_step(state, inputs, targets) takes inputs and targets with a leading block axis (one batch per block).
  Metrics are those of the sequential step averaged over blocks, plus `loss_block{b}`; `block` is -1 (all).
  `block_ids`: which block each row of the stack is (a block job holds some rows only: docs/block_jobs.md);
  None = row b is block b. A row's draws depend on its block id alone, so a job's rows train as in the full run.
  """
  update = block_update(graphdef, task, partition, optim_config, schedule)

  def one_block(b, rng, params_row, opt_row, step, inputs, targets, frozen):
    # A one-block state (stack of 1) whose rng is folded with b: each block draws its own levels and noise.
    lift = lambda tree: jax.tree.map(lambda x: x[None], tree)
    params = {'blocks': lift(params_row), **({'shared': frozen} if frozen is not None else {})}
    state = TrainState(step=step, params=params, opt_state={'blocks': lift(opt_row)},
                       rng=jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(rng), b)))
    level_key, noise_key, cond_key, dropout_key = step_keys(state, 4)
    batch_size = jax.tree.leaves(targets)[0].shape[0]
    levels, _ = partition.sample(level_key, batch_size, block=b)
    inputs = task.drop_condition(cond_key, inputs, condition_dropout)
    state, metrics = update(state, 0, inputs, targets, levels, noise_key, dropout_key)
    drop = lambda tree: jax.tree.map(lambda x: x[0], tree)
    return drop(state.params['blocks']), drop(state.opt_state['blocks']), metrics

  def train_step(state: TrainState, inputs, targets):
    if not blocks.is_stacked(state.params['blocks']) or ('shared' in state.params and
                                                          not shared_is_frozen(state)):
      raise ValueError('block-parallel training needs stacked blocks, independent or sharing frozen outer parts')
    ids = tuple(range(blocks.num_blocks_of(state.params))) if block_ids is None else tuple(block_ids)
    params, opt, metrics = jax.vmap(one_block, in_axes=(0, None, 0, 0, None, 0, 0, None))(
        jnp.asarray(ids, jnp.int32), state.rng, state.params['blocks'], state.opt_state['blocks'], state.step,
        inputs, targets, state.params.get('shared'))
    out = {k: jnp.mean(v) for k, v in metrics.items()}
    out.update({f'loss_block{b}': metrics['loss'][row] for row, b in enumerate(ids)})
    out['lr'], out['block'] = metrics['lr'][0], jnp.asarray(-1, jnp.int32)
    return state.replace(step=state.step + 1, params=dict(state.params, blocks=params),
                         opt_state={'blocks': opt}), out

  return train_step
