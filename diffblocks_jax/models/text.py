"""Language models: a masked diffusion DiT and a Llama-style autoregressive LM, each end to end and as DiffusionBlocks.

Masked diffusion (absorbing state): tokens 0..V-1, mask id V. `MaskedDiTParts` embeds x_t, conditions
bidirectional Llama layers (rotary positions, adaLN-Zero as DiT's) on the masking time t and reads logits over the
V real tokens.

Autoregressive: `ARLM` is a plain causal Llama (RMSNorm, SwiGLU, rotary, no biases by default; the Llama family's
options for imported checkpoints, models/pretrained.py: grouped-query attention, rotary theta and scaling, q/k/v
biases, tied embeddings, a vocabulary's own BOS id). Its DiffusionBlocks form
diffuses, at every position i, the L2-normalised embedding of token x_i (EDM) given the clean prefix x_{<i}: the
sequence is [clean x_0..x_{L-1} | noisy z_0..z_{L-1}] under the Block Diffusion mask with block size 1, so one
pass denoises all L next tokens at once, each seeing only its own prefix.

As in `dit.py`, the `*Parts` classes are everything outside the layers (`core.blocks` contract): the end-to-end
models call them with every layer, the DiffusionBlocks ones with one block's layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffblocks_jax.models import edm
from diffblocks_jax.core import blocks
from diffblocks_jax.models import dit, vit

TIME_FREQUENCY_DIM = 256


# ------------------------------------------------------------------ masks and positions

def causal_mask(seq_len: int) -> np.ndarray:
  """(L, L) bool, True = may attend: position i sees j <= i."""
  return np.tril(np.ones((seq_len, seq_len), bool))


def block_diffusion_mask(seq_len: int) -> np.ndarray:
  """(2L, 2L) bool over [clean x_0..x_{L-1} | noisy z_0..z_{L-1}], block size 1 (Block Diffusion's mask).

  Clean i sees clean j <= i (a causal LM over the clean half); noisy slot i sees the clean prefix j < i and
  itself, so it denoises x_i from x_{<i} alone; clean tokens never see noisy slots, so the prefix a slot reads
  is the same whatever the other slots hold.
  """
  clean = causal_mask(seq_len)
  noisy = np.concatenate([np.tril(clean, -1), np.eye(seq_len, dtype=bool)], axis=1)
  return np.concatenate([np.concatenate([clean, np.zeros_like(clean)], axis=1), noisy], axis=0)


ROPE_SCALINGS = ('', 'linear', 'llama3')  # model.rope_scaling: Hugging Face's rope_type values we follow.


def rope_settings(cfg) -> tuple:
  """(theta, scaling, factor, low_freq_factor, high_freq_factor, original_max_positions) of a model config: static
  numbers, so the frequencies are constants of the compiled program."""
  return (float(cfg.rope_theta), cfg.rope_scaling, float(cfg.rope_factor), float(cfg.rope_low_freq_factor),
          float(cfg.rope_high_freq_factor), float(cfg.rope_original_max_positions))


def rope_frequencies(head_dim: int, theta: float = 10000.0, scaling: str = '', factor: float = 1.0,
                     low: float = 1.0, high: float = 4.0, original: float = 8192.0) -> jax.Array:
  """(head_dim / 2,) fp32 rotary frequencies θ^(-k/half), rescaled as Hugging Face's rope types do: 'linear'
  divides all by the factor; 'llama3' divides the long wavelengths (> original / low), keeps the short ones
  (< original / high) and blends in between."""
  half = head_dim // 2
  freqs = theta**(-jnp.arange(half, dtype=jnp.float32) / half)
  if scaling == 'linear':
    return freqs / factor
  if scaling == 'llama3':
    wavelength = 2 * np.pi / freqs
    scaled = jnp.where(wavelength > original / low, freqs / factor, freqs)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= original / high) & (wavelength <= original / low)
    return jnp.where(medium, blended, scaled)
  if scaling:
    raise ValueError(f'model.rope_scaling={scaling!r} is not one of {ROPE_SCALINGS}')
  return freqs


def rotary(x: jax.Array, positions: jax.Array, base: float = 10000.0, freqs: jax.Array | None = None) -> jax.Array:
  """x (N, T, heads, D) rotated by its positions (T,) or (N, T): channel pairs (k, k + D/2), in fp32; `freqs`
  (D/2,) as `rope_frequencies` gives them, or base^(-k/half)."""
  half = x.shape[-1] // 2
  if freqs is None:
    freqs = base**(-jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.asarray(positions, jnp.float32)[..., None] * freqs
  cos, sin = jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]  # A head axis to broadcast over.
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# ------------------------------------------------------------------ Llama layer

class RMSNorm(nnx.Module):
  """x / rms(x) in fp32, times a learned scale; `scale=False` when adaLN supplies scale and shift."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, scale: bool = True, eps: float = 1e-6):
    del rngs  # The scale starts at one: nothing to draw.
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32)) if scale else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return x if self.scale is None else x * self.scale[...]


def linear(din: int, dout: int, dtype, rngs: nnx.Rngs, *, zero: bool = False, bias: bool = False) -> nnx.Linear:
  return nnx.Linear(din, dout, use_bias=bias, kernel_init=vit.ZEROS if zero else vit.INIT, bias_init=vit.ZEROS,
                    dtype=dtype, rngs=rngs)


class RotaryAttention(nnx.Module):
  """Multi-head attention, rotary positions on q and k, and a boolean mask (True = may attend). The Llama family's
  options (`cfg`, None = the defaults): `num_kv_heads` < heads shares each key/value head among heads / kv_heads
  query heads (grouped-query attention, head h reads kv head h // group as Hugging Face's repeat_kv);
  `attention_bias` biases q, k, v (Qwen2), `attention_out_bias` the output too (Llama's attention_bias)."""

  def __init__(self, hidden: int, heads: int, dtype, rngs: nnx.Rngs, cfg=None):
    if hidden % heads or (hidden // heads) % 2:
      raise ValueError(f'model.hidden_size={hidden} / model.num_heads={heads} must be an even head width (rotary)')
    kv_heads = (cfg.num_kv_heads if cfg is not None else 0) or heads
    if heads % kv_heads:
      raise ValueError(f'model.num_heads={heads} is not a multiple of model.num_kv_heads={kv_heads}')
    qkv_bias = bool(cfg is not None and cfg.attention_bias)
    out_bias = bool(cfg is not None and cfg.attention_out_bias)
    self.heads, self.kv_heads = heads, kv_heads
    # None: the original frequencies, computed as they always were (existing runs stay bit for bit).
    self.rope = rope_settings(cfg) if cfg is not None and (cfg.rope_scaling or cfg.rope_theta != 10000.0) else None
    kv = kv_heads * (hidden // heads)
    self.query = linear(hidden, hidden, dtype, rngs, bias=qkv_bias)
    self.key = linear(hidden, kv, dtype, rngs, bias=qkv_bias)
    self.value = linear(hidden, kv, dtype, rngs, bias=qkv_bias)
    self.out = linear(hidden, hidden, dtype, rngs, bias=out_bias)

  def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array) -> jax.Array:
    n, t, d = x.shape
    width = d // self.heads
    split = lambda y: y.reshape(n, t, -1, width)
    freqs = None if self.rope is None else rope_frequencies(width, *self.rope)
    q = rotary(split(self.query(x)), positions, freqs=freqs)
    k, v = rotary(split(self.key(x)), positions, freqs=freqs), split(self.value(x))
    if self.kv_heads != self.heads:
      k, v = (jnp.repeat(y, self.heads // self.kv_heads, axis=2) for y in (k, v))
    logits = jnp.einsum('nqhd,nkhd->nhqk', q, k).astype(jnp.float32) / float(np.sqrt(width))
    mask = mask if mask.ndim == 2 else mask[:, None]  # (T, T) for all, or (N, T, T) per sequence.
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)  # Every row keeps its own diagonal.
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return self.out(jnp.einsum('nhqk,nkhd->nqhd', probs, v).reshape(n, t, d))


def mlp_width(cfg) -> int:
  """The SwiGLU width: model.mlp_width, or mlp_ratio × hidden when it is 0."""
  return cfg.mlp_width or int(cfg.mlp_ratio * cfg.hidden_size)


class SwiGLU(nnx.Module):
  def __init__(self, hidden: int, width: int, dtype, rngs: nnx.Rngs):
    self.gate, self.up = linear(hidden, width, dtype, rngs), linear(hidden, width, dtype, rngs)
    self.down = linear(width, hidden, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class LlamaLayer(nnx.Module):
  """Pre-norm attention and SwiGLU with residual dropout. `conditioned`: adaLN-Zero as `dit.DiTLayer` (SiLU(cond)
  → zero-initialised shift, scale, gate of both branches; scale-free norms), so the layer starts as the identity."""

  def __init__(self, cfg, dtype, rngs: nnx.Rngs, *, conditioned: bool):
    h = cfg.hidden_size
    self.dropout = cfg.dropout
    self.norm1 = RMSNorm(h, rngs=rngs, scale=not conditioned, eps=cfg.norm_eps)
    self.attn = RotaryAttention(h, cfg.num_heads, dtype, rngs, cfg)
    self.norm2 = RMSNorm(h, rngs=rngs, scale=not conditioned, eps=cfg.norm_eps)
    self.mlp = SwiGLU(h, mlp_width(cfg), dtype, rngs)
    self.modulation = vit.dense(h, 6 * h, dtype, rngs, zero=True) if conditioned else None

  def __call__(self, x: jax.Array, keys: vit.KeyStream, cond: jax.Array | None, *, mask: jax.Array,
               positions: jax.Array) -> jax.Array:
    if self.modulation is None:
      x = x + vit.dropout(self.attn(self.norm1(x).astype(x.dtype), mask, positions), self.dropout, keys())
      return x + vit.dropout(self.mlp(self.norm2(x).astype(x.dtype)), self.dropout, keys())
    mod = self.modulation(jax.nn.silu(cond)).astype(x.dtype)
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
    a = self.attn(dit.modulate(self.norm1(x).astype(x.dtype), shift1, scale1), mask, positions)
    x = x + gate1[:, None] * vit.dropout(a, self.dropout, keys())
    m = self.mlp(dit.modulate(self.norm2(x).astype(x.dtype), shift2, scale2))
    return x + gate2[:, None] * vit.dropout(m, self.dropout, keys())


# ------------------------------------------------------------------ outer parts

class TimeEmbedder(nnx.Module):
  """c = MLP(sincos(level)): the condition every adaLN layer reads (DiT's timestep embedder)."""

  def __init__(self, hidden: int, dtype, rngs: nnx.Rngs):
    self.fc1 = vit.dense(TIME_FREQUENCY_DIM, hidden, dtype, rngs)
    self.fc2 = vit.dense(hidden, hidden, dtype, rngs)

  def __call__(self, level: jax.Array) -> jax.Array:
    t = edm.timestep_embedding(level, TIME_FREQUENCY_DIM).astype(self.fc1.dtype)
    return self.fc2(jax.nn.silu(self.fc1(t)))


def _check_length(length: int, seq_len: int):
  if length > seq_len:
    raise ValueError(f'a sequence of {length} tokens is longer than the model\'s seq_len={seq_len}')


class MaskedDiTParts(nnx.Module):
  """Token (+[MASK]) embedding, time embedder, final adaLN layer and head over V tokens. Positions are rotary,
  in the layers (as MDLM's DiT): with learned absolute positions a bidirectional model learned no context at all
  in 300 steps on the CPython text (masked cross-entropy stuck at the unigram entropy), with rotary it did."""

  def __init__(self, cfg, *, vocab_size: int, seq_len: int, dtype, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.dtype, self.dropout, self.vocab_size, self.seq_len = dtype, cfg.dropout, vocab_size, seq_len
    self.token_embed = nnx.Param(vit.INIT(rngs.params(), (vocab_size + 1, h)))  # Row V: the [MASK] token.
    self.time = TimeEmbedder(h, dtype, rngs)
    self.final_norm = dit.plain_norm(h, rngs)
    self.final_modulation = vit.dense(h, 2 * h, dtype, rngs, zero=True)
    # Zero as DiT's final layer: uniform logits (loss log V) at the start. The mask id is never predicted.
    self.head = vit.dense(h, vocab_size, dtype, rngs, zero=True)

  def __call__(self, layers: blocks.Block, x_t: jax.Array, t: jax.Array, *,
               key: jax.Array | None = None) -> jax.Array:
    """Logits (N, L, V) fp32 of x_0 for int x_t (N, L) (V = masked) at masking times t (N,) in [0, 1]."""
    keys = vit.KeyStream(key)
    length = x_t.shape[1]
    _check_length(length, self.seq_len)
    x = vit.dropout(self.token_embed[...][x_t].astype(self.dtype), self.dropout, keys())
    cond = self.time(1000.0 * jnp.asarray(t, jnp.float32))  # DiT's integer-step scale for t in [0, 1].
    x = layers(x, keys, cond, mask=jnp.ones((length, length), jnp.bool_), positions=jnp.arange(length))
    shift, scale = jnp.split(self.final_modulation(jax.nn.silu(cond)).astype(jnp.float32), 2, axis=-1)
    return self.head(dit.modulate(self.final_norm(x), shift, scale).astype(self.dtype)).astype(jnp.float32)


def tied_logits(x: jax.Array, table: jax.Array, dtype) -> jax.Array:
  """Logits x · Eᵀ over the rows of `table` (tied input and output embeddings)."""
  return jnp.einsum('...h,vh->...v', x.astype(dtype), table.astype(dtype))


class ARParts(nnx.Module):
  """Plain causal LM: embeddings (+BOS), causal mask, final RMSNorm and head. The BOS token is an extra row V
  (`model.bos_token` = -1) or a vocabulary's own id (an imported checkpoint's `bos_token_id`, V rows); with
  `model.tie_embeddings` the head is the embedding table's first V rows."""

  def __init__(self, cfg, *, vocab_size: int, seq_len: int, dtype, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.dtype, self.dropout, self.vocab_size, self.seq_len = dtype, cfg.dropout, vocab_size, seq_len
    if cfg.bos_token >= vocab_size:
      raise ValueError(f'model.bos_token={cfg.bos_token} is not a token of the vocabulary of {vocab_size}')
    self.bos = vocab_size if cfg.bos_token < 0 else int(cfg.bos_token)
    rows = vocab_size + (cfg.bos_token < 0)
    self.token_embed = nnx.Param(vit.INIT(rngs.params(), (rows, h)))  # Row V: BOS, unless the vocabulary has one.
    self.norm = RMSNorm(h, rngs=rngs, eps=cfg.norm_eps)
    self.head = None if cfg.tie_embeddings else linear(h, vocab_size, dtype, rngs)

  def __call__(self, layers: blocks.Block, tokens: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
    """Logits (N, L, V) fp32; position i is the distribution of x_i given x_{<i} (input [BOS, x_0..x_{L-2}])."""
    keys = vit.KeyStream(key)
    n, length = tokens.shape
    _check_length(length, self.seq_len)
    inputs = jnp.concatenate([jnp.full((n, 1), self.bos, tokens.dtype), tokens[:, :-1]], axis=1)
    x = vit.dropout(self.token_embed[...][inputs].astype(self.dtype), self.dropout, keys())
    x = layers(x, keys, None, mask=jnp.asarray(causal_mask(length)), positions=jnp.arange(length))
    x = self.norm(x).astype(self.dtype)
    if self.head is None:
      return tied_logits(x, self.token_embed[...][:self.vocab_size], self.dtype).astype(jnp.float32)
    return self.head(x).astype(jnp.float32)


class ARDiffusionParts(nnx.Module):
  """Clean-token embedding (also the diffused space, L2-normalised rows), noisy-slot in-projection, EDM time
  embedder, the [clean | noisy] layout under the Block Diffusion mask, final adaLN layer and head (the embedding
  table itself with `model.tie_embeddings`)."""

  def __init__(self, cfg, *, vocab_size: int, seq_len: int, sigma_data: float, dtype, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.dtype, self.dropout, self.vocab_size, self.seq_len = dtype, cfg.dropout, vocab_size, seq_len
    self.sigma_data = float(sigma_data)
    self.token_embed = nnx.Param(vit.INIT(rngs.params(), (vocab_size, h)))
    self.in_proj = linear(h, h, dtype, rngs)
    self.time = TimeEmbedder(h, dtype, rngs)
    self.final_norm = RMSNorm(h, rngs=rngs, scale=False, eps=cfg.norm_eps)
    self.final_modulation = vit.dense(h, 2 * h, dtype, rngs, zero=True)
    # Zero as DiT's final layer: uniform at the start.
    self.head = None if cfg.tie_embeddings else linear(h, vocab_size, dtype, rngs, zero=True)

  def embedding_table(self) -> jax.Array:
    """The raw rows (V, hidden); the diffusion target of token v is row v over its L2 norm."""
    return self.token_embed[...]

  def _head(self, x: jax.Array) -> jax.Array:
    if self.head is None:
      return tied_logits(x, self.token_embed[...], self.dtype).astype(jnp.float32)
    return self.head(x.astype(self.dtype)).astype(jnp.float32)

  def __call__(self, layers: blocks.Block, tokens: jax.Array, z_t: jax.Array, sigmas: jax.Array, *,
               key: jax.Array | None = None, clean: bool = False):
    """Logits (N, L, V) fp32: slot i's denoised distribution of x_i given x_{<i} and z_t[:, i] at σ (N,).
    `clean`: also the clean half's logits (N, L, V), position i's next-token distribution of x_{i+1} (the clean
    path of `diffusion.clean_ce_weight`), through the same final layer and head."""
    keys = vit.KeyStream(key)
    length = tokens.shape[1]
    _check_length(length, self.seq_len)
    _, _, c_in, c_noise = edm.preconditioning(sigmas, self.sigma_data)
    clean_x = self.token_embed[...][tokens].astype(self.dtype)
    noisy = self.in_proj((c_in[:, None, None] * z_t).astype(self.dtype))
    x = vit.dropout(jnp.concatenate([clean_x, noisy], axis=1), self.dropout, keys())
    cond = self.time(c_noise)  # One σ per sequence conditions every position, clean ones included.
    positions = jnp.tile(jnp.arange(length), 2)  # Noisy slot i sits at the position of the x_i it denoises.
    x = layers(x, keys, cond, mask=jnp.asarray(block_diffusion_mask(length)), positions=positions)
    shift, scale = jnp.split(self.final_modulation(jax.nn.silu(cond)).astype(jnp.float32), 2, axis=-1)
    logits = self._head(dit.modulate(self.final_norm(x[:, length:]), shift, scale))
    if not clean:
      return logits
    return logits, self._head(dit.modulate(self.final_norm(x[:, :length]), shift, scale))


# ------------------------------------------------------------------ models

def _masked_parts(cfg, vocab_size, seq_len, dtype):
  return lambda r: MaskedDiTParts(cfg, vocab_size=vocab_size, seq_len=seq_len, dtype=dtype, rngs=r)


def _ar_diffusion_parts(cfg, vocab_size, seq_len, sigma_data, dtype):
  return lambda r: ARDiffusionParts(cfg, vocab_size=vocab_size, seq_len=seq_len, sigma_data=sigma_data,
                                    dtype=dtype, rngs=r)


def _llama(cfg, dtype, conditioned):
  return lambda r: LlamaLayer(cfg, dtype, r, conditioned=conditioned)


# The end-to-end models draw their parts, then their layers, from one Rngs: the draw order of
# `blocks.DiffusionBlocks`, so that a one-block DiffusionBlocks model of a seed holds the same numbers.

class MaskedDiT(nnx.Module):
  """End-to-end masked diffusion LM: every layer denoises every masking time."""

  num_blocks = 1

  def __init__(self, cfg, *, vocab_size: int, seq_len: int, rngs: nnx.Rngs, dtype=jnp.float32):
    self.parts = _masked_parts(cfg, vocab_size, seq_len, dtype)(rngs)
    self.layers = blocks.Block([_llama(cfg, dtype, True)(rngs) for _ in range(cfg.num_layers)], remat=cfg.remat)

  def denoise(self, x_t, t, block=None, *, key: jax.Array | None = None) -> jax.Array:
    del block  # One block: all layers.
    return self.parts(self.layers, x_t, t, key=key)

  def __call__(self, x_t, t, *, key: jax.Array | None = None) -> jax.Array:
    return self.denoise(x_t, t, key=key)


class DiffusionBlocksMaskedDiT(blocks.DiffusionBlocks):
  """The masked DiT's layers cut into B blocks; block b denoises its slice of t (most masked → block 0)."""

  def __init__(self, cfg, layer_counts, *, vocab_size: int, seq_len: int, rngs: nnx.Rngs, dtype=jnp.float32,
               stack: bool | None = None):
    super().__init__(_llama(cfg, dtype, True), layer_counts,
                     make_outer=_masked_parts(cfg, vocab_size, seq_len, dtype),
                     independent=cfg.independent_blocks, rngs=rngs, stack=stack, remat=cfg.remat,
                     weight_tied=cfg.weight_tied)

  def denoise(self, x_t, t, block, *, key: jax.Array | None = None) -> jax.Array:
    return super().denoise(x_t, t, block=block, key=key)


class ARLM(nnx.Module):
  """End-to-end causal Llama-style LM (next-token prediction)."""

  num_blocks = 1

  def __init__(self, cfg, *, vocab_size: int, seq_len: int, rngs: nnx.Rngs, dtype=jnp.float32):
    self.parts = ARParts(cfg, vocab_size=vocab_size, seq_len=seq_len, dtype=dtype, rngs=rngs)
    self.layers = blocks.Block([_llama(cfg, dtype, False)(rngs) for _ in range(cfg.num_layers)], remat=cfg.remat)

  def logits(self, tokens, *, key: jax.Array | None = None) -> jax.Array:
    """(N, L, V): position i is the distribution of x_i given x_{<i}."""
    return self.parts(self.layers, tokens, key=key)

  def __call__(self, tokens, *, key: jax.Array | None = None) -> jax.Array:
    return self.logits(tokens, key=key)


class DiffusionBlocksAR(blocks.DiffusionBlocks):
  """The Llama layers cut into B blocks; block b denoises every slot's next-token embedding over its σ slice."""

  def __init__(self, cfg, layer_counts, *, vocab_size: int, seq_len: int, rngs: nnx.Rngs, sigma_data: float = 0.5,
               dtype=jnp.float32, stack: bool | None = None):
    super().__init__(_llama(cfg, dtype, True), layer_counts,
                     make_outer=_ar_diffusion_parts(cfg, vocab_size, seq_len, sigma_data, dtype),
                     independent=cfg.independent_blocks, rngs=rngs, stack=stack, remat=cfg.remat,
                     weight_tied=cfg.weight_tied)

  def embedding_table(self, block=0) -> jax.Array:
    """The raw rows (V, hidden) that block `block` embeds clean tokens with (its own copy when independent)."""
    return self.outer(self.block(block)).embedding_table()

  def denoise(self, tokens, z_t, sigmas, block, *, key: jax.Array | None = None, clean: bool = False):
    """Slot logits (N, L, V); with `clean`, (slot logits, the clean half's next-token logits)."""
    layers = self.block(block)
    extra = {'clean': True} if clean else {}  # Outer parts of subclasses that have no clean path take no flag.
    return self.outer(layers)(layers, tokens, z_t, sigmas, key=key, **extra)
