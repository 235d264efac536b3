"""RandAugment ops against Pillow (what torchvision.transforms.RandAugment runs on PIL images)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from diffblocks_jax.data import randaugment as ra

H = W = 32
MAGNITUDES = ra.magnitude_table(31, H, W)[:, 9]  # torchvision's default magnitude bin
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
# Ops that are the identity at magnitude bin 0 (Solarize at threshold 255 still inverts 255s).
IDENTITY_AT_ZERO = ("Identity", *GEOMETRIC, "Brightness", "Color", "Contrast", "Sharpness", "Posterize")

apply_op = jax.jit(ra.apply_op)  # one compile per shape: op and magnitude are traced


def _images(channels: int, n: int = 6, seed: int = 0) -> np.ndarray:
  """Random images whose channels span different sub-ranges, so AutoContrast/Equalize are not no-ops."""
  rng = np.random.default_rng(seed)
  lo = rng.integers(0, 100, (n, 1, 1, channels))
  hi = rng.integers(150, 256, (n, 1, 1, channels))
  images = rng.integers(lo, hi + 1, (n, H, W, channels))
  images[0] = rng.integers(0, 256, (H, W, channels))  # one full-range image
  images[1] = images[1] // 37 * 37  # few distinct values: coarse histograms for Equalize
  return images.astype(np.uint8)


def _pil_op(name: str, m: float, image: np.ndarray) -> np.ndarray:
  """Pillow's version of torchvision's `_apply_op(img, name, m, NEAREST, fill=None)` on a PIL image."""
  im = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  fill = 0 if im.mode == "L" else (0, 0, 0)
  affine = lambda coeffs: im.transform(im.size, Image.Transform.AFFINE, coeffs,
                                       resample=Image.Resampling.NEAREST, fillcolor=fill)
  ops = {
      "Identity": lambda: im,
      "ShearX": lambda: affine((1, m, 0, 0, 1, 0)),  # torchvision: center=[0, 0]
      "ShearY": lambda: affine((1, 0, 0, m, 1, 0)),
      "TranslateX": lambda: affine((1, 0, -int(m), 0, 1, 0)),
      "TranslateY": lambda: affine((1, 0, 0, 0, 1, -int(m))),
      "Rotate": lambda: im.rotate(m, resample=Image.Resampling.NEAREST, fillcolor=fill),
      "Brightness": lambda: ImageEnhance.Brightness(im).enhance(1 + m),
      "Color": lambda: ImageEnhance.Color(im).enhance(1 + m),
      "Contrast": lambda: ImageEnhance.Contrast(im).enhance(1 + m),
      "Sharpness": lambda: ImageEnhance.Sharpness(im).enhance(1 + m),
      "Posterize": lambda: ImageOps.posterize(im, int(m)),
      "Solarize": lambda: ImageOps.solarize(im, m),
      "AutoContrast": lambda: ImageOps.autocontrast(im),
      "Equalize": lambda: ImageOps.equalize(im),
  }
  return np.asarray(ops[name]()).reshape(image.shape)


def _cases():
  for i, name in enumerate(ra.OP_NAMES):
    for sign in ((1, -1) if ra.SIGNED[i] else (1,)):
      yield pytest.param(name, sign, id=f"{name}{'-' if sign < 0 else '+'}")


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name, sign", list(_cases()))
def test_op_matches_pillow(name, sign, channels):
  images = _images(channels)
  m = sign * float(MAGNITUDES[ra.OPS[name]])
  got = np.asarray(apply_op(jnp.asarray(images), ra.OPS[name], m))
  want = np.stack([_pil_op(name, m, image) for image in images])
  assert got.shape == want.shape and got.dtype == np.uint8
  changed = (want != images).mean()
  if name == "Identity" or (name == "Color" and channels == 1):  # Color on L is the identity
    assert changed == 0
  else:  # guard against a vacuous comparison: the op must actually move pixels
    assert changed > 0.05, changed
  if name in GEOMETRIC:
    # Tolerance: float32 coordinates against Pillow's float64 / 16.16 fixed point may pick the
    # neighbouring source pixel when it lies within ~1e-4 of a pixel edge: >= 99% identical pixels.
    # (All 32x32 cases here are in fact identical.)
    assert (got == want).mean() >= 0.99
  else:
    # Tolerance: none. Colour and table ops reproduce Pillow's integer / float32 arithmetic bit-exactly.
    np.testing.assert_array_equal(got, want)


def test_autocontrast_reproduces_pillow_rounding():
  """Pillow's float64 `int(x*s - lo*s)` maps hi to 254 for some (lo, hi), e.g. (0, 25); so must we."""
  rng = np.random.default_rng(1)
  pairs = [(0, 25), (0, 29), (3, 200), (17, 18), (100, 100)]
  pairs += [tuple(sorted(p)) for p in rng.integers(0, 256, (59, 2))]
  images = []
  for lo, hi in pairs:  # each channel holds every value of lo..hi, so every table entry is checked
    ramp = np.arange(H * W) % (hi - lo + 1) + lo
    images.append(np.stack([rng.permutation(ramp) for _ in range(3)], -1).reshape(H, W, 3))
  images = np.stack(images).astype(np.uint8)
  got = np.asarray(apply_op(jnp.asarray(images), ra.OPS["AutoContrast"], 0.0))
  want = np.stack([_pil_op("AutoContrast", 0.0, image) for image in images])
  np.testing.assert_array_equal(got, want)
  assert got[0].max() == 254  # the quirk itself: exact arithmetic would give 255


def test_magnitude_table_matches_torchvision_defaults():
  m = {name: MAGNITUDES[i] for i, name in enumerate(ra.OP_NAMES)}
  np.testing.assert_allclose(
      [m["ShearX"], m["TranslateX"], m["TranslateY"], m["Rotate"], m["Brightness"], m["Solarize"]],
      [0.09, 150 / 331 * W * 0.3, 150 / 331 * H * 0.3, 9.0, 0.27, 178.5], rtol=1e-6)
  assert m["Posterize"] == 7 and m["Identity"] == m["AutoContrast"] == m["Equalize"] == 0
  assert list(ra.magnitude_table(31, H, W)[ra.OPS["Posterize"], ::5]) == [8, 7, 7, 6, 5, 5, 4]


@pytest.mark.parametrize("name", IDENTITY_AT_ZERO)
def test_magnitude_zero_is_identity(name):
  images = _images(3)
  m = float(ra.magnitude_table(31, H, W)[ra.OPS[name], 0])
  np.testing.assert_array_equal(np.asarray(apply_op(jnp.asarray(images), ra.OPS[name], m)), images)


def test_randaugment_end_to_end():
  images = jnp.asarray(np.repeat(_images(3)[2:3], 64, axis=0))  # one image, 64 independent draws
  f = jax.jit(ra.randaugment)
  out = f(jax.random.key(0), images)
  assert out.shape == images.shape and out.dtype == jnp.uint8
  np.testing.assert_array_equal(out, f(jax.random.key(0), images))  # same key, same output
  assert not np.array_equal(out, f(jax.random.key(1), images))
  # Different images drew different ops: many distinct results from one input.
  assert len({np.asarray(o).tobytes() for o in out}) >= 32
  # The batch equals the drawn ops applied one image at a time.
  ops, mags = ra.sample_ops(jax.random.key(0), 64, height=H, width=W)
  for i in (0, 1, 2, 3):
    one = images[i:i + 1]
    for step in range(2):
      one = apply_op(one, ops[step, i], mags[step, i])
    np.testing.assert_array_equal(out[i:i + 1], one)


def test_sample_ops_distribution():
  ops, mags = ra.sample_ops(jax.random.key(3), 4096, height=H, width=W)
  counts = np.bincount(np.asarray(ops).ravel(), minlength=ra.NUM_OPS)
  expected = ops.size / ra.NUM_OPS
  assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts  # uniform over 14 ops
  signed = ra.SIGNED[np.asarray(ops)]
  negative = np.asarray(mags)[signed] < 0
  assert abs(negative.mean() - 0.5) < 0.03  # sign p = 0.5 on signed ops
  assert np.all(np.asarray(mags)[~signed] >= 0)
  np.testing.assert_array_equal(np.abs(np.asarray(mags)), MAGNITUDES[np.asarray(ops)])


def test_randaugment_magnitude_zero_keeps_identity_like_images():
  images = jnp.asarray(np.repeat(_images(3)[2:3], 128, axis=0))
  key = jax.random.key(7)
  out = np.asarray(ra.randaugment(key, images, magnitude=0))
  ops, _ = ra.sample_ops(key, 128, magnitude=0, height=H, width=W)
  ops = np.asarray(ops)
  keep = np.isin(ops, [ra.OPS[n] for n in IDENTITY_AT_ZERO]).all(axis=0)
  assert 0 < keep.sum() < 128
  np.testing.assert_array_equal(out[keep], np.asarray(images)[keep])
  # The image spans a sub-range, so the magnitude-free ops still stretch or equalise it.
  acts = np.isin(ops, [ra.OPS["AutoContrast"], ra.OPS["Equalize"]]).any(axis=0)
  assert acts.sum() > 0
  assert all(not np.array_equal(o, images[0]) for o in out[acts])
