"""Generated images in a run (model.kind 'dit' | 'dit_dblock'): the class grid written at each evaluation,
`--mode=sample`'s grid and `.npz`, and the offline quality figures (tasks/generation.py says what they are).

  WORKDIR/samples/step_<N>.png        one row per class, written at every evaluation
  WORKDIR/samples/sample_<N>.{png,npz} --mode=sample: the grid, and every sample (uint8 NHWC) with its label
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx

from diffblocks_jax import config as config_lib
from diffblocks_jax.training import reporting, sharding
from diffblocks_jax.data import input_pipeline
from diffblocks_jax.tasks import generation

GRID_PER_CLASS = 10  # Samples per row of the class grid.


@dataclasses.dataclass
class Classifier:
  """A classifier trained here on the same data (its workdir's checkpoint): features and logits of images."""
  graphdef: Any
  params: Any
  data_config: Any  # Its normalisation.
  workdir: str

  def __post_init__(self):
    def run(params, unit, logits):
      model = nnx.merge(self.graphdef, params)
      x = input_pipeline.normalize(unit * 255.0, self.data_config)
      return model(x) if logits else model.features(x)
    self._features = jax.jit(lambda p, u: run(p, u, False))
    self._logits = jax.jit(lambda p, u: run(p, u, True))

  def features(self, unit: np.ndarray, batch_size: int) -> np.ndarray:
    return _batched(lambda u: self._features(self.params, u), unit, batch_size)

  def logits(self, unit: np.ndarray, batch_size: int) -> np.ndarray:
    return _batched(lambda u: self._logits(self.params, u), unit, batch_size)


def _batched(fn: Callable, x: np.ndarray, batch_size: int) -> np.ndarray:
  """fn over x in batches of one shape (the last padded, the padding dropped): one compile."""
  out = []
  for start in range(0, len(x), batch_size):
    chunk = x[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out.append(np.asarray(fn(chunk))[:batch_size - pad])
  return np.concatenate(out)


def load_feature_fn(spec: str) -> Callable[[np.ndarray], np.ndarray]:
  """'module:function' → the function (float [0, 1] NHWC images → (N, D) features), e.g. Inception pool3."""
  module_name, _, name = spec.partition(':')
  if not module_name or not name:
    raise config_lib.ConfigError(f"config.eval.feature_fn={spec!r} must read 'module:function'")
  try:
    return getattr(importlib.import_module(module_name), name)
  except (ImportError, AttributeError) as e:
    raise config_lib.ConfigError(f'config.eval.feature_fn={spec!r} cannot be loaded: {e}') from e


class GenerationEvaluator:
  """`evaluator(params, step) -> metrics`: writes the class grid; with a classifier, eval/fd, eval/fd_floor and
  eval/sample_accuracy; with `feature_fn`, eval/fd_external."""

  def __init__(self, exp, workdir: str, *, classifier: Classifier | None = None,
               feature_fn: Callable | None = None):
    self.exp, self.workdir, self.classifier, self.feature_fn = exp, workdir, classifier, feature_fn
    config, data = exp.config, exp.data
    self.num_classes = data.num_classes
    self.batch_size = -(-config.eval.batch_size // exp.mesh.size) * exp.mesh.size
    self.num_samples = config.eval.num_samples or len(data.test_labels)
    # Samples replicated: every process can read them (multi-host) and score them.
    self._sample = jax.jit(generation.make_sample_fn(exp.graphdef, config, data),
                           out_shardings=sharding.replicated(exp.mesh))
    self.key = jax.random.fold_in(jax.random.key(config.seed), 0x5a3)  # The same noise at every evaluation.
    self._real: dict[str, np.ndarray] = {}

  def samples(self, params, labels: np.ndarray, key: jax.Array) -> np.ndarray:
    """Images in [0, 1] for int labels, in batches (every batch its own noise)."""
    params = sharding.on_device(params)
    counter = iter(range(len(labels)))
    draw = lambda chunk: self._sample(params, chunk, jax.random.fold_in(key, next(counter)))
    return generation.to_unit(_batched(draw, np.asarray(labels, np.int32), self.batch_size))

  def grid(self, params, key: jax.Array | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(grid uint8, samples [0, 1]): one row of GRID_PER_CLASS samples per class."""
    labels = generation.class_grid_labels(self.num_classes, GRID_PER_CLASS)
    images = self.samples(params, labels, self.key if key is None else key)
    return generation.image_grid(images, rows=self.num_classes), images

  def _real_features(self, name: str, fn: Callable) -> tuple[np.ndarray, np.ndarray]:
    if name not in self._real:  # Real images' features never change: computed once per run.
      unit = lambda x: np.asarray(x, np.float32) / 255.0
      self._real[name] = (fn(unit(self.exp.data.test_images)), fn(unit(self.exp.data.train_images)))
    return self._real[name]

  def __call__(self, params, step: int) -> dict[str, float]:
    lead = jax.process_index() == 0
    grid, _ = self.grid(params)
    if lead:
      os.makedirs(os.path.join(self.workdir, 'samples'), exist_ok=True)
      reporting.write_png(os.path.join(self.workdir, 'samples', f'step_{step}.png'), grid)
    metrics = {}
    if self.classifier is None and self.feature_fn is None:
      return metrics
    labels = generation.balanced_labels(self.num_samples, self.num_classes)
    fake = self.samples(params, labels, jax.random.fold_in(self.key, 1))
    if self.classifier is not None:
      feats = lambda x: self.classifier.features(x, self.batch_size)
      test, train = self._real_features('classifier', feats)
      metrics['eval/fd'] = generation.frechet_distance(feats(fake), test)
      metrics['eval/fd_floor'] = generation.frechet_distance(test, train)
      metrics['eval/sample_accuracy'] = generation.sample_accuracy(
          self.classifier.logits(fake, self.batch_size), labels)
    if self.feature_fn is not None:
      test, _ = self._real_features('external', lambda x: np.asarray(self.feature_fn(x)))
      metrics['eval/fd_external'] = generation.frechet_distance(np.asarray(self.feature_fn(fake)), test)
    return metrics


def describe(metrics: dict[str, float], num_samples: int) -> str:
  """One log line for an evaluation's generation figures."""
  if 'eval/fd' not in metrics:
    return 'sample grid written (no classifier: set config.eval.classifier_workdir for eval/fd)'
  return (f"{num_samples} samples: classifier-feature FD {metrics['eval/fd']:.3f} (real test vs train: "
          f"{metrics['eval/fd_floor']:.3f}), sample accuracy {metrics['eval/sample_accuracy']:.4f}")


def write_samples(evaluator: GenerationEvaluator, params, step: int, num: int, seed: int) -> str:
  """--mode=sample: a class-balanced batch of `num` samples as .npz (uint8 images, labels) and the grid."""
  out = os.path.join(evaluator.workdir, 'samples')
  os.makedirs(out, exist_ok=True)
  key = jax.random.fold_in(jax.random.key(seed), 0x5a4)
  grid, _ = evaluator.grid(params, key)
  labels = generation.balanced_labels(num, evaluator.num_classes)
  images = np.round(evaluator.samples(params, labels, jax.random.fold_in(key, 1)) * 255).astype(np.uint8)
  stem = os.path.join(out, f'sample_{step}')
  if jax.process_index() == 0:
    reporting.write_png(stem + '.png', grid)
    np.savez(stem + '.npz', images=images, labels=labels)
  logging.info('Wrote %d samples to %s.npz and the class grid to %s.png', num, stem, stem)
  return stem
