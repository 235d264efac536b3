"""Where in noise each block is good: accuracy of every block at every σ, against where it was trained.

The sampler asks block 0 for a class at σ_max (80), where the noisy label carries no information and the
block must classify from the image alone. With the EDM defaults (P_mean −1.2, P_std 1.2) and B=3, block 0
is trained on σ in [0.39, 80] but half of its draws fall below σ ≈ 0.8, where the label is still readable
from z_t, and only 0.4 % above σ = 10. These two curves side by side show such a mismatch at a glance.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffblocks_jax import config as config_lib
from diffblocks_jax.core import partitions
from diffblocks_jax.data import input_pipeline


def training_sigma_density(sigmas, num_blocks: int, edm: partitions.EDM = partitions.DEFAULT_EDM,
                           overlap: float = 0.05) -> np.ndarray:
  """(B, len(sigmas)): density in ln σ of the σ a training step draws for each block (SPEC §5.1-5.3).

  Each block's bucket is drawn with probability 1/B; inside it σ is a log-normal truncated to the widened
  range, so each row integrates (over ln σ) to 1/B. Ignores the rare batch whose mode bucket differs.
  """
  log_sigma = np.log(np.asarray(sigmas, np.float64))
  ranges = partitions.widened_ranges(num_blocks, overlap, edm)
  mass = edm.cdf(ranges[:, 1]) - edm.cdf(ranges[:, 0])
  pdf = np.exp(-0.5 * ((log_sigma - edm.p_mean) / edm.p_std)**2) / (edm.p_std * np.sqrt(2 * np.pi))
  density = np.zeros((num_blocks, len(log_sigma)))
  for bucket_index in range(num_blocks):
    lo, hi = np.log(ranges[bucket_index])
    inside = (log_sigma >= lo) & (log_sigma <= hi)
    density[num_blocks - 1 - bucket_index] = np.where(inside, pdf / mass[bucket_index], 0.0) / num_blocks
  return density


def block_accuracy_by_sigma(graphdef, params, config, images: np.ndarray, labels: np.ndarray, sigmas,
                            key: jax.Array, *, batch_size: int = 500) -> np.ndarray:
  """(B, len(sigmas)): accuracy of each block at each σ on uint8 `images`, every example scored.

  Each block gets what training gives it: z_t = E[y]/‖E[y]‖ + σ·ε with the true label y. So block b at σ
  measures how well b denoises there, whatever the sampler would have handed it.
  """
  if config.model.kind != 'dblock':
    raise ValueError(f"block_accuracy_by_sigma needs a DiffusionBlocks model, got model.kind="
                     f"{config.model.kind!r}")
  if len(images) != len(labels):
    raise ValueError(f'images ({len(images)}) and labels ({len(labels)}) differ in length')
  num_blocks = config_lib.num_blocks(config)

  @functools.partial(jax.jit, static_argnums=4)
  def num_correct(params, images_u8, labels, valid, block, sigma, key):
    model = nnx.merge(graphdef, params)
    table = model.label_embeddings(block).astype(jnp.float32)
    z = table[labels] / jnp.linalg.norm(table[labels], axis=-1, keepdims=True)
    z_t = z + sigma * jax.random.normal(key, z.shape)
    x = input_pipeline.normalize(images_u8, config.data)
    logits = model.denoise(x, z_t, jnp.full(labels.shape, sigma, jnp.float32), block)
    return jnp.sum((jnp.argmax(logits, axis=-1) == labels) & valid)

  correct = np.zeros((num_blocks, len(sigmas)), np.int64)
  for start in range(0, len(images), batch_size):
    batch, batch_labels = images[start:start + batch_size], np.asarray(labels[start:start + batch_size])
    pad = batch_size - len(batch)  # One batch shape, one compile; padded rows are not counted.
    valid = np.arange(batch_size) < len(batch)
    batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
    batch_labels = np.concatenate([batch_labels, np.zeros((pad,), batch_labels.dtype)])
    for block in range(num_blocks):
      for j, sigma in enumerate(sigmas):
        step_key = jax.random.fold_in(jax.random.fold_in(key, start), j)
        correct[block, j] += int(num_correct(params, batch, batch_labels, valid, block, jnp.float32(sigma),
                                             step_key))
  return correct / max(len(images), 1)
