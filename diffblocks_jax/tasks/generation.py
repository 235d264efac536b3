"""Class-conditional image generation as a DiffusionBlocks task (paper §5.2, Table 2): the image is diffused.

Target: the image in [-1, 1] (data.mean = data.std = 0.5). A block's output is EDM's denoiser D(x; σ, y), so
the estimate of the clean target is the output itself; the loss is w(σ)·‖D − x₀‖² (EDM's weight, mean over
pixels). Unconditional (guidance): the null class. The end-to-end DiT draws σ from the whole log-normal.

Evaluation offline: no Inception weights, so the quality figures are named for what they are — the Fréchet
distance in the feature space of a classifier trained here (`eval/fd`, with its floor: real test against real
train) and the share of samples that classifier assigns to their conditioning class (`eval/sample_accuracy`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import linalg

from diffblocks_jax import config as config_lib
from diffblocks_jax.core import partitions
from diffblocks_jax.core import blocks, sampler, steps
from diffblocks_jax.data import input_pipeline


@dataclasses.dataclass(frozen=True)
class Generation:
  """What the core asks of a task, for images: inputs are class labels, targets NHWC images in [-1, 1]."""
  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C)
  edm: partitions.EDM = partitions.DEFAULT_EDM
  condition_dropout: float = 0.0  # The end-to-end loss drops labels itself (the block step does it for blocks).

  @classmethod
  def from_config(cls, config, *, num_classes: int, image_shape) -> Generation:
    return cls(int(num_classes), tuple(int(n) for n in image_shape), partitions.EDM.from_config(config.diffusion),
               float(config.diffusion.class_dropout_prob))

  def target(self, model, images, block) -> jax.Array:
    del model, block
    return images.astype(jnp.float32)

  def target_shape(self, model, labels) -> tuple[int, ...]:
    del model
    return (labels.shape[0],) + self.image_shape

  def denoise(self, model, labels, x_t, sigmas, block, key):
    return model.denoise(labels, x_t, sigmas, block, key=key)

  def loss(self, denoised, images, sigmas):
    """EDM's loss: w(σ)·mean‖D(x_t; σ) − x₀‖² per image, averaged; aux: the unweighted squared error."""
    err = jnp.mean(jnp.square(denoised - images.astype(jnp.float32)), axis=(1, 2, 3))
    return jnp.mean(partitions.loss_weight(sigmas, self.edm.sigma_data) * err), {'mse': err.mean()}

  def estimate(self, model, denoised, block) -> jax.Array:
    del model, block
    return denoised

  def unconditional(self, labels):
    return jnp.full_like(labels, self.num_classes)

  def drop_condition(self, key, labels, prob: float):
    """Classifier-free guidance training: the null class for a random `prob` of the batch."""
    if not prob:
      return labels
    return jnp.where(jax.random.bernoulli(key, prob, labels.shape), self.num_classes, labels)

  def end_to_end_loss(self, model, labels, images, key):
    """EDM training of the whole network: ln σ ~ N(P_mean, P_std²) over every level, no partition."""
    sigma_key, noise_key, cond_key, dropout_key = jax.random.split(key, 4)
    sigmas = jnp.exp(self.edm.p_mean + self.edm.p_std * jax.random.normal(sigma_key, (labels.shape[0],)))
    x0 = self.target(model, images, 0)
    x_t = x0 + sigmas[:, None, None, None] * jax.random.normal(noise_key, x0.shape)
    labels = self.drop_condition(cond_key, labels, self.condition_dropout)
    return self.loss(model.denoise(labels, x_t, sigmas, 0, key=dropout_key), images, sigmas)


# ----------------------------------------------------------------------------------- from a config

def make_task(config, data) -> Generation:
  return Generation.from_config(config, num_classes=data.num_classes,
                                image_shape=(data.image_size, data.image_size, data.channels))


def partition(config, data=None) -> partitions.LogNormalPartition:
  """B blocks for 'dit_dblock'; one block owning every σ for the end-to-end 'dit' (its sampler's routing)."""
  del data  # The EDM plan needs nothing from the data.
  return partitions.LogNormalPartition.from_config(config_lib.num_blocks(config), config.diffusion)


def train_batch(key, rows, data_config):
  """(inputs, targets) of a step from gathered uint8 images and labels: the class conditions, the image
  (in [-1, 1] through data.mean = data.std = 0.5) is the target."""
  images, labels = rows
  return labels, input_pipeline.augment(key, images, data_config)


def make_train_step(graphdef, config, schedule, *, data, block: int | None = None,
                    placement: blocks.Placement = blocks.ON_DEVICE):
  task = make_task(config, data)
  if not config_lib.uses_blocks(config):
    return steps.make_end_to_end_step(graphdef, task, config.optim, schedule)
  return steps.make_block_step(graphdef, task, partition(config), config.optim, schedule,
                               condition_dropout=config.diffusion.class_dropout_prob, block=block,
                               placement=placement)


def make_sample_fn(graphdef, config, data, *, num_steps: int | None = None, cfg_scale: float | None = None,
                   solver: str | None = None, grid: str | None = None, return_trajectory: bool = False):
  """`sample(params, labels, key) -> images` in [-1, 1] (and the per-step D with `return_trajectory`)."""
  task, plan = make_task(config, data), partition(config)
  e = config.eval
  kwargs = dict(partition=plan, num_steps=num_steps or e.num_inference_steps or 50,
                cfg_scale=e.cfg_scale if cfg_scale is None else cfg_scale, solver=solver or e.solver,
                grid=grid or e.sigma_grid, return_trajectory=return_trajectory)

  def sample(params, labels, key):
    return sampler.sample_loop(task, nnx.merge(graphdef, params), labels, key, **kwargs)

  return sample


# ----------------------------------------------------------------------------------- offline evaluation

def balanced_labels(num: int, num_classes: int) -> np.ndarray:
  """0, 1, …, C−1, 0, 1, …: every class as often as the others (±1)."""
  return np.arange(num, dtype=np.int32) % num_classes


def to_unit(images) -> np.ndarray:
  """[-1, 1] model space → float32 [0, 1], clipped: what a classifier or a PNG expects."""
  return np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
  """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½) of two feature sets (N, D), in float64."""
  a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
  if a.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
    raise ValueError(f'frechet_distance needs two (N>=2, D) feature sets of equal D, got {a.shape} and {b.shape}')
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root = linalg.sqrtm(cov_a @ cov_b)
  # sqrtm of a product of PSD matrices is real up to rounding: a tiny imaginary part is discarded, and a distance
  # of identical sets that rounds below zero is zero.
  fd = np.sum((mu_a - mu_b)**2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(np.real(root))
  return float(max(fd, 0.0))


def sample_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Share of samples the classifier assigns to the class they were conditioned on."""
  return float(np.mean(np.argmax(logits, axis=-1) == labels))


def image_grid(images_unit: np.ndarray, rows: int) -> np.ndarray:
  """(rows·H + gaps, cols·W + gaps, C) uint8 grid of N = rows·cols images in [0, 1], one-pixel gaps."""
  n, h, w, c = images_unit.shape
  cols = -(-n // rows)
  grid = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1, c), np.float32)
  for i in range(n):
    r, col = divmod(i, cols)
    grid[r * (h + 1):r * (h + 1) + h, col * (w + 1):col * (w + 1) + w] = images_unit[i]
  return np.round(grid * 255).astype(np.uint8)


def class_grid_labels(num_classes: int, per_class: int) -> np.ndarray:
  """Labels for a grid with one row per class: class c fills row c."""
  return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
