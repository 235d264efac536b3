"""A convolutional stack for classification (paper Table 6, NoProp's comparison): the end-to-end CNN and its
DiffusionBlocks form, to show that the wrapper is not tied to attention.

NoProp's CNN (Li, Teh, Pascanu 2025, Figure 6, as public descriptions give it; its code is not public) is one
denoising module per step: an image path of 3x3 convolutions (32, 64, 128 channels, each followed by a
normalisation, ReLU, 2x2 max-pooling and dropout) and a fully connected layer; a label path of fully connected
layers on the noisy label embedding; the two concatenated and read by fully connected layers into class logits,
whose softmax weights the label embeddings. What is kept here, and what had to change:

- `core.blocks` stacks *equal* layers and hands every block the stem's output, so a layer must keep the feature
  map's shape: the pooling pyramid becomes a stem (a p x p, stride-p convolution, `model.patch_size`) and
  `model.num_layers` shape-keeping residual layers of one 3x3 convolution each (`model.hidden_size` channels, the
  width of NoProp's last convolution), pre-activation GroupNorm -> ReLU -> dropout -> conv;
- GroupNorm instead of BatchNorm: parameters are a pure pytree, with no running statistics to carry;
- the head: global average pooling, LayerNorm, one fully connected layer of `model.mlp_dim` units with ReLU
  (NoProp's FC(256)), a linear layer to the classes.

How a block takes the noisy label z_t and σ in (the DiffusionBlocks form): NoProp's label path becomes a
condition vector, cond = time(c_noise) + FC(c_in·z_t), which sets a shift, scale and gate for every layer's
normalised features (FiLM, zero-initialised as adaLN-Zero, so every layer starts as the identity) and for the
pooled features; the head reads c_out·h + c_skip·z_t (EDM's skip, as the DiffusionBlocks ViT does) and predicts
class logits, whose softmax weights the label table E (tasks/classification.py). E has `model.hidden_size`
columns.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from diffblocks_jax.core import blocks
from diffblocks_jax.models import edm, vit

TIME_FREQUENCY_DIM = 256
GROUPS = 8  # GroupNorm groups (fewer when the width is not a multiple: gcd(8, width)).


def group_norm(channels: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
  # fp32 whatever the compute dtype, as the ViT's norms.
  return nnx.GroupNorm(channels, num_groups=math.gcd(GROUPS, channels), epsilon=1e-5, dtype=jnp.float32,
                       rngs=rngs)


# Convolutions run as matmuls over shifted copies of the input (im2col), not as `lax.conv`: XLA's CPU backend runs
# a convolution inside the training loop's `lax.scan` ~70x slower than the same matmul (22 steps of a 6-layer
# stack: 18.7 s against 0.27 s, measured here), and one code path gives every backend the same arithmetic.
KERNEL_INIT = nnx.initializers.lecun_normal()  # nnx.Conv's default: fan-in = k·k·channels in.


class Conv3x3(nnx.Module):
  """A 3x3 convolution, stride 1, zero padding ('SAME'); kernel (3, 3, in, out) as nnx.Conv's."""

  def __init__(self, cin: int, cout: int, dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.kernel = nnx.Param(KERNEL_INIT(rngs.params(), (3, 3, cin, cout)))
    self.bias = nnx.Param(jnp.zeros((cout,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    padded = jnp.pad(x.astype(self.dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=-1)
    kernel = self.kernel[...].astype(self.dtype).reshape(9 * c, -1)  # Row (3i + j)·c + channel: the patches' order.
    return patches @ kernel + self.bias[...].astype(self.dtype)


class Stem(nnx.Module):
  """A p x p, stride-p convolution: NHWC images -> (N, H/p, W/p, width) features; kernel (p, p, in, width)."""

  def __init__(self, channels: int, width: int, patch: int, dtype, rngs: nnx.Rngs):
    self.dtype, self.patch = dtype, patch
    self.kernel = nnx.Param(KERNEL_INIT(rngs.params(), (patch, patch, channels, width)))
    self.bias = nnx.Param(jnp.zeros((width,)))

  def __call__(self, images: jax.Array) -> jax.Array:
    n, h, w, c = images.shape
    p = self.patch
    x = images.astype(self.dtype).reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, h // p, w // p, p * p * c)
    return x @ self.kernel[...].astype(self.dtype).reshape(p * p * c, -1) + self.bias[...].astype(self.dtype)


class ConvLayer(nnx.Module):
  """x + conv3x3(dropout(relu(GroupNorm(x)))); with `cond_dim`, FiLM-modulated and gated by the condition."""

  def __init__(self, cfg, dtype, rngs: nnx.Rngs, cond_dim: int | None = None):
    c = cfg.hidden_size
    self.dropout = cfg.dropout
    self.norm = group_norm(c, rngs)
    self.conv = Conv3x3(c, c, dtype, rngs)
    # Zero-initialised: shift, scale and gate start at 0, so the layer starts as the identity (adaLN-Zero).
    self.modulation = vit.dense(cond_dim, 3 * c, dtype, rngs, zero=True) if cond_dim else None

  def __call__(self, x: jax.Array, keys: vit.KeyStream, cond: jax.Array | None = None) -> jax.Array:
    h = self.norm(x).astype(x.dtype)
    if self.modulation is None:
      return x + self.conv(vit.dropout(jax.nn.relu(h), self.dropout, keys()))
    mod = self.modulation(jax.nn.silu(cond)).astype(x.dtype)[:, None, None, :]
    shift, scale, gate = jnp.split(mod, 3, axis=-1)
    h = jax.nn.relu(h * (1 + scale) + shift)
    return x + gate * self.conv(vit.dropout(h, self.dropout, keys()))


class Head(nnx.Module):
  """Pooled features -> FC(mlp_dim) + ReLU -> logits."""

  def __init__(self, width: int, mlp_dim: int, num_classes: int, dtype, rngs: nnx.Rngs, *, zero: bool):
    self.fc = vit.dense(width, mlp_dim, dtype, rngs)
    self.out = vit.dense(mlp_dim, num_classes, dtype, rngs, zero=zero)

  def __call__(self, h: jax.Array) -> jax.Array:
    return self.out(jax.nn.relu(self.fc(h))).astype(jnp.float32)


def pool(x: jax.Array) -> jax.Array:
  """Global average over the feature map, in fp32."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class CNN(nnx.Module):
  """End-to-end baseline: stem, L residual conv layers, global pooling, LayerNorm, FC head."""

  def __init__(self, cfg, *, image_size: int, channels: int, num_classes: int, rngs: nnx.Rngs,
               dtype=jnp.float32):
    del image_size  # Any size the stem's stride divides (config.validate_data checks it).
    c = cfg.hidden_size
    self.dtype = dtype
    self.stem = Stem(channels, c, cfg.patch_size, dtype, rngs)
    self.layers = blocks.Block([ConvLayer(cfg, dtype, rngs) for _ in range(cfg.num_layers)], remat=cfg.remat)
    self.norm = vit.layer_norm(c, cfg.layer_norm_eps, dtype, rngs)
    self.head = Head(c, cfg.mlp_dim, num_classes, dtype, rngs, zero=False)

  def features(self, images: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
    """The normalised pooled features the head reads (N, hidden): the feature space of the offline FD."""
    x = self.layers(self.stem(images.astype(self.dtype)), vit.KeyStream(key))
    return self.norm(pool(x))

  def __call__(self, images: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
    return self.head(self.features(images, key=key).astype(self.dtype))


class CNNParts(nnx.Module):
  """Everything outside the conv layers of a DiffusionBlocks CNN: stem, label table E, the condition (noise level
  and noisy label), the pooled features' norm and modulation, the head; and how a block's layers run between
  them (`__call__`, the `core.blocks` contract)."""

  def __init__(self, cfg, *, channels: int, num_classes: int, sigma_data: float, dtype, rngs: nnx.Rngs):
    c = cfg.hidden_size
    self.dtype, self.sigma_data = dtype, float(sigma_data)
    self.stem = Stem(channels, c, cfg.patch_size, dtype, rngs)
    self.label_embed = nnx.Param(vit.INIT(rngs.params(), (num_classes, c)))
    self.time_fc1 = vit.dense(TIME_FREQUENCY_DIM, c, dtype, rngs)
    self.time_fc2 = vit.dense(c, c, dtype, rngs)
    self.label_fc = vit.dense(c, c, dtype, rngs)  # NoProp's label path: the noisy label into the condition.
    self.norm = vit.layer_norm(c, cfg.layer_norm_eps, dtype, rngs)
    self.modulation = vit.dense(c, 2 * c, dtype, rngs, zero=True)
    self.head = Head(c, cfg.mlp_dim, num_classes, dtype, rngs, zero=True)  # Logits 0 at init.

  def condition(self, c_noise: jax.Array, z_in: jax.Array) -> jax.Array:
    """cond = time(c_noise) + FC(c_in·z_t): what every layer's FiLM reads (N, hidden)."""
    t = edm.timestep_embedding(c_noise, TIME_FREQUENCY_DIM).astype(self.dtype)
    return self.time_fc2(jax.nn.silu(self.time_fc1(t))) + self.label_fc(z_in.astype(self.dtype))

  def __call__(self, layers: blocks.Block, images: jax.Array, z_t: jax.Array, sigmas: jax.Array, *,
               key: jax.Array | None = None) -> jax.Array:
    """Logits of `layers` for NHWC images, noisy labels z_t (N, hidden) and σ (N,)."""
    c_skip, c_out, c_in, c_noise = edm.preconditioning(sigmas, self.sigma_data)
    cond = self.condition(c_noise, c_in[:, None] * z_t)
    x = layers(self.stem(images.astype(self.dtype)), vit.KeyStream(key), cond)
    h = self.norm(pool(x)).astype(jnp.float32)
    out = c_out[:, None] * h + c_skip[:, None] * z_t
    shift, scale = jnp.split(self.modulation(jax.nn.silu(cond)).astype(jnp.float32), 2, axis=-1)
    return self.head((out * (1 + scale) + shift).astype(self.dtype))


class DiffusionBlocksCNN(blocks.DiffusionBlocks):
  """The CNN's conv layers cut into B blocks; block b denoises the label embedding over its slice of σ."""

  def __init__(self, cfg, layer_counts, *, image_size: int, channels: int, num_classes: int, rngs: nnx.Rngs,
               sigma_data: float = 0.5, dtype=jnp.float32, stack: bool | None = None):
    del image_size  # Any size the stem's stride divides (config.validate_data checks it).
    c = cfg.hidden_size
    super().__init__(
        lambda r: ConvLayer(cfg, dtype, r, cond_dim=c), layer_counts,
        make_outer=lambda r: CNNParts(cfg, channels=channels, num_classes=num_classes, sigma_data=sigma_data,
                                      dtype=dtype, rngs=r),
        independent=cfg.independent_blocks, rngs=rngs, stack=stack, remat=cfg.remat, weight_tied=cfg.weight_tied)

  def label_embeddings(self, block=0) -> jax.Array:
    """The raw label table E (num_classes, hidden) that block `block` sees."""
    return self.outer(self.block(block)).label_embed[...]

  def denoise(self, images: jax.Array, z_t: jax.Array, sigmas: jax.Array, block, *,
              key: jax.Array | None = None) -> jax.Array:
    """Logits of block `block` (a Python int, or traced when blocks are stacked)."""
    return super().denoise(images, z_t, sigmas, block=block, key=key)
