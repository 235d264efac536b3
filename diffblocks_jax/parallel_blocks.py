"""Block-parallel training (`config.parallel_blocks`): the B independent blocks trained at once, one per group.

The mesh is ('block', 'data'); row b is block b's device group. Group b holds only block b's parameters and
Adam state (built there directly) and runs its own jitted chunk of `train.make_train_chunk`: every step
trains block b on its own noise range (`steps.make_train_step(..., block=b)`), with its own data order and
noise, the batch split over the group on 'data'. The B chunks are dispatched one after another and run
concurrently (dispatch is asynchronous), so a loop iteration trains every block.

The state is one TrainState whose params['blocks'][b] and opt_state['blocks'][b] live on group b, with step
and rng replicated on every device: train.py's loop and Checkpointer take it as it is, and the checkpoint
tree is the sequential mode's. Evaluation copies every block onto every device for the sampler.

Schedule: each block runs num_epochs x steps_per_epoch steps (not x B: see `train.experiment_from_data`), so
the LR schedule spans each block's own steps, as it spans each block's share of steps in sequential mode.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffblocks_jax import config as config_lib
from diffblocks_jax import sharding, steps, train


def _own(tree, block: int):
  """The part of a params or opt_state tree that block `block` owns (independent blocks own everything)."""
  return {'blocks': {block: tree['blocks'][block]}}


def _block_state(state: steps.TrainState, block: int, step, rng) -> steps.TrainState:
  return steps.TrainState(step=step, params=_own(state.params, block), opt_state=_own(state.opt_state, block),
                          rng=rng)


def _placed(tree, target):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=target), tree)


@dataclasses.dataclass
class BlockParallelExperiment(train.Experiment):
  """An Experiment whose abstract state places block b on group b (step and rng on every device)."""
  groups: tuple = ()  # The 1-D ('data',) mesh of each block's device group.

  def block_experiment(self, block: int) -> train.Experiment:
    """The experiment of one group: its mesh, and only its block's part of the state."""
    a = self.abstract_state
    everywhere = sharding.replicated(self.groups[block])
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(train.Experiment)}
    return train.Experiment(**dict(fields, mesh=self.groups[block], abstract_state=_block_state(
        a, block, _placed(a.step, everywhere), _placed(a.rng, everywhere))))

  def init_state(self) -> steps.TrainState:
    """Each block's parameters built on its group only (the rest of the model's init is dead code there)."""
    def init(block):
      whole = self._init()
      return _block_state(whole, block, whole.step, whole.rng)

    parts = []
    for b in range(self.num_blocks):
      shardings = jax.tree.map(lambda a: a.sharding, self.block_experiment(b).abstract_state)
      parts.append(jax.jit(functools.partial(init, b), out_shardings=shardings)())
    return assemble(self, parts)


def place_blocks(exp: train.Experiment) -> BlockParallelExperiment:
  """`exp` (built on the ('block', 'data') mesh) with block b's parameters and Adam state on group b."""
  groups = tuple(sharding.group_meshes(exp.mesh))
  batch = exp.config.train.batch_size
  if batch % groups[0].size:
    raise config_lib.ConfigError(f'config.train.batch_size={batch} is not divisible by the {groups[0].size} '
                                 "devices of each block's group")
  a = exp.abstract_state
  if set(a.params) != {'blocks'} or sorted(a.params['blocks']) != list(range(len(groups))):
    raise ValueError('block-parallel training needs independent blocks 0..B-1 and no shared parameters; '
                     f'got top-level {sorted(a.params)} and blocks {sorted(a.params["blocks"])}')
  place = lambda tree: {'blocks': {b: _placed(t, sharding.replicated(groups[b]))
                                   for b, t in tree['blocks'].items()}}
  everywhere = sharding.replicated(exp.mesh)
  abstract = steps.TrainState(step=_placed(a.step, everywhere), params=place(a.params),
                              opt_state=place(a.opt_state), rng=_placed(a.rng, everywhere))
  fields = {f.name: getattr(exp, f.name) for f in dataclasses.fields(train.Experiment)}
  return BlockParallelExperiment(**dict(fields, abstract_state=abstract), groups=groups)


def assemble(exp: BlockParallelExperiment, parts: list[steps.TrainState]) -> steps.TrainState:
  """One TrainState from the groups' states: the blocks stay where they are (no copy)."""
  everywhere = sharding.replicated(exp.mesh)
  return steps.TrainState(
      step=sharding.copy_replicated(parts[0].step, everywhere),
      params={'blocks': {b: p.params['blocks'][b] for b, p in enumerate(parts)}},
      opt_state={'blocks': {b: p.opt_state['blocks'][b] for b, p in enumerate(parts)}},
      rng=sharding.copy_replicated(parts[0].rng, everywhere))


def split(exp: BlockParallelExperiment, state: steps.TrainState, block: int) -> steps.TrainState:
  """Group `block`'s state: its block by reference, step and rng copied onto the group."""
  here = sharding.replicated(exp.groups[block])
  return _block_state(state, block, sharding.copy_replicated(state.step, here),
                      sharding.copy_replicated(state.rng, here))


def own_block_step(train_step, full_abstract: steps.TrainState, block: int):
  """`train_step` (for the whole model, training `block`) on a state holding `block` only.

  The other blocks enter as zeros made inside the jitted step: the step never reads them (block b's
  update differentiates and runs block b only) and they are not returned, so XLA drops them. The block
  index is folded into the rng so that each block draws its own noise, sigmas and dropout.
  """

  def fill(tree, full):
    zeros = lambda t: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), t)
    return {'blocks': {c: tree['blocks'][block] if c == block else zeros(t) for c, t in full['blocks'].items()}}

  def step(state: steps.TrainState, images, labels):
    rng = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), block))
    whole = state.replace(params=fill(state.params, full_abstract.params),
                          opt_state=fill(state.opt_state, full_abstract.opt_state), rng=rng)
    whole, metrics = train_step(whole, images, labels)
    return _block_state(whole, block, whole.step, state.rng), metrics

  return step


def _combine(per_block: list[dict]) -> dict:
  """One metrics dict per step for the loop: means over blocks, each block's loss, `block` -1 (= all)."""
  mean = lambda k: jnp.mean(jnp.stack([m[k] for m in per_block]), axis=0)
  out = {k: mean(k) for k in ('loss', 'ce', 'grad_norm')}
  out.update({f'loss_block{b}': m['loss'] for b, m in enumerate(per_block)})
  out['lr'] = per_block[0]['lr']
  out['block'] = jnp.full_like(per_block[0]['block'], -1)
  return out


def make_train_chunk(exp: BlockParallelExperiment):
  """chunk(state, images, labels, num_steps) → (state, metrics), as `train.make_train_chunk`'s, with
  `images, labels` from `put_train_split` (one pair per group)."""
  chunks = []
  for b in range(exp.num_blocks):
    train_step = steps.make_train_step(exp.graphdef, exp.config, exp.schedule, exp.num_blocks, block=b)
    chunks.append(train.make_train_chunk(exp.block_experiment(b), block=b,
                                         train_step=own_block_step(train_step, exp.abstract_state, b)))
  everywhere = sharding.replicated(exp.mesh)
  combine = jax.jit(_combine, out_shardings=everywhere)

  def chunk(state, images, labels, num_steps):
    parts = [split(exp, state, b) for b in range(exp.num_blocks)]
    # Dispatched in turn, run at once: each call returns as soon as its work is queued on its group.
    outs = [chunks[b](parts[b], images[b], labels[b], num_steps) for b in range(exp.num_blocks)]
    metrics = [jax.tree.map(functools.partial(sharding.copy_replicated, target=everywhere), m) for _, m in outs]
    return assemble(exp, [s for s, _ in outs]), combine(metrics)

  return chunk


def put_train_split(exp: BlockParallelExperiment):
  """The training split on every group (each group spans all processes): ([images_b], [labels_b])."""
  labels = exp.data.train_labels.astype(np.int32)
  return ([sharding.put_rows(g, exp.data.train_images) for g in exp.groups],
          [sharding.put_rows(g, labels) for g in exp.groups])


def gather_params(exp: BlockParallelExperiment, params):
  """Every block's parameters on every device, for the sampler (which runs all blocks)."""
  everywhere = sharding.replicated(exp.mesh)
  return jax.tree.map(functools.partial(sharding.copy_replicated, target=everywhere), params)
