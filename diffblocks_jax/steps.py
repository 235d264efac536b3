"""Pure training steps: `(state, images, labels) -> (state, metrics)`, jitted by the caller (SPEC §5, §6).

DiffusionBlocks: the step samples its block on the device from the step's key and dispatches with
`lax.switch`; each branch differentiates only the shared parts and its own block, so gradients and
activations of the other blocks never exist, and their Adam state and count pass through untouched.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from diffblocks_jax import diffusion, optim

PyTree = Any


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 global step: drives the LR schedule and every random draw.
  params: PyTree  # Pure nested dict from `models.split`.
  opt_state: PyTree  # AdamState per group: see `init_opt_state`.
  rng: jax.Array  # Raw uint32 key; step keys are fold_in(rng, step), so a resumed run redraws the same.


def init_opt_state(params: PyTree, kind: str) -> PyTree:
  """Baseline: one group. DiffusionBlocks: 'shared' (if any) and one group per block."""
  if kind == 'vit':
    return optim.init_group(params)
  groups = {'blocks': {b: optim.init_group(p) for b, p in params['blocks'].items()}}
  if 'shared' in params:
    groups['shared'] = optim.init_group(params['shared'])
  return groups


def init_state(params: PyTree, kind: str, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=init_opt_state(params, kind),
                    rng=jax.random.key_data(jax.random.key(seed)))


def step_keys(state: TrainState, num: int):
  return jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), num)


def drop_class(key: jax.Array, images: jax.Array, prob: float) -> jax.Array:
  """Classifier-free guidance training: zero the image for a random `prob` of the batch (SPEC §7)."""
  if not prob:
    return images
  drop = jax.random.bernoulli(key, prob, (images.shape[0],))
  return jnp.where(drop[:, None, None, None], jnp.zeros_like(images), images)


def make_vit_step(graphdef, config, schedule):
  """The ordinary end-to-end step of the baseline: one AdamW group over everything."""

  def train_step(state: TrainState, images: jax.Array, labels: jax.Array):
    (dropout_key,) = step_keys(state, 1)

    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(images, key=dropout_key)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grads, grad_norm = optim.clip_by_global_norm(grads, config.optim.grad_clip)
    lr = schedule(state.step)
    params, opt_state = optim.adamw(state.params, grads, state.opt_state, lr, config.optim)
    metrics = dict(loss=loss, ce=loss, grad_norm=grad_norm, lr=lr, block=jnp.zeros((), jnp.int32))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def _trainable(params: PyTree, block: int) -> PyTree:
  """The subtrees a step on `block` differentiates: the shared parts (if any) and the block itself."""
  out = {'block': params['blocks'][block]}
  if 'shared' in params:
    out['shared'] = params['shared']
  return out


def _put_back(tree: PyTree, part: PyTree, block: int) -> PyTree:
  """`tree` with the block's (and shared) subtree replaced: other blocks pass through by reference."""
  tree = dict(tree, blocks=dict(tree['blocks']))
  tree['blocks'][block] = part['block']
  if 'shared' in part:
    tree['shared'] = part['shared']
  return tree


def dblock_loss(model, images, labels, sigmas, noise, block: int, config, dropout_key):
  """Weighted denoising cross-entropy of one block on a batch (SPEC §5.5-5.6)."""
  table = model.label_embeddings(block)
  z = table[labels]
  z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  z_t = z + sigmas[:, None] * noise
  logits = model.denoise(images, z_t, sigmas, block, key=dropout_key)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  w = diffusion.loss_weight(sigmas, config.diffusion.sigma_data)
  if config.diffusion.loss_weighting == 'per_sample':
    return jnp.mean(w * ce), ce.mean()
  return jnp.mean(w) * jnp.mean(ce), ce.mean()  # What the release computes, through a broadcast.


def block_update(graphdef, config, schedule, block: int):
  """The update of one block (a Python int): grads of the shared parts and that block only."""

  def update(state: TrainState, images, labels, sigmas, noise, dropout_key):
    def loss_fn(trainable):
      model = nnx.merge(graphdef, _put_back(state.params, trainable, block))
      return dblock_loss(model, images, labels, sigmas, noise, block, config, dropout_key)

    trainable = _trainable(state.params, block)
    (loss, ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    grads, grad_norm = optim.clip_by_global_norm(grads, config.optim.grad_clip)
    lr = schedule(state.step)
    groups = _trainable(state.opt_state, block)
    new_params, new_groups = {}, {}
    for name in trainable:
      new_params[name], new_groups[name] = optim.adamw(trainable[name], grads[name], groups[name], lr,
                                                       config.optim)
    state = state.replace(params=_put_back(state.params, new_params, block),
                          opt_state=_put_back(state.opt_state, new_groups, block))
    return state, dict(loss=loss, ce=ce, grad_norm=grad_norm, lr=lr)

  return update


def make_dblock_step(graphdef, config, schedule, num_blocks: int, *, block: int | None = None):
  """One DiffusionBlocks step; the block index is drawn on the device and dispatched by `lax.switch`.

  With `block` given, the step always trains that block on its own noise range (no switch): the
  block-parallel mode and the benchmark's per-block rows use it.
  """
  edm = diffusion.EDM.from_config(config.diffusion)
  branches = [block_update(graphdef, config, schedule, b) for b in range(num_blocks)]
  fixed_bucket = None if block is None else num_blocks - 1 - block

  def train_step(state: TrainState, images: jax.Array, labels: jax.Array):
    sigma_key, noise_key, cfg_key, dropout_key = step_keys(state, 4)
    sigmas, chosen = diffusion.sample_training_sigmas(sigma_key, images.shape[0], num_blocks,
                                                      config.diffusion.overlap, edm, bucket_index=fixed_bucket)
    noise = jax.random.normal(noise_key, (images.shape[0], config.model.hidden_size), jnp.float32)
    images = drop_class(cfg_key, images, config.diffusion.class_dropout_prob)
    args = (state, images, labels, sigmas, noise, dropout_key)
    if block is None:
      state, metrics = jax.lax.switch(chosen, branches, *args)
    else:
      state, metrics = branches[block](*args)
      chosen = jnp.asarray(block, jnp.int32)
    return state.replace(step=state.step + 1), dict(metrics, block=chosen)

  return train_step


def make_train_step(graphdef, config, schedule, num_blocks: int = 1, *, block: int | None = None):
  if config.model.kind == 'vit':
    return make_vit_step(graphdef, config, schedule)
  return make_dblock_step(graphdef, config, schedule, num_blocks, block=block)
