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
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from diffblocks_jax import config as config_lib
from diffblocks_jax.core import blocks, partitions, sampler, steps
from diffblocks_jax.data import input_pipeline
from diffblocks_jax.tasks import images, registry

UNIT = 'img'  # Progress lines count images per second.
GRID_PER_CLASS = 10  # Samples per row of the class grid.
DEFAULT_INFERENCE_STEPS = 50  # eval.num_inference_steps = 0.


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
  """B blocks for DiffusionBlocks; one block owning every σ for the end-to-end DiT (its sampler's routing)."""
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
  if not registry.kind(config.model.kind).blockwise:
    return steps.make_end_to_end_step(graphdef, task, config.optim, schedule)
  return steps.make_block_step(graphdef, task, partition(config), config.optim, schedule,
                               condition_dropout=config.diffusion.class_dropout_prob, block=block,
                               placement=placement)


def make_sample_fn(graphdef, config, data, *, num_steps: int | None = None, cfg_scale: float | None = None,
                   solver: str | None = None, grid: str | None = None, return_trajectory: bool = False):
  """`sample(params, labels, key) -> images` in [-1, 1] (and the per-step D with `return_trajectory`)."""
  task, plan = make_task(config, data), partition(config)
  e = config.eval
  kwargs = dict(partition=plan, num_steps=num_steps or inference_steps(config),
                cfg_scale=e.cfg_scale if cfg_scale is None else cfg_scale, solver=solver or e.solver,
                grid=grid or e.sigma_grid, return_trajectory=return_trajectory)

  def sample(params, labels, key):
    return sampler.sample_loop(task, nnx.merge(graphdef, params), labels, key, **kwargs)

  return sample


def inference_steps(config) -> int:
  """The sampler's steps: config.eval.num_inference_steps, 0 meaning DEFAULT_INFERENCE_STEPS."""
  return config.eval.num_inference_steps or DEFAULT_INFERENCE_STEPS


# ----------------------------------------------------------------------------------- evaluation of a run
# WORKDIR/samples/step_<N>.png         one row per class, written at every evaluation
# WORKDIR/samples/sample_<N>.{png,npz} --mode=sample: the grid, and every sample (uint8 NHWC) with its label

class GenerationEvaluator:
  """`evaluator(params, step) -> metrics`: writes the class grid; with a classifier, eval/fd, eval/fd_floor and
  eval/sample_accuracy; with `feature_fn`, eval/fd_external."""

  def __init__(self, exp, workdir: str, *, classifier: images.Classifier | None = None,
               feature_fn: Callable | None = None):
    self.exp, self.workdir, self.classifier, self.feature_fn = exp, workdir, classifier, feature_fn
    config, data = exp.config, exp.data
    self.num_classes = data.num_classes
    self.batch_size = exp.eval_batch_size
    self.num_samples = config.eval.num_samples or len(data.test_labels)
    # Samples replicated: every process can read them (multi-host) and score them.
    self._sample = jax.jit(make_sample_fn(exp.graphdef, config, data), out_shardings=exp.replicated())
    self.key = exp.key('grid')  # The same noise at every evaluation.
    self._real: dict[str, np.ndarray] = {}

  def samples(self, params, labels: np.ndarray, key: jax.Array) -> np.ndarray:
    """Images in [0, 1] for int labels, in batches (every batch its own noise)."""
    params = self.exp.on_device(params)
    counter = iter(range(len(labels)))
    draw = lambda chunk: self._sample(params, chunk, jax.random.fold_in(key, next(counter)))
    return images.to_unit(images.batched(draw, np.asarray(labels, np.int32), self.batch_size))

  def grid(self, params, key: jax.Array | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(grid uint8, samples [0, 1]): one row of GRID_PER_CLASS samples per class."""
    labels = images.class_grid_labels(self.num_classes, GRID_PER_CLASS)
    unit = self.samples(params, labels, self.key if key is None else key)
    return images.image_grid(unit, rows=self.num_classes), unit

  def _real_features(self, name: str, fn: Callable) -> tuple[np.ndarray, np.ndarray]:
    if name not in self._real:  # Real images' features never change: computed once per run.
      unit = lambda x: np.asarray(x, np.float32) / 255.0
      self._real[name] = (fn(unit(self.exp.data.test_images)), fn(unit(self.exp.data.train_images)))
    return self._real[name]

  def __call__(self, params, step: int) -> dict[str, float]:
    grid, _ = self.grid(params)
    if jax.process_index() == 0:
      os.makedirs(os.path.join(self.workdir, 'samples'), exist_ok=True)
      images.write_png(os.path.join(self.workdir, 'samples', f'step_{step}.png'), grid)
    metrics = {}
    if self.classifier is None and self.feature_fn is None:
      return metrics
    labels = images.balanced_labels(self.num_samples, self.num_classes)
    fake = self.samples(params, labels, jax.random.fold_in(self.key, 1))
    if self.classifier is not None:
      feats = lambda x: self.classifier.features(x, self.batch_size)
      test, train = self._real_features('classifier', feats)
      metrics['eval/fd'] = images.frechet_distance(feats(fake), test)
      metrics['eval/fd_floor'] = images.frechet_distance(test, train)
      metrics['eval/sample_accuracy'] = images.sample_accuracy(self.classifier.logits(fake, self.batch_size), labels)
    if self.feature_fn is not None:
      test, _ = self._real_features('external', lambda x: np.asarray(self.feature_fn(x)))
      metrics['eval/fd_external'] = images.frechet_distance(np.asarray(self.feature_fn(fake)), test)
    return metrics


def describe(metrics: dict[str, float], num_samples: int) -> str:
  """One log line for an evaluation's generation figures."""
  if 'eval/fd' not in metrics:
    return 'sample grid written (no classifier: set config.eval.classifier_workdir for eval/fd)'
  return (f"{num_samples} samples: classifier-feature FD {metrics['eval/fd']:.3f} (real test vs train: "
          f"{metrics['eval/fd_floor']:.3f}), sample accuracy {metrics['eval/sample_accuracy']:.4f}")


def load_classifier(exp) -> images.Classifier | None:
  """The classifier of config.eval.classifier_workdir (a finished end-to-end classification run on the same
  data), checked up front; None when unset."""
  path = exp.config.eval.classifier_workdir
  baselines = registry.kinds_where(lambda k: k.task == 'classification' and not k.blockwise)
  if not path:
    logging.warning('config.eval.classifier_workdir is empty: no eval/fd or eval/sample_accuracy, only sample '
                    'grids. Train a classifier on the same data first (e.g. configs/digits_vit.py) and pass '
                    'its workdir.')
    return None

  def kind_error(judge):
    if judge.model.kind not in baselines:
      return (f' holds a {judge.model.kind!r} run; the features come from an end-to-end classifier (model.kind '
              f'{" or ".join(map(repr, baselines))})')
    return None

  cls_config, cls_exp, state = exp.load_judge(
      'classifier_workdir', kind_error=kind_error, why='FD needs the same dataset',
      data_fields=('source', 'name', 'path', 'split_seed', 'train_split', 'test_split', 'label_key'))
  logging.info('Quality features: the classifier of %s (checkpoint step %d).', path, int(state.step))
  return images.Classifier(cls_exp.graphdef, exp.on_device(state.params), cls_config.data, path)


def make_evaluator(exp, workdir: str):
  """(params, step) -> (metrics, log line); the classifier and feature function loaded and checked up front."""
  e = exp.config.eval
  evaluator = GenerationEvaluator(exp, workdir, classifier=load_classifier(exp),
                                  feature_fn=images.load_feature_fn(e.feature_fn) if e.feature_fn else None)

  def evaluate(params, step):
    metrics = evaluator(params, step)
    return metrics, describe(metrics, evaluator.num_samples)

  return evaluate


def write_samples(exp, workdir: str, params, step: int, num: int) -> str:
  """--mode=sample: a class-balanced batch of `num` samples as .npz (uint8 images, labels) and the class grid."""
  evaluator = GenerationEvaluator(exp, workdir)
  out = os.path.join(workdir, 'samples')
  os.makedirs(out, exist_ok=True)
  key = exp.key('samples')
  grid, _ = evaluator.grid(params, key)
  labels = images.balanced_labels(num, evaluator.num_classes)
  samples = np.round(evaluator.samples(params, labels, jax.random.fold_in(key, 1)) * 255).astype(np.uint8)
  stem = os.path.join(out, f'sample_{step}')
  if jax.process_index() == 0:
    images.write_png(stem + '.png', grid)
    np.savez(stem + '.npz', images=samples, labels=labels)
  return f'{num} samples in {stem}.npz, the class grid in {stem}.png'
