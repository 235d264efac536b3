"""Images for evaluation: grids a person can look at, PNG files, the Fréchet distance and the classifier whose
features and decisions judge generated images (tasks/generation.py says what the figures mean).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import struct
import zlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from scipy import linalg

from diffblocks_jax import config as config_lib
from diffblocks_jax.data import dataset, input_pipeline

MIN_SHOWN_PIXELS = 32  # A grid shows each image at least this many pixels a side.


def balanced_labels(num: int, num_classes: int) -> np.ndarray:
  """0, 1, …, C−1, 0, 1, …: every class as often as the others (±1)."""
  return np.arange(num, dtype=np.int32) % num_classes


def class_grid_labels(num_classes: int, per_class: int) -> np.ndarray:
  """Labels for a grid with one row per class: class c fills row c."""
  return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def to_unit(images) -> np.ndarray:
  """[-1, 1] model space → float32 [0, 1], clipped: what a classifier or a PNG expects."""
  return np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def image_grid(images_unit: np.ndarray, rows: int, *, min_size: int = MIN_SHOWN_PIXELS) -> np.ndarray:
  """(rows·H' + gaps, cols·W' + gaps, C) uint8 grid of N = rows·cols images in [0, 1], one-pixel gaps; each image
  upscaled by an integer factor (nearest neighbour) to at least `min_size` pixels a side, so 8x8 digits can be
  seen without zooming."""
  n, h, w, c = images_unit.shape
  scale = max(1, -(-min_size // min(h, w)))
  images_unit = np.repeat(np.repeat(np.asarray(images_unit), scale, axis=1), scale, axis=2)
  h, w = h * scale, w * scale
  cols = -(-n // rows)
  grid = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1, c), np.float32)
  for i in range(n):
    r, col = divmod(i, cols)
    grid[r * (h + 1):r * (h + 1) + h, col * (w + 1):col * (w + 1) + w] = images_unit[i]
  return np.round(grid * 255).astype(np.uint8)


def write_png(path: str, image: np.ndarray) -> None:
  """An (H, W) or (H, W, 1|3) uint8 array as a PNG (written here: no imaging library needed)."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3)):
    raise ValueError(f'write_png needs uint8 (H, W) or (H, W, 1|3), got {image.dtype} {image.shape}')
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  h, w = image.shape[:2]
  color_type = 0 if image.ndim == 2 else 2  # Greyscale or RGB, 8 bits.
  rows = b''.join(b'\x00' + image[r].tobytes() for r in range(h))  # Filter type 0 on every row.
  chunk = lambda tag, data: (struct.pack('>I', len(data)) + tag + data +
                             struct.pack('>I', zlib.crc32(tag + data) & 0xffffffff))
  png = (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, color_type, 0, 0, 0)) +
         chunk(b'IDAT', zlib.compress(rows, 9)) + chunk(b'IEND', b''))
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(png)
  os.replace(tmp, path)  # A reader never sees half a picture.


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


def batched(fn: Callable, x: np.ndarray, batch_size: int) -> np.ndarray:
  """fn over x in batches of one shape (the last padded, the padding dropped): one compile."""
  return np.concatenate([np.asarray(fn(batch))[:real] for batch, real in dataset.padded_batches(x, batch_size)])


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
    return batched(lambda u: self._features(self.params, u), unit, batch_size)

  def logits(self, unit: np.ndarray, batch_size: int) -> np.ndarray:
    return batched(lambda u: self._logits(self.params, u), unit, batch_size)


def load_feature_fn(spec: str) -> Callable[[np.ndarray], np.ndarray]:
  """'module:function' → the function (float [0, 1] NHWC images → (N, D) features), e.g. Inception pool3."""
  module_name, _, name = spec.partition(':')
  if not module_name or not name:
    raise config_lib.ConfigError(f"config.eval.feature_fn={spec!r} must read 'module:function'")
  try:
    return getattr(importlib.import_module(module_name), name)
  except (ImportError, AttributeError) as e:
    raise config_lib.ConfigError(f'config.eval.feature_fn={spec!r} cannot be loaded: {e}') from e
