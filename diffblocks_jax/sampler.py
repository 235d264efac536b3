"""Inference: the Euler sampler over blocks, classifier-free guidance, accuracy over a split (SPEC §7).

The sigma schedule is known when tracing, so each sampler step's block is a Python int: no switch, and
with B=3/N=3 each block runs exactly once (the cost of one pass through the depth).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffblocks_jax import config as config_lib
from diffblocks_jax import diffusion


def guided_logits(model, images, z, sigma: float, block: int, cfg_scale: float):
  """l(0) + s·(l(x) − l(0)) with the unconditional pass batched alongside; s = 1 is the plain pass."""
  sigmas = jnp.full((images.shape[0],), sigma, jnp.float32)
  if cfg_scale == 1.0:
    return model.denoise(images, z, sigmas, block)
  both = model.denoise(jnp.concatenate([images, jnp.zeros_like(images)]), jnp.concatenate([z, z]),
                       jnp.concatenate([sigmas, sigmas]), block)
  cond, uncond = jnp.split(both, 2)
  return uncond + cfg_scale * (cond - uncond)


def sample(model, images: jax.Array, key: jax.Array, *, num_steps: int, edm: diffusion.EDM,
           normalized_embeddings: bool = False, cfg_scale: float = 1.0, return_trajectory: bool = False):
  """Final logits of the Euler sampler; with `return_trajectory`, also the class probabilities per step."""
  sigmas = diffusion.inference_sigmas(num_steps, edm)
  num_blocks = model.num_blocks
  hidden = model.label_embeddings(0).shape[-1]
  z = jax.random.normal(key, (images.shape[0], hidden), jnp.float32) * np.sqrt(1.0 + sigmas[0]**2)
  trajectory = []
  for i in range(num_steps - 1):
    block = diffusion.route_static(sigmas[i], num_blocks, edm)
    probs = jax.nn.softmax(guided_logits(model, images, z, float(sigmas[i]), block, cfg_scale), axis=-1)
    trajectory.append(probs)
    table = model.label_embeddings(block)
    if normalized_embeddings:
      table = table / jnp.linalg.norm(table, axis=-1, keepdims=True)
    x_hat = probs @ table.astype(jnp.float32)
    z = z + (sigmas[i + 1] - sigmas[i]) * (z - x_hat) / sigmas[i]
  block = diffusion.route_static(sigmas[-1], num_blocks, edm)
  logits = guided_logits(model, images, z, float(sigmas[-1]), block, cfg_scale)
  if return_trajectory:
    return logits, jnp.stack(trajectory + [jax.nn.softmax(logits, axis=-1)], axis=1)
  return logits


def make_predict_fn(graphdef, config, *, num_steps: int | None = None, cfg_scale: float | None = None,
                    normalized_embeddings: bool | None = None) -> Callable:
  """`predict(params, images, key) -> logits` for either model kind; jit it once per batch shape."""
  if config.model.kind == 'vit':
    return lambda params, images, key: nnx.merge(graphdef, params)(images)
  num_blocks = config_lib.num_blocks(config)
  n = num_steps or config.eval.num_inference_steps or num_blocks
  s = config.eval.cfg_scale if cfg_scale is None else cfg_scale
  norm = config.eval.normalized_embeddings if normalized_embeddings is None else normalized_embeddings
  edm = diffusion.EDM.from_config(config.diffusion)

  def predict(params, images, key):
    return sample(nnx.merge(graphdef, params), images, key, num_steps=n, edm=edm,
                  normalized_embeddings=norm, cfg_scale=s)

  return predict


def predict_split(predict: Callable, params, images: np.ndarray, batch_size: int, key: jax.Array,
                  preprocess: Callable = lambda x: x) -> np.ndarray:
  """Logits for every example of a split (uint8 on the host): the last partial batch is padded, not dropped.

  `predict` must already be jitted; padding keeps one batch shape so it compiles once.
  """
  n = len(images)
  out = []
  for i, start in enumerate(range(0, n, batch_size)):
    batch = images[start:start + batch_size]
    pad = batch_size - len(batch)
    if pad:
      batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
    logits = predict(params, preprocess(batch), jax.random.fold_in(key, i))
    out.append(np.asarray(logits)[:batch_size - pad])
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(logits, axis=-1) == labels))
