"""The DiffusionBlocks model: a time-conditioned ViT whose layers are cut into B blocks (SPEC §3).

Built on the generic wrapper `core.blocks.DiffusionBlocks`: the adaLN ViT layers are its layers, `SharedParts`
(patch and label embeddings, time embedder, final norm, modulation, head) its outer parts. Parameter tree:
see `core/blocks.py` (blocks of equal depth are stacked on a leading block axis).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from diffblocks_jax.models import edm
from diffblocks_jax.core import blocks
from diffblocks_jax.models import vit

TIME_FREQUENCY_DIM = 256


def partition_layers(num_layers: int, num_blocks: int, layers_per_block: Sequence[int] = ()) -> list[int]:
  """Layer counts per block: `layers_per_block`, or `num_layers / num_blocks` each (SPEC §3).

  The rules for these fields, and the messages naming them, live in `config.validate`, which every entry point
  runs before loading data. A model built without it still refuses anything that is not a partition of the
  depth into `num_blocks` non-empty blocks (the release silently drops the leftover layers).
  """
  counts = [int(n) for n in layers_per_block] or (
      [num_layers // num_blocks] * num_blocks if num_blocks >= 1 else [])
  if len(counts) != num_blocks or sum(counts) != num_layers or min(counts, default=0) < 1:
    raise ValueError(f'model.num_layers={num_layers} cannot be cut into model.num_blocks={num_blocks} blocks as '
                     f'model.layers_per_block={tuple(layers_per_block)} says; config.validate(config) names the '
                     'rule that is broken')
  return counts


class SharedParts(nnx.Module):
  """Everything outside the layers: embeddings, label table E, time embedder, output head; and how a block's
  layers run between them (`__call__`)."""

  def __init__(self, cfg, *, image_size: int, channels: int, num_classes: int, dtype, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.dtype, self.dropout, self.label_token = dtype, cfg.dropout, cfg.label_token
    self.cond_dim = h // 6
    self.patch = vit.PatchEmbed(channels, h, cfg.patch_size, dtype, rngs)
    num_tokens = (image_size // cfg.patch_size)**2 + 1
    # 'concat' keeps a CLS token (read out at position 0) and appends the label token at the end.
    self.cls_token = nnx.Param(vit.INIT(rngs.params(), (1, 1, h))) if cfg.label_token == 'concat' else None
    num_tokens += cfg.label_token == 'concat'
    self.pos_embed = nnx.Param(vit.INIT(rngs.params(), (1, num_tokens, h)))
    self.label_embed = nnx.Param(vit.INIT(rngs.params(), (num_classes, h)))
    self.time_fc1 = vit.dense(TIME_FREQUENCY_DIM, self.cond_dim, dtype, rngs)
    self.time_fc2 = vit.dense(self.cond_dim, self.cond_dim, dtype, rngs)
    self.norm = vit.layer_norm(h, cfg.layer_norm_eps, dtype, rngs)
    self.modulation = vit.dense(self.cond_dim, 2 * h, dtype, rngs, zero=True)
    self.head = vit.dense(h, num_classes, dtype, rngs, zero=True)

  def condition(self, c_noise: jax.Array) -> jax.Array:
    t = edm.timestep_embedding(c_noise, TIME_FREQUENCY_DIM).astype(self.time_fc1.dtype)
    return jax.nn.silu(self.time_fc2(jax.nn.silu(self.time_fc1(t))))

  def __call__(self, layers: blocks.Block, images: jax.Array, z_t: jax.Array, sigmas: jax.Array, *,
               key: jax.Array | None = None) -> jax.Array:
    """Logits of `layers` for NHWC images, noisy labels z_t (N, hidden) and σ (N,) (SPEC §3)."""
    keys = vit.KeyStream(key)
    c_skip, c_out, c_in, c_noise = edm.preconditioning(sigmas)
    x = self.patch(images.astype(self.dtype))
    label_token = (c_in[:, None] * z_t)[:, None, :].astype(x.dtype)
    if self.label_token == 'replace':
      x = jnp.concatenate([label_token, x], axis=1)  # The noisy label takes the CLS slot (release).
    else:
      cls = jnp.broadcast_to(self.cls_token[...], label_token.shape).astype(x.dtype)
      x = jnp.concatenate([cls, x, label_token], axis=1)
    x = vit.dropout(x + self.pos_embed[...].astype(x.dtype), self.dropout, keys())
    cond = self.condition(c_noise)
    x = layers(x, keys, cond)
    h = self.norm(x)[:, 0].astype(jnp.float32)
    out = c_out[:, None] * h + c_skip[:, None] * z_t
    shift, scale = jnp.split(jax.nn.silu(self.modulation(cond)).astype(jnp.float32), 2, axis=-1)
    out = out * (1 + scale) + shift
    return self.head(out.astype(self.dtype)).astype(jnp.float32)


class DiffusionBlocksViT(blocks.DiffusionBlocks):
  """B blocks of adaLN ViT layers that each denoise the label embedding over one slice of noise (SPEC §3)."""

  def __init__(self, cfg, *, image_size: int, channels: int, num_classes: int, rngs: nnx.Rngs,
               dtype=jnp.float32, stack: bool | None = None):
    if cfg.label_token not in ('replace', 'concat'):
      raise ValueError(f"model.label_token must be 'replace' or 'concat', got {cfg.label_token!r}")
    cond_dim = cfg.hidden_size // 6
    super().__init__(
        lambda r: vit.Layer(cfg, dtype, r, cond_dim=cond_dim),
        partition_layers(cfg.num_layers, cfg.num_blocks, cfg.layers_per_block),
        make_outer=lambda r: SharedParts(cfg, image_size=image_size, channels=channels, num_classes=num_classes,
                                         dtype=dtype, rngs=r),
        independent=cfg.independent_blocks, rngs=rngs, stack=stack, remat=cfg.remat, weight_tied=cfg.weight_tied)

  def shared_parts(self, block) -> SharedParts:
    return self.outer(self.block(block))

  def label_embeddings(self, block=0) -> jax.Array:
    """The raw label table E (num_classes, hidden) that block `block` sees."""
    return self.shared_parts(block).label_embed[...]

  def denoise(self, images: jax.Array, z_t: jax.Array, sigmas: jax.Array, block, *,
              key: jax.Array | None = None) -> jax.Array:
    """Logits of block `block` (a Python int, or traced when blocks are stacked)."""
    return super().denoise(images, z_t, sigmas, block=block, key=key)
