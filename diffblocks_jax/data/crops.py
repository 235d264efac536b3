"""Random crops on the device, batched and jittable: torchvision's RandomCrop(padding) and RandomResizedCrop.

The release trains CIFAR-100 with RandomCrop(32, padding=4) and Tiny-ImageNet with RandomResizedCrop(64),
both on PIL images. RandomResizedCrop here draws torchvision's boxes and resamples them the way Pillow's
bilinear resize does (a triangle filter widened by the reduction factor, two uint8 passes, horizontal first),
so a crop comes out as Pillow would give it, bit for bit (tests/test_crops.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

NUM_ATTEMPTS = 10  # torchvision tries this many random boxes before falling back to a central one.
_PRECISION_BITS = 22  # Pillow's fixed-point fraction for 8-bit resampling.


def random_pad_crop(key: jax.Array, images: jax.Array, pad: int) -> jax.Array:
  """torchvision's RandomCrop(size, padding=pad): zero-pad, then crop at an offset in [0, 2 * pad]."""
  n, height, width, channels = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jax.random.randint(key, (n, 2), 0, 2 * pad + 1)
  crop = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))
  return jax.vmap(crop)(padded, offsets)


def resized_crop_boxes(key: jax.Array, num: int, height: int, width: int, scale=(0.08, 1.0),
                       ratio=(3 / 4, 4 / 3)) -> jax.Array:
  """(num, 4) int32 boxes (top, left, box height, box width), drawn as torchvision's RandomResizedCrop does.

  Up to ten tries: an area fraction uniform in `scale`, an aspect ratio log-uniform in `ratio`, sides rounded;
  the first that fits is placed uniformly. If none fits, the central crop of the image clamped to `ratio`.
  """
  area_key, ratio_key, top_key, left_key = jax.random.split(key, 4)
  shape = (num, NUM_ATTEMPTS)
  target_area = height * width * jax.random.uniform(area_key, shape, minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(ratio_key, shape, minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
  w = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)  # Half to even, as Python's round().
  h = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(fits, axis=1)
  any_fits = jnp.any(fits, axis=1)
  h = jnp.take_along_axis(h, first[:, None], axis=1)[:, 0]
  w = jnp.take_along_axis(w, first[:, None], axis=1)[:, 0]
  # Uniform offsets in [0, H - h]: the random draws of the chosen try (one uniform per image suffices).
  top = jnp.floor(jax.random.uniform(top_key, (num,)) * (height - h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(left_key, (num,)) * (width - w + 1)).astype(jnp.int32)
  fallback_h, fallback_w = _central_box(height, width, ratio)
  h = jnp.where(any_fits, h, fallback_h)
  w = jnp.where(any_fits, w, fallback_w)
  top = jnp.where(any_fits, top, (height - fallback_h) // 2)
  left = jnp.where(any_fits, left, (width - fallback_w) // 2)
  return jnp.stack([top, left, h, w], axis=1)


def _central_box(height: int, width: int, ratio) -> tuple[int, int]:
  in_ratio = width / height
  if in_ratio < min(ratio):
    return int(round(width / min(ratio))), width
  if in_ratio > max(ratio):
    return height, int(round(height * max(ratio)))
  return height, width


@functools.cache
def pillow_weight_table(size: int) -> np.ndarray:
  """(size + 1, size, size) int32: [L, o, r] = Pillow's fixed-point bilinear weight of pixel r of a crop of
  length L for output o, when the crop is resized to `size` (computed in float64, as Pillow does).

  Output o samples the crop at centre (o + ½)·L/size; the triangle is widened by the reduction factor when
  shrinking (antialiasing); weights are normalised over the crop, then rounded to 22 fractional bits.
  """
  table = np.zeros((size + 1, size, size), np.int64)
  r = np.arange(size, dtype=np.float64)
  for length in range(1, size + 1):
    step = length / size
    support = max(step, 1.0)
    centre = (np.arange(size, dtype=np.float64) + 0.5) * step
    weights = np.maximum(0.0, 1.0 - np.abs(r[None, :] + 0.5 - centre[:, None]) / support)
    weights[:, length:] = 0.0
    weights /= weights.sum(axis=1, keepdims=True)
    table[length] = np.floor(weights * (1 << _PRECISION_BITS) + 0.5)
  return table.astype(np.int32)


def resample_weights(start: jax.Array, length: jax.Array, size: int) -> jax.Array:
  """(size, size) int32 fixed-point weights mapping image pixels [start, start + length) onto `size` outputs."""
  table = jnp.asarray(pillow_weight_table(size))[length]
  rel = jnp.arange(size) - start
  inside = (rel >= 0) & (rel < length)
  return jnp.where(inside[None, :], table[:, jnp.clip(rel, 0, size - 1)], 0)


def resized_crop(images_uint8: jax.Array, boxes: jax.Array) -> jax.Array:
  """Each image's box resampled to the image's own size (uint8 NHWC in and out), as Pillow does it.

  In Pillow's integer arithmetic: fixed-point weights, each pass (horizontal first) rounded half up and
  clipped to uint8. Float32 would land on either side of the many exact .5 ties that small integer ratios
  produce. Every sum stays below 2**30, so int32 holds it.
  """
  _, height, width, _ = images_uint8.shape
  to_uint8 = lambda total: jnp.clip((total + (1 << (_PRECISION_BITS - 1))) >> _PRECISION_BITS, 0, 255)

  def one(image, box):
    top, left, h, w = box[0], box[1], box[2], box[3]
    horizontal = to_uint8(jnp.einsum('ow,hwc->hoc', resample_weights(left, w, width), image.astype(jnp.int32)))
    return to_uint8(jnp.einsum('oh,hwc->owc', resample_weights(top, h, height), horizontal)).astype(jnp.uint8)

  return jax.vmap(one)(images_uint8, boxes)


def random_resized_crop(key: jax.Array, images_uint8: jax.Array, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> jax.Array:
  """torchvision's RandomResizedCrop(image size) with bilinear resampling; each image draws its own box."""
  n, height, width, _ = images_uint8.shape
  return resized_crop(images_uint8, resized_crop_boxes(key, n, height, width, scale, ratio))
