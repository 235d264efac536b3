"""Device crops against their references: Pillow's resampling and torchvision's box-drawing rules."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffblocks_jax import config as config_lib
from diffblocks_jax.data import crops, input_pipeline


def _images(height, width, n=1, seed=0):
  rng = np.random.default_rng(seed)
  noise = rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)
  yy, xx = np.mgrid[:height, :width]
  smooth = np.stack([128 + 100 * np.sin(xx / 3 + yy / 5), xx * 4 % 256, yy * 7 % 256], -1).astype(np.uint8)
  return np.concatenate([noise, smooth[None]])


@pytest.mark.parametrize('height, width', [(64, 64), (20, 30)])
def test_resized_crop_is_pillows_crop_then_bilinear_resize(height, width):
  # Shrinking (antialiased), enlarging, one side each way, the whole image.
  boxes = [(0, 0, height, width), (3, 5, 10, 12), (1, 2, height - 1, width - 3), (5, 0, 7, width),
           (0, 4, height, 5), (2, 3, height // 2, width // 3), (height - 9, width - 9, 9, 9)]
  for image in _images(height, width):
    ours = np.asarray(crops.resized_crop(jnp.asarray(np.stack([image] * len(boxes))),
                                         jnp.asarray(boxes, jnp.int32)))
    for out, (top, left, h, w) in zip(ours, boxes):
      ref = np.asarray(Image.fromarray(image).crop((left, top, left + w, top + h)).resize((width, height),
                                                                                          Image.BILINEAR))
      np.testing.assert_array_equal(out, ref, err_msg=str((top, left, h, w)))


def test_random_boxes_resample_exactly_as_pillow():
  rng = np.random.default_rng(5)
  for height, width in ((64, 64), (17, 9)):
    images = rng.integers(0, 256, (40, height, width, 3), dtype=np.uint8)
    boxes = np.asarray(crops.resized_crop_boxes(jax.random.key(height), 40, height, width))
    ours = np.asarray(crops.resized_crop(jnp.asarray(images), jnp.asarray(boxes)))
    for image, (top, left, h, w), out in zip(images, boxes, ours):
      ref = Image.fromarray(image).crop((left, top, left + w, top + h)).resize((width, height), Image.BILINEAR)
      np.testing.assert_array_equal(out, np.asarray(ref), err_msg=str((top, left, h, w)))


def _torchvision_boxes(rng, num, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision's RandomResizedCrop.get_params, written out in NumPy from its documented rules."""
  out = []
  for _ in range(num):
    for _ in range(10):
      area = height * width * rng.uniform(*scale)
      aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
      w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
      if 0 < w <= width and 0 < h <= height:
        out.append((rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w))
        break
    else:
      out.append((-1, -1, -1, -1))  # Fallback (never for these ranges on a square image).
  return np.asarray(out)


@pytest.mark.parametrize('height, width, scale', [(64, 64, (0.08, 1.0)), (32, 48, (0.5, 1.0))])
def test_boxes_follow_torchvision_rules(height, width, scale):
  num = 100_000
  ours = np.asarray(crops.resized_crop_boxes(jax.random.key(0), num, height, width, scale))
  ref = _torchvision_boxes(np.random.default_rng(0), num, height, width, scale)
  top, left, h, w = ours.T
  assert np.all((h > 0) & (w > 0) & (top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width))
  fell_back = np.mean(ref[:, 0] < 0)
  # Box sides and positions share torchvision's distribution (means and quartiles within sampling error).
  for ours_col, ref_col in zip(ours.T, ref[ref[:, 0] >= 0].T):
    assert abs(ours_col.mean() - ref_col.mean()) < 0.01 * max(ref_col.mean(), 1) + 0.05, (ours_col.mean(),
                                                                                          ref_col.mean())
    np.testing.assert_allclose(np.percentile(ours_col, [25, 50, 75]), np.percentile(ref_col, [25, 50, 75]),
                               atol=1.01)
  assert fell_back == 0 or abs(np.mean((h == height) & (w == width)) - fell_back) < 0.01


def test_boxes_fall_back_to_the_central_crop_clamped_to_the_ratio():
  # A 10x40 image with a tiny scale range and square-ish ratios: a box rarely fits, the fallback is central.
  boxes = np.asarray(crops.resized_crop_boxes(jax.random.key(1), 2000, 10, 40, scale=(0.99, 1.0),
                                              ratio=(0.9, 1.1)))
  # Area 400 at ratio ~1 needs 20x20 > 10 rows: no try fits; central crop: height 10, width round(10*1.1)=11.
  np.testing.assert_array_equal(boxes, np.tile([[0, 14, 10, 11]], (2000, 1)))


def test_random_resized_crop_in_the_training_augmentation():
  config = config_lib.get_base_config()
  d = config.data
  d.pad_crop, d.flip, d.random_resized_crop = 0, False, True
  d.mean, d.std = (0.0,), (1.0,)
  images = jnp.asarray(_images(16, 16, n=8))
  out = jax.jit(lambda key, x: input_pipeline.augment(key, x, d))(jax.random.key(0), images)
  assert out.shape == images.shape and out.dtype == jnp.float32
  boxes = crops.resized_crop_boxes(jax.random.split(jax.random.key(0), 3)[0], 9, 16, 16)
  expected = np.asarray(crops.resized_crop(images, boxes), np.float32) / 255
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-6)
  assert len({tuple(b) for b in np.asarray(boxes)}) == 9  # Each image its own box.
