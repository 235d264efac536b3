"""The DiffusionBlocks model: a time-conditioned ViT whose layers are cut into B blocks (SPEC §3).

Parameter tree (`nnx.split` → pure dict):
  shared blocks   {'shared': {...}, 'blocks': {b: {'layers': {...}}}}          (release default)
  independent     {'blocks': {b: {'layers': {...}, 'shared': {...}}}}          (`independent_blocks`)
`denoise(..., block=b)` reads only the shared parts and block b, so a step on block b never touches the
other blocks' parameters and never builds their activations.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from diffblocks_jax import diffusion
from diffblocks_jax.models import vit

TIME_FREQUENCY_DIM = 256


def partition_layers(num_layers: int, num_blocks: int, layers_per_block: Sequence[int] = ()) -> list[int]:
  """Layer counts per block; an explicit list must cover the depth exactly (the release drops layers)."""
  if layers_per_block:
    counts = [int(n) for n in layers_per_block]
    if len(counts) != num_blocks or sum(counts) != num_layers or min(counts) < 1:
      raise ValueError(f'model.layers_per_block={tuple(counts)} must have model.num_blocks={num_blocks} '
                       f'positive entries summing to model.num_layers={num_layers}')
    return counts
  if num_blocks < 1 or num_layers % num_blocks:
    raise ValueError(f'model.num_layers={num_layers} is not divisible by model.num_blocks={num_blocks}; '
                     'set model.layers_per_block to an explicit uneven partition, e.g. (5, 4, 3)')
  return [num_layers // num_blocks] * num_blocks


class SharedParts(nnx.Module):
  """Everything outside the layers: embeddings, label table E, time embedder, output head."""

  def __init__(self, cfg, *, image_size: int, channels: int, num_classes: int, dtype, rngs: nnx.Rngs):
    h = cfg.hidden_size
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
    t = diffusion.timestep_embedding(c_noise, TIME_FREQUENCY_DIM).astype(self.time_fc1.dtype)
    return jax.nn.silu(self.time_fc2(jax.nn.silu(self.time_fc1(t))))


class Block(nnx.Module):
  """A contiguous run of adaLN layers; owns a copy of the shared parts when blocks are independent."""

  def __init__(self, cfg, num_layers: int, cond_dim: int, dtype, rngs: nnx.Rngs, shared=None):
    self.layers = nnx.List([vit.Layer(cfg, dtype, rngs, cond_dim=cond_dim) for _ in range(num_layers)])
    self.shared = shared


class DiffusionBlocksViT(nnx.Module):
  """B blocks that each denoise the label embedding over one slice of noise levels (SPEC §3)."""

  def __init__(self, cfg, *, image_size: int, channels: int, num_classes: int, rngs: nnx.Rngs,
               dtype=jnp.float32):
    if cfg.label_token not in ('replace', 'concat'):
      raise ValueError(f"model.label_token must be 'replace' or 'concat', got {cfg.label_token!r}")
    self.dtype, self.dropout, self.label_token = dtype, cfg.dropout, cfg.label_token
    self.layer_counts = partition_layers(cfg.num_layers, cfg.num_blocks, cfg.layers_per_block)
    make_shared = lambda r: SharedParts(cfg, image_size=image_size, channels=channels,
                                        num_classes=num_classes, dtype=dtype, rngs=r)
    cond_dim = cfg.hidden_size // 6
    if cfg.independent_blocks:
      # Every copy starts from the same draw, so all blocks begin in one label-embedding space.
      self.shared = None
      shared_key = rngs.params()
      copies = [make_shared(nnx.Rngs(params=shared_key)) for _ in self.layer_counts]
    else:
      self.shared = make_shared(rngs)
      copies = [None] * len(self.layer_counts)
    self.blocks = nnx.List([Block(cfg, n, cond_dim, dtype, rngs, shared=s)
                            for n, s in zip(self.layer_counts, copies)])

  @property
  def num_blocks(self) -> int:
    return len(self.layer_counts)

  def shared_parts(self, block: int) -> SharedParts:
    return self.shared if self.shared is not None else self.blocks[block].shared

  def label_embeddings(self, block: int = 0) -> jax.Array:
    """The raw label table E (num_classes, hidden) that block `block` sees."""
    return self.shared_parts(block).label_embed[...]

  def denoise(self, images: jax.Array, z_t: jax.Array, sigmas: jax.Array, block: int, *,
              key: jax.Array | None = None) -> jax.Array:
    """Logits of block `block` (a Python int) for NHWC images, noisy labels z_t (N, hidden), σ (N,)."""
    shared, keys = self.shared_parts(block), vit.KeyStream(key)
    c_skip, c_out, c_in, c_noise = diffusion.preconditioning(sigmas)
    x = shared.patch(images.astype(self.dtype))
    label_token = (c_in[:, None] * z_t)[:, None, :].astype(x.dtype)
    if self.label_token == 'replace':
      x = jnp.concatenate([label_token, x], axis=1)  # The noisy label takes the CLS slot (release).
    else:
      cls = jnp.broadcast_to(shared.cls_token[...], label_token.shape).astype(x.dtype)
      x = jnp.concatenate([cls, x, label_token], axis=1)
    x = vit.dropout(x + shared.pos_embed[...].astype(x.dtype), self.dropout, keys())
    cond = shared.condition(c_noise)
    for layer in self.blocks[block].layers:
      x = layer(x, keys, cond)
    h = shared.norm(x)[:, 0].astype(jnp.float32)
    out = c_out[:, None] * h + c_skip[:, None] * z_t
    shift, scale = jnp.split(jax.nn.silu(shared.modulation(cond)).astype(jnp.float32), 2, axis=-1)
    out = out * (1 + scale) + shift
    return shared.head(out.astype(self.dtype)).astype(jnp.float32)

