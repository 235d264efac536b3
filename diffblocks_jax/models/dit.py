"""A class-conditional DiT inside EDM (paper §5.2, Table 2): the end-to-end model and its DiffusionBlocks form.

Parts as in DiT: patchify, fixed 2-D sine-cosine positions, adaLN-Zero layers conditioned on c = t_emb + y_emb
(the noise level's embedding plus the class's, with a null class for guidance), a final adaLN layer, unpatchify.
Around the network F sits EDM's preconditioning, so the model is the denoiser
    D(x; σ, y) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ), y).
`DiTParts` is everything outside the layers and runs a block's layers between them (`core.blocks` contract):
`DiT` calls it with every layer, `DiffusionBlocksDiT` with one block's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffblocks_jax.models import edm
from diffblocks_jax.core import blocks
from diffblocks_jax.models import vit

TIME_FREQUENCY_DIM = 256


def sincos_positions(grid: int, dim: int) -> np.ndarray:
  """(grid², dim) fixed 2-D sine-cosine position table: half the channels encode rows, half columns."""
  if dim % 4:
    raise ValueError(f'model.hidden_size={dim} must be divisible by 4 for 2-D sine-cosine positions')
  freqs = 1.0 / 10000**(np.arange(dim // 4, dtype=np.float64) / (dim // 4))
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing='ij')
  encode = lambda pos: np.concatenate([np.sin(np.outer(pos.ravel(), freqs)), np.cos(np.outer(pos.ravel(), freqs))],
                                      axis=1)
  return np.concatenate([encode(rows), encode(cols)], axis=1).astype(np.float32)


def plain_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm without its own scale and shift (adaLN supplies them), in fp32, eps 1e-6 as DiT."""
  return nnx.LayerNorm(dim, epsilon=1e-6, use_bias=False, use_scale=False, dtype=jnp.float32, rngs=rngs)


def modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


class DiTLayer(nnx.Module):
  """adaLN-Zero transformer layer: the condition sets shift, scale and gate of both branches; zero-initialised
  gates make every layer the identity at the start."""

  def __init__(self, cfg, dtype, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.norm1 = plain_norm(h, rngs)
    self.attn = vit.Attention(h, cfg.num_heads, 0.0, 0.0, dtype, rngs)
    self.norm2 = plain_norm(h, rngs)
    self.mlp = vit.Mlp(h, int(cfg.mlp_ratio * h), 0.0, dtype, rngs)
    self.modulation = vit.dense(h, 6 * h, dtype, rngs, zero=True)

  def __call__(self, x: jax.Array, keys: vit.KeyStream, cond: jax.Array) -> jax.Array:
    mod = self.modulation(jax.nn.silu(cond)).astype(x.dtype)  # SiLU before the linear, as DiT.
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
    x = x + gate1[:, None] * self.attn(modulate(self.norm1(x).astype(x.dtype), shift1, scale1), keys)
    return x + gate2[:, None] * self.mlp(modulate(self.norm2(x).astype(x.dtype), shift2, scale2), keys)


class DiTParts(nnx.Module):
  """Patch and position embedding, noise-level and class embedders, final adaLN layer; EDM preconditioning."""

  def __init__(self, cfg, *, image_size: int, channels: int, num_classes: int, sigma_data: float, dtype,
               rngs: nnx.Rngs):
    h, p = cfg.hidden_size, cfg.patch_size
    self.dtype, self.patch_size, self.channels, self.sigma_data = dtype, p, channels, float(sigma_data)
    self.grid = image_size // p
    self.num_classes = num_classes
    self.patch = vit.PatchEmbed(channels, h, p, dtype, rngs)
    self.time_fc1 = vit.dense(TIME_FREQUENCY_DIM, h, dtype, rngs)
    self.time_fc2 = vit.dense(h, h, dtype, rngs)
    # Row num_classes is the null class: the unconditional model of classifier-free guidance.
    self.class_embed = nnx.Param(vit.INIT(rngs.params(), (num_classes + 1, h)))
    self.final_norm = plain_norm(h, rngs)
    self.final_modulation = vit.dense(h, 2 * h, dtype, rngs, zero=True)
    self.final_linear = vit.dense(h, p * p * channels, dtype, rngs, zero=True)

  def condition(self, c_noise: jax.Array, labels: jax.Array) -> jax.Array:
    t = edm.timestep_embedding(c_noise, TIME_FREQUENCY_DIM).astype(self.dtype)
    t = self.time_fc2(jax.nn.silu(self.time_fc1(t)))
    return t + self.class_embed[...].astype(self.dtype)[labels]

  def unpatchify(self, x: jax.Array) -> jax.Array:
    n, g, p, c = x.shape[0], self.grid, self.patch_size, self.channels
    x = x.reshape(n, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, g * p, g * p, c)

  def __call__(self, layers: blocks.Block, labels: jax.Array, x_t: jax.Array, sigmas: jax.Array, *,
               key: jax.Array | None = None) -> jax.Array:
    """D(x_t; σ, labels) for NHWC noisy images x_t, σ (N,) and int labels (N,) (num_classes = null class)."""
    keys = vit.KeyStream(key)
    c_skip, c_out, c_in, c_noise = edm.preconditioning(sigmas, self.sigma_data)
    expand = lambda c: c.reshape(-1, 1, 1, 1)
    tokens = self.patch((expand(c_in) * x_t).astype(self.dtype))
    tokens = tokens + jnp.asarray(sincos_positions(self.grid, tokens.shape[-1]), tokens.dtype)
    cond = self.condition(c_noise, labels)
    tokens = layers(tokens, keys, cond)
    shift, scale = jnp.split(self.final_modulation(jax.nn.silu(cond)).astype(jnp.float32), 2, axis=-1)
    out = self.final_linear(modulate(self.final_norm(tokens), shift, scale).astype(self.dtype))
    return expand(c_skip) * x_t + expand(c_out) * self.unpatchify(out.astype(jnp.float32))


def _parts(cfg, image_size, channels, num_classes, sigma_data, dtype):
  if (image_size // cfg.patch_size) * cfg.patch_size != image_size:
    raise ValueError(f'image size {image_size} is not divisible by model.patch_size={cfg.patch_size}')
  return lambda r: DiTParts(cfg, image_size=image_size, channels=channels, num_classes=num_classes,
                            sigma_data=sigma_data, dtype=dtype, rngs=r)


class DiT(nnx.Module):
  """End-to-end baseline: every layer denoises every noise level."""

  num_blocks = 1

  def __init__(self, cfg, *, image_size: int, channels: int, num_classes: int, rngs: nnx.Rngs,
               sigma_data: float = 0.5, dtype=jnp.float32):
    self.parts = _parts(cfg, image_size, channels, num_classes, sigma_data, dtype)(rngs)
    self.layers = blocks.Block([DiTLayer(cfg, dtype, rngs) for _ in range(cfg.num_layers)], remat=cfg.remat)

  def denoise(self, labels, x_t, sigmas, block=None, *, key: jax.Array | None = None) -> jax.Array:
    del block  # One block: all layers.
    return self.parts(self.layers, labels, x_t, sigmas, key=key)

  def __call__(self, labels, x_t, sigmas, *, key: jax.Array | None = None) -> jax.Array:
    return self.denoise(labels, x_t, sigmas, key=key)


class DiffusionBlocksDiT(blocks.DiffusionBlocks):
  """The DiT's layers cut into B blocks; block b denoises its slice of σ (high noise → block 0)."""

  def __init__(self, cfg, layer_counts, *, image_size: int, channels: int, num_classes: int, rngs: nnx.Rngs,
               sigma_data: float = 0.5, dtype=jnp.float32, stack: bool | None = None):
    super().__init__(lambda r: DiTLayer(cfg, dtype, r), layer_counts,
                     make_outer=_parts(cfg, image_size, channels, num_classes, sigma_data, dtype),
                     independent=cfg.independent_blocks, rngs=rngs, stack=stack, remat=cfg.remat,
                     weight_tied=cfg.weight_tied)

  def denoise(self, labels, x_t, sigmas, block, *, key: jax.Array | None = None) -> jax.Array:
    return super().denoise(labels, x_t, sigmas, block=block, key=key)
