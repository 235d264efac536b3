"""Recurrent depth for language (paper Table 5): a Huginn-style looped LM end to end, and its DiffusionBlocks form.

Both are the autoregressive task's networks (tasks/autoregressive.py), built from models/text.py's Llama layers,
with the fields of `config.model.recurrent` (a sub-dict the config adds: configs/text_rd.py), checked by the
registry's rules before anything is built:

  prelude_layers, coda_layers   layers before and after the recurrent block (`model.num_layers`: see below)
  mean_depth                    'rd': E[r], the unrolls of the recurrent block per training step; its evaluation
                                depth when eval.num_inference_steps is 0 (rounded)
  backprop_depth                'rd': k, gradients flow through the last k unrolls only
  min_depth, depth_distribution, depth_sigma
                                'rd': r = min_depth + Poisson(λ), with λ = exp(τ),
                                τ ~ N(ln(mean_depth − min_depth) − σ²/2, σ) ('lognormal_poisson', Huginn's Λ,
                                σ = depth_sigma), or λ = mean_depth − min_depth ('poisson'), or r = mean_depth
                                always ('fixed'); min_depth >= 1, so r is never 0

'rd' (`RecurrentDepthLM`, Geiping et al. 2025, "Scaling up test-time compute with latent reasoning", as their paper
describes it): tokens → prelude (P causal layers) → e; s_0 = 0; s_i = R(e, s_{i-1}) for i = 1..r, R an adapter
Linear(2h → h) on [e | RMSNorm(s)] followed by the recurrent block's `model.num_layers` layers; coda (C layers) on
s_r, final RMSNorm and head. Per training step r is drawn from the step's key, the first r − k unrolls run
without gradients (parameters, e and the state under `stop_gradient`, a while loop) and the last min(r, k) with
them. What differs from Huginn, by assumption: s_0 = 0 instead of Gaussian noise (a deterministic evaluation; their
noise is for path independence, which we do not test), pre-norm layers instead of their sandwich norm (the state
norm in R keeps the adapter's input bounded), no embedding scale. At evaluation (no key) the block is unrolled
`eval_depth` times (tasks/autoregressive.py sets it from eval.num_inference_steps).

'rd_dblock' (`RecurrentDiffusionBlocksAR`): the autoregressive DiffusionBlocks network (`text.DiffusionBlocksAR`:
[clean | noisy] under the Block Diffusion mask, the next token's embedding diffused) whose B blocks are weight-tied
(`model.weight_tied`: one row of `model.num_layers / model.num_blocks` layers serving every noise slice), with the
prelude and coda as shared outer parts (σ-conditioned by adaLN, as the block): a training step runs prelude →
block → coda once, at one σ; inference runs them once per sampler step, so the recurrent block's depth is
N = eval.num_inference_steps.

Training FLOPs (`train_flops_per_step`, reported as eval/train_flops): 2 FLOPs per multiply-add of every weight
matrix a token passes through forward, twice that again backward where gradients flow, plus the attention
products (QKᵀ and AV, 4·T·h per token and layer forward over a context of T); embedding look-ups, the per-sequence
time embedding and adaLN modulations are left out.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from diffblocks_jax.core import blocks
from diffblocks_jax.models import text


# ------------------------------------------------------------------ the depth draw

def draw_depth(key: jax.Array, rec) -> jax.Array:
  """r (int32 scalar) >= rec.min_depth: the unrolls of one training step; `rec` has config.model.recurrent's
  depth fields as attributes (the config section, or the model)."""
  if rec.depth_distribution == 'fixed':
    return jnp.asarray(int(rec.mean_depth), jnp.int32)
  rate = float(rec.mean_depth - rec.min_depth)
  if rec.depth_distribution == 'lognormal_poisson':
    sigma = float(rec.depth_sigma)
    tau_key, key = jax.random.split(key)
    lam = jnp.exp(math.log(rate) - sigma**2 / 2 + sigma * jax.random.normal(tau_key))  # E[λ] = rate.
  else:
    lam = jnp.asarray(rate, jnp.float32)
  return (int(rec.min_depth) + jax.random.poisson(key, lam)).astype(jnp.int32)


def _layers(cfg, count: int, dtype, rngs, *, conditioned: bool) -> blocks.Block:
  return blocks.Block([text.LlamaLayer(cfg, dtype, rngs, conditioned=conditioned) for _ in range(count)],
                      remat=cfg.remat)


# ------------------------------------------------------------------ 'rd': the Huginn-style baseline

class RecurrentBlock(nnx.Module):
  """R(e, s) = layers(adapter([e | RMSNorm(s)])): one unroll of the recurrent block, e injected every time."""

  def __init__(self, cfg, dtype, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.state_norm = text.RMSNorm(h, rngs=rngs)
    self.adapter = text.linear(2 * h, h, dtype, rngs)
    self.layers = _layers(cfg, cfg.num_layers, dtype, rngs, conditioned=False)

  def __call__(self, e, s, keys, *, mask, positions):
    x = self.adapter(jnp.concatenate([e, self.state_norm(s).astype(e.dtype)], axis=-1))
    return self.layers(x, keys, None, mask=mask, positions=positions)


class RecurrentDepthLM(nnx.Module):
  """End-to-end recurrent-depth causal LM: prelude, the recurrent block unrolled r times, coda, head."""

  num_blocks = 1
  eval_depth: int = 0  # Unrolls at evaluation (set in __init__; tasks/autoregressive.py's evaluator may change it).

  def __init__(self, cfg, *, vocab_size: int, seq_len: int, rngs: nnx.Rngs, dtype=jnp.float32):
    rec = cfg.recurrent
    self.parts = text.ARParts(cfg, vocab_size=vocab_size, seq_len=seq_len, dtype=dtype, rngs=rngs)
    self.prelude = _layers(cfg, rec.prelude_layers, dtype, rngs, conditioned=False)
    self.core = RecurrentBlock(cfg, dtype, rngs)
    self.coda = _layers(cfg, rec.coda_layers, dtype, rngs, conditioned=False)
    # The depth draw's numbers, as static attributes (`draw_depth` reads them from the model).
    self.mean_depth, self.backprop_depth, self.min_depth = rec.mean_depth, rec.backprop_depth, rec.min_depth
    self.depth_distribution, self.depth_sigma = rec.depth_distribution, rec.depth_sigma
    self.eval_depth = max(1, round(rec.mean_depth))

  def unroll(self, e, keys, depth_key, *, mask, positions) -> jax.Array:
    """s_r from the prelude's output e: `eval_depth` unrolls without a key; with one, r drawn from it and only
    the last min(r, k) unrolls differentiable."""
    run = lambda core, e: (lambda s: core(e, s, keys, mask=mask, positions=positions))
    s = jnp.zeros_like(e)
    if depth_key is None:
      step = run(self.core, e)
      return jax.lax.fori_loop(0, self.eval_depth, lambda i, s: step(s), s)
    r = draw_depth(depth_key, self)
    k = int(self.backprop_depth)
    with_grad = jnp.minimum(r, k)
    graphdef, state = nnx.split(self.core)
    frozen = run(nnx.merge(graphdef, jax.lax.stop_gradient(state)), jax.lax.stop_gradient(e))
    # A while loop (a traced trip count) of constants only: nothing in it is differentiated.
    s = jax.lax.stop_gradient(jax.lax.fori_loop(0, r - with_grad, lambda i, s: frozen(s), s))
    step = run(self.core, e)

    def unroll_with_grad(s, i):  # k steps traced once; the first k − min(r, k) leave the state as it is.
      return jnp.where(i >= k - with_grad, step(s), s), None

    s, _ = jax.lax.scan(unroll_with_grad, s, jnp.arange(k))
    return s

  def logits(self, tokens, *, key: jax.Array | None = None) -> jax.Array:
    """(N, L, V): position i is the distribution of x_i given x_{<i}. `key` (training): the depth draw and
    dropout; None: `eval_depth` unrolls, no dropout."""
    depth_key, dropout_key = jax.random.split(key) if key is not None else (None, None)

    def layers(x, keys, cond, *, mask, positions):
      e = self.prelude(x, keys, cond, mask=mask, positions=positions)
      s = self.unroll(e, keys, depth_key, mask=mask, positions=positions)
      return self.coda(s, keys, cond, mask=mask, positions=positions)

    return self.parts(layers, tokens, key=dropout_key)

  def __call__(self, tokens, *, key: jax.Array | None = None) -> jax.Array:
    return self.logits(tokens, key=key)

  @classmethod
  def train_flops_per_step(cls, cfg, *, vocab_size: int, seq_len: int, batch_size: int) -> float:
    """Analytic FLOPs of one training step: E[r] = mean_depth unrolls forward, the last k backward (as if r >= k;
    the step computes max(r, k) unrolls, ≈ r at mean depths well above k), prelude, coda and head both ways."""
    rec, h = cfg.recurrent, cfg.hidden_size
    layer = _layer_flops(cfg, seq_len)
    unroll = 2 * 2 * h * h + cfg.num_layers * layer  # Adapter (2h → h) and the block's layers.
    outside = (rec.prelude_layers + rec.coda_layers) * layer + 2 * h * vocab_size
    forward = outside + rec.mean_depth * unroll
    backward = 2 * (outside + rec.backprop_depth * unroll)
    return float(batch_size * seq_len * (forward + backward))


def _layer_flops(cfg, context: int) -> float:
  """Forward FLOPs per token of one Llama layer: its matrices (4h² attention, 3·h·w SwiGLU) and the attention
  products over a context of `context` tokens."""
  h = cfg.hidden_size
  width = cfg.get('mlp_width') or int(cfg.mlp_ratio * h)  # text.LlamaLayer's SwiGLU width.
  return 2 * (4 * h * h + 3 * h * width) + 4 * context * h


# ------------------------------------------------------------------ 'rd_dblock': DiffusionBlocks, weight-tied

class RecurrentDiffusionParts(text.ARDiffusionParts):
  """`text.ARDiffusionParts` with σ-conditioned prelude and coda layers around the block's layers."""

  def __init__(self, cfg, *, vocab_size: int, seq_len: int, sigma_data: float, dtype, rngs: nnx.Rngs):
    super().__init__(cfg, vocab_size=vocab_size, seq_len=seq_len, sigma_data=sigma_data, dtype=dtype, rngs=rngs)
    self.prelude = _layers(cfg, cfg.recurrent.prelude_layers, dtype, rngs, conditioned=True)
    self.coda = _layers(cfg, cfg.recurrent.coda_layers, dtype, rngs, conditioned=True)

  def __call__(self, layers: blocks.Block, tokens, z_t, sigmas, *, key: jax.Array | None = None, **options):
    """`text.ARDiffusionParts.__call__` (and its `options`, e.g. `clean`) with prelude → layers → coda."""

    def looped(x, keys, cond, *, mask, positions):
      for part in (self.prelude, layers, self.coda):
        x = part(x, keys, cond, mask=mask, positions=positions)
      return x

    return super().__call__(looped, tokens, z_t, sigmas, key=key, **options)


class RecurrentDiffusionBlocksAR(text.DiffusionBlocksAR):
  """`text.DiffusionBlocksAR` with one weight-tied block (the recurrent block) and a shared prelude and coda."""

  def __init__(self, cfg, layer_counts, *, vocab_size: int, seq_len: int, rngs: nnx.Rngs, sigma_data: float = 0.5,
               dtype=jnp.float32, stack: bool | None = None):
    make_outer = lambda r: RecurrentDiffusionParts(cfg, vocab_size=vocab_size, seq_len=seq_len,
                                                   sigma_data=sigma_data, dtype=dtype, rngs=r)
    blocks.DiffusionBlocks.__init__(  # pylint: disable=non-parent-init-called
        self, lambda r: text.LlamaLayer(cfg, dtype, r, conditioned=True), layer_counts, make_outer=make_outer,
        independent=cfg.independent_blocks, rngs=rngs, stack=stack, remat=cfg.remat, weight_tied=cfg.weight_tied)

  @classmethod
  def train_flops_per_step(cls, cfg, *, vocab_size: int, seq_len: int, batch_size: int) -> float:
    """Analytic FLOPs of one training step: one pass forward and backward over [clean | noisy] (2T tokens) through
    prelude, one block and coda; the in-projection and head over the T noisy slots."""
    rec, h = cfg.recurrent, cfg.hidden_size
    depth = rec.prelude_layers + cfg.num_layers // cfg.num_blocks + rec.coda_layers
    per_sequence = 2 * seq_len * depth * _layer_flops(cfg, 2 * seq_len) + seq_len * 2 * (h * h + h * vocab_size)
    return float(3 * batch_size * per_sequence)
