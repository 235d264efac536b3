"""RandAugment on the device: torchvision's op set and defaults, Pillow's pixel arithmetic.

Reproduces `torchvision.transforms.RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=31,
interpolation=NEAREST, fill=None)` as applied to PIL images (the usual CIFAR pipeline), vectorised over
a batch: every image draws its own op and sign at each of the `num_ops` steps.

Design (why not `jnp.select` over 14 candidate outputs, or `lax.switch` under `vmap`, which lowers to
the same select over every branch): each op belongs to one of three families that have an identity
setting, so one step is `lut(blend(warp(x)))` with per-image parameters:
  * warp:  Identity, ShearX/Y, TranslateX/Y, Rotate -- an inverse affine map, nearest, fill 0;
  * blend: Brightness, Color, Contrast, Sharpness -- `degenerate + f * (x - degenerate)`;
  * lut:   Posterize, Solarize, AutoContrast, Equalize -- a per-image, per-channel 256-entry table.
An image whose op is in another family gets the identity matrix, `degenerate = x`, or the identity table,
all of which are exact. A step thus costs one gather, one blend and one table gather for the whole batch,
instead of fourteen full outputs.

Pixel arithmetic follows Pillow so that results are bit-exact: grayscale is Pillow's rounded fixed-point
ITU-R 601-2 luma, the contrast mean is rounded, the SMOOTH filter rounds, blends are float32 (the product
rounded on its own as in Pillow's C, not fused into an FMA) and truncate, AutoContrast reproduces
Pillow's float64 rounding (a few channel maxima map to 254, not 255), Equalize is Pillow's integer table.
Integer steps run in int32, blends in float32. Geometry uses Pillow's convention (sample the input at
`floor(M @ (x + .5, y + .5))`); it is float32 here against Pillow's float64/16.16 fixed point,
so a pixel whose source coordinate lies within ~1e-4 of a pixel edge may pick the neighbour.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

OP_NAMES = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
            "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
OPS = {name: i for i, name in enumerate(OP_NAMES)}
NUM_OPS = len(OP_NAMES)
# Ops whose magnitude gets a random sign (torchvision's `_augmentation_space` second field).
SIGNED = np.array([name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
                            "Color", "Contrast", "Sharpness") for name in OP_NAMES])


def magnitude_table(num_bins: int, height: int, width: int) -> np.ndarray:
  """(NUM_OPS, num_bins) float32 magnitudes, as torchvision's `RandAugment._augmentation_space`."""
  lin = lambda end, start=0.0: np.linspace(start, end, num_bins, dtype=np.float32)
  zero = np.zeros(num_bins, np.float32)  # torchvision's 0-d magnitudes read as 0.0
  posterize = 8 - np.round(np.arange(num_bins) / ((num_bins - 1) / 4))  # round half to even, as torch
  table = {
      "Identity": zero, "ShearX": lin(0.3), "ShearY": lin(0.3),
      "TranslateX": lin(150.0 / 331.0 * width), "TranslateY": lin(150.0 / 331.0 * height),
      "Rotate": lin(30.0), "Brightness": lin(0.9), "Color": lin(0.9), "Contrast": lin(0.9),
      "Sharpness": lin(0.9), "Posterize": posterize.astype(np.float32), "Solarize": lin(0.0, 255.0),
      "AutoContrast": zero, "Equalize": zero,
  }
  return np.stack([table[name] for name in OP_NAMES])


# ------------------------------------------------------------------------------------------------ warp

def _inverse_affine(op: jax.Array, mag: jax.Array, height: int, width: int) -> jax.Array:
  """(N, 6) coefficients (a, b, c, d, e, f): output pixel-centre (u, v) samples input (au+bv+c, du+ev+f)."""
  one, zero = jnp.ones_like(mag), jnp.zeros_like(mag)
  shift = -jnp.trunc(mag)  # torchvision passes translate=[int(magnitude), 0]
  cos, sin = jnp.cos(jnp.deg2rad(mag)), jnp.sin(jnp.deg2rad(mag))
  cx, cy = width / 2, height / 2  # rotate about the image centre; shear about the corner (center=[0, 0])
  families = {
      OPS["ShearX"]: (one, mag, zero, zero, one, zero),
      OPS["ShearY"]: (one, zero, zero, mag, one, zero),
      OPS["TranslateX"]: (one, zero, shift, zero, one, zero),
      OPS["TranslateY"]: (one, zero, zero, zero, one, shift),
      OPS["Rotate"]: (cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy),
  }
  identity = (one, zero, zero, zero, one, zero)
  conds = [op == k for k in families]
  return jnp.stack([jnp.select(conds, [v[i] for v in families.values()], identity[i])
                    for i in range(6)], axis=-1)


def _warp(x: jax.Array, coeffs: jax.Array) -> jax.Array:
  """Nearest-neighbour inverse warp of int32 (N, H, W, C) images, fill 0, Pillow's pixel convention."""
  _, h, w, _ = x.shape
  u = jnp.arange(w, dtype=jnp.float32)[None, None, :] + 0.5
  v = jnp.arange(h, dtype=jnp.float32)[None, :, None] + 0.5
  a, b, c, d, e, f = (coeffs[:, i, None, None] for i in range(6))
  xin = jnp.floor(a * u + b * v + c)
  yin = jnp.floor(d * u + e * v + f)
  inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
  xi = jnp.clip(xin, 0, w - 1).astype(jnp.int32)
  yi = jnp.clip(yin, 0, h - 1).astype(jnp.int32)
  sampled = jax.vmap(lambda im, yy, xx: im[yy, xx])(x, yi, xi)
  return jnp.where(inside[..., None], sampled, 0)


# ----------------------------------------------------------------------------------------------- blend

def grayscale(x: jax.Array) -> jax.Array:
  """int32 (N, H, W) luma as Pillow's RGB->L: (19595 R + 38470 G + 7471 B + 2**15) >> 16."""
  if x.shape[-1] == 1:
    return x[..., 0]
  return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16


def _smooth(x: jax.Array) -> jax.Array:
  """Pillow's ImageFilter.SMOOTH ([[1,1,1],[1,5,1],[1,1,1]] / 13, rounded); border pixels kept."""
  _, h, w, _ = x.shape
  p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  total = sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) + 4 * x
  smoothed = (2 * total + 13) // 26  # round(total / 13); a sum over 13 is never exactly k + 1/2
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  interior = (rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1)
  return jnp.where(interior[None, :, :, None], smoothed, x)


def _blend_stage(x: jax.Array, op: jax.Array, mag: jax.Array) -> jax.Array:
  """Brightness / Color / Contrast / Sharpness as Pillow's ImageEnhance: blend(degenerate, x, 1 + mag)."""
  n, h, w, _ = x.shape
  gray = grayscale(x)
  mean = (2 * gray.sum(axis=(1, 2)) + h * w) // (2 * h * w)  # int(mean + 0.5), as ImageEnhance.Contrast
  sel = lambda name: (op == OPS[name])[:, None, None, None]
  degenerate = jnp.select(
      [sel("Brightness"), sel("Color"), sel("Contrast"), sel("Sharpness")],
      [jnp.zeros_like(x), jnp.broadcast_to(gray[..., None], x.shape),
       jnp.broadcast_to(mean[:, None, None, None], x.shape), _smooth(x)],
      x)  # degenerate == x makes the blend an exact identity for the other ops
  # Pillow's ImagingBlend: float32 `in1 + alpha * (in2 - in1)`, clipped, then truncated to uint8.
  product = _rounded_product((1.0 + mag).reshape(n, 1, 1, 1), x - degenerate)
  out = degenerate.astype(jnp.float32) + product
  return jnp.floor(jnp.clip(out, 0.0, 255.0)).astype(jnp.int32)


def _rounded_product(a: jax.Array, k: jax.Array) -> jax.Array:
  """float32 `a * k` rounded once, for integer |k| < 2**12, whatever XLA fuses it with.

  XLA contracts `d + a * k` into an FMA, which skips the product's rounding and so moves sums that
  land near an integer (30.999998 against Pillow's 31.0) across the truncation. Splitting `a` into two
  12-bit halves makes both partial products exact, so their sum is the correctly rounded `a * k`
  with or without contraction.
  """
  a_hi = jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(a, jnp.int32) & jnp.int32(-4096), jnp.float32)
  k = k.astype(jnp.float32)
  return a_hi * k + (a - a_hi) * k


# ------------------------------------------------------------------------------------------------- lut

@functools.cache
def _autocontrast_quirks() -> np.ndarray:
  """Sorted keys lo<<16 | hi<<8 | x where Pillow's float64 `int(x*s - lo*s)` is one below exact."""
  x = np.arange(256)[None, :]
  keys = []
  for lo in range(255):
    hi = np.arange(lo + 1, 256)[:, None]
    scale = 255.0 / (hi - lo)
    pil = np.trunc(x * scale + (-lo * scale))
    exact = (x - lo) * 255 // (hi - lo)
    bad = (pil != exact) & (x >= lo) & (x <= hi)
    keys.append((lo << 16) + (np.broadcast_to(hi, bad.shape)[bad] << 8) + np.broadcast_to(x, bad.shape)[bad])
  return np.sort(np.concatenate(keys)).astype(np.int32)


def _autocontrast_lut(x: jax.Array) -> jax.Array:
  """(N, C, 256) Pillow ImageOps.autocontrast tables: each channel's lo..hi stretched to 0..255."""
  lo = x.min(axis=(1, 2))[..., None]
  hi = x.max(axis=(1, 2))[..., None]
  v = jnp.arange(256, dtype=jnp.int32)
  exact = (v - lo) * 255 // jnp.maximum(hi - lo, 1)
  quirks = jnp.asarray(_autocontrast_quirks())
  keys = (lo << 16) + (hi << 8) + v
  idx = jnp.clip(jnp.searchsorted(quirks, keys), 0, quirks.shape[0] - 1)
  lut = jnp.clip(exact - (quirks[idx] == keys), 0, 255)
  return jnp.where(hi > lo, lut, v)  # a flat channel is left alone


def _equalize_lut(x: jax.Array) -> jax.Array:
  """(N, C, 256) Pillow ImageOps.equalize tables (integer arithmetic, hence exact)."""
  n, h, w, c = x.shape
  per_channel = x.transpose(0, 3, 1, 2).reshape(n * c, h * w)
  hist = jax.vmap(lambda p: jnp.bincount(p, length=256))(per_channel).reshape(n, c, 256)
  top = jnp.take_along_axis(hist, x.max(axis=(1, 2))[..., None], axis=-1)  # count of the last bin used
  step = (h * w - top) // 255
  below = jnp.cumsum(hist, axis=-1) - hist  # pixels strictly darker than each value
  lut = jnp.clip((step // 2 + below) // jnp.maximum(step, 1), 0, 255)
  return jnp.where(step > 0, lut, jnp.arange(256, dtype=jnp.int32))


def _lut_stage(x: jax.Array, op: jax.Array, mag: jax.Array) -> jax.Array:
  """Posterize / Solarize / AutoContrast / Equalize as one per-channel table lookup."""
  v = jnp.arange(256, dtype=jnp.int32)[None, None, :]
  m = mag[:, None, None]
  bits = jnp.clip(jnp.trunc(m), 0, 8).astype(jnp.int32)  # torchvision: posterize(img, int(magnitude))
  sel = lambda name: (op == OPS[name])[:, None, None]
  lut = jnp.select(
      [sel("Posterize"), sel("Solarize"), sel("AutoContrast"), sel("Equalize")],
      [v & -(1 << (8 - bits)), jnp.where(v >= m, 255 - v, v), _autocontrast_lut(x), _equalize_lut(x)],
      jnp.broadcast_to(v, (x.shape[0], x.shape[-1], 256)))
  channels = jnp.arange(x.shape[-1])
  return jax.vmap(lambda im, t: t.T[im, channels])(x, lut)


# ------------------------------------------------------------------------------------------------- api

def apply_op(images: jax.Array, op_index: jax.Array | int, magnitude_value: jax.Array | float) -> jax.Array:
  """Applies op `OP_NAMES[op_index]` with torchvision's signed `magnitude` to each image.

  Args:
    images: uint8 (N, H, W, C), C in {1, 3}.
    op_index: int, scalar or (N,): one op per image (see `OPS`).
    magnitude_value: float, scalar or (N,): the value torchvision's `_apply_op` receives, e.g. shear
      0.09, translate -4.35 (truncated to -4 pixels), rotate 9 degrees, enhance 0.27 (factor 1.27),
      posterize 7 (bits), solarize 178.5 (threshold); ignored by Identity/AutoContrast/Equalize.
  Returns:
    uint8 (N, H, W, C).
  """
  n, h, w, c = images.shape
  if c not in (1, 3):
    raise ValueError(f"RandAugment expects 1 or 3 channels, got shape {images.shape}")
  op = jnp.broadcast_to(jnp.asarray(op_index, jnp.int32), (n,))
  mag = jnp.broadcast_to(jnp.asarray(magnitude_value, jnp.float32), (n,))
  x = images.astype(jnp.int32)
  x = _warp(x, _inverse_affine(op, mag, h, w))
  x = _blend_stage(x, op, mag)
  x = _lut_stage(x, op, mag)
  return x.astype(jnp.uint8)


def sample_ops(key: jax.Array, n: int, *, num_ops: int = 2, magnitude: int = 9,
               num_magnitude_bins: int = 31, height: int, width: int) -> tuple[jax.Array, jax.Array]:
  """Per-image draws of RandAugment: (num_ops, n) op indices (uniform) and signed magnitudes (sign p=.5)."""
  magnitudes = jnp.asarray(magnitude_table(num_magnitude_bins, height, width)[:, magnitude])
  op_key, sign_key = jax.random.split(key)
  ops = jax.random.randint(op_key, (num_ops, n), 0, NUM_OPS)
  negate = jax.random.bernoulli(sign_key, 0.5, (num_ops, n)) & jnp.asarray(SIGNED)[ops]
  return ops, jnp.where(negate, -magnitudes[ops], magnitudes[ops])


def randaugment(key: jax.Array, images: jax.Array, *, num_ops: int = 2, magnitude: int = 9,
                num_magnitude_bins: int = 31) -> jax.Array:
  """RandAugment with torchvision's defaults; each image draws its own ops and signs.

  Args:
    key: PRNG key.
    images: uint8 (N, H, W, C), C in {1, 3}.
    num_ops, magnitude, num_magnitude_bins: as torchvision.transforms.RandAugment.
  Returns:
    uint8 of the same shape.
  """
  n, h, w, _ = images.shape
  ops, mags = sample_ops(key, n, num_ops=num_ops, magnitude=magnitude,
                         num_magnitude_bins=num_magnitude_bins, height=h, width=w)
  for step in range(num_ops):  # a static, short loop: num_ops is 2 by default
    images = apply_op(images, ops[step], mags[step])
  return images
