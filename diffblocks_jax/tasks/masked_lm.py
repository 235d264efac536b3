"""Masked diffusion language modelling as a DiffusionBlocks task (paper §5.3, Table 3, App. D; MD4's loss).

Corruption: each token becomes [MASK] (id V) with probability t, the linear schedule α_t = 1 − t. The network's
logits become log-probabilities with carry-over: a position that shows a token puts all its mass on it, so its
cross-entropy is exactly 0 and every sum below runs over the masked positions only. The loss is the
continuous-time bound, per token:

    NELBO = ∫₀¹ (1/t) E_{x_t} [ Σ_{i masked} −log p(x_i | x_t) ] dt / L.

DiffusionBlocks cuts t into B slices, t_b = b/B (partitions.MaskingPartition; block 0 owns the most-masked slice,
the first layers). The bound splits the same way, one integral per slice: `nelbo_terms` estimates each with t
drawn inside the slice and routed to its block, so the terms add up to the whole bound (eval/bpc).
Sampling unmasks over N steps from t = 1 to 0; each step runs the block that owns its interval of t.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffblocks_jax import config as config_lib
from diffblocks_jax.core import blocks, partitions, sampler, steps
from diffblocks_jax.tasks import language, registry

UNIT = 'seq'  # Progress lines count sequences per second.

# The loss's 1/t is bounded by clipping t here: a draw of exactly 0 (possible for the lowest slice) would give
# 0/0. Below 1e-4 a sequence of 128 tokens is unmasked with probability > 98 %, so the clip changes nothing else.
MIN_T = 1e-4


def carry_over(logits: jax.Array, x_t: jax.Array, mask_id: int) -> jax.Array:
  """Log-probabilities (N, L, V): the model's at masked positions, all mass on the shown token elsewhere."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  shown = jnp.where(jax.nn.one_hot(x_t, logits.shape[-1], dtype=jnp.bool_), 0.0, -jnp.inf)
  return jnp.where((x_t == mask_id)[..., None], log_probs, shown)


def masked_nll(log_probs: jax.Array, tokens: jax.Array) -> jax.Array:
  """(N, L) −log p(x_i | x_t): 0 where x_t shows the token (carry-over)."""
  return -jnp.take_along_axis(log_probs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def bound_integrand(log_probs: jax.Array, tokens: jax.Array, t: jax.Array) -> jax.Array:
  """(N,) (1/t)·Σ_i −log p(x_i | x_t) / L in nats per token: the NELBO's integrand at t."""
  return masked_nll(log_probs, tokens).sum(-1) / (jnp.maximum(t, MIN_T) * tokens.shape[-1])


@dataclasses.dataclass(frozen=True)
class MaskedLM:
  """What the core asks of a task, for masked diffusion: targets are token windows (N, L); no inputs."""
  vocab_size: int

  @property
  def mask_id(self) -> int:
    return self.vocab_size

  def target(self, model, tokens, block) -> jax.Array:
    del model, block
    return tokens.astype(jnp.int32)

  def denoise(self, model, inputs, x_t, t, block, key):
    del inputs
    return carry_over(model.denoise(x_t, t, block, key=key), x_t, self.mask_id)

  def loss(self, log_probs, tokens, t):
    """The bound's integrand averaged over the batch; aux: cross-entropy per masked token (nats)."""
    nll = masked_nll(log_probs, tokens)
    num_masked = jnp.sum(nll > 0)  # Carry-over: shown tokens cost exactly 0.
    return bound_integrand(log_probs, tokens, t).mean(), {'masked_ce': nll.sum() / jnp.maximum(num_masked, 1)}

  def drop_condition(self, key, inputs, prob: float):
    del key, prob
    return inputs  # Unconditional: nothing to drop.

  def end_to_end_loss(self, model, inputs, tokens, key):
    """The whole bound: t over [0, 1], stratified over the batch (one draw per 1/N of the interval)."""
    del inputs
    t_key, mask_key, dropout_key = jax.random.split(key, 3)
    n = tokens.shape[0]
    t = (jax.random.uniform(t_key, ()) + jnp.arange(n) / n) % 1.0
    x_t = self.corrupt(mask_key, tokens, t)
    return self.loss(self.denoise(model, None, x_t, t, 0, dropout_key), tokens, t)

  def corrupt(self, key, tokens, t):
    return partitions.MaskingPartition(1, mask_id=self.mask_id).corrupt(key, tokens.astype(jnp.int32), t)


def nelbo_terms(log_probs_fn, tokens: jax.Array, key: jax.Array, num_blocks: int, draws: int,
                mask_id: int) -> jax.Array:
  """(N, B) Monte-Carlo estimates of each slice's share of the bound, nats per token; their sum over B
  estimates the whole NELBO without bias.

  Slice b is t ∈ [(B−1−b)/B, (B−b)/B] (block b's, unwidened). `draws` stratified t per sequence inside it;
  `log_probs_fn(x_t, t, b)` gives carry-over log-probabilities from block b.
  """
  n = tokens.shape[0]
  edges = np.linspace(0.0, 1.0, num_blocks + 1)
  terms = []
  for b in range(num_blocks):
    lo, hi = edges[num_blocks - 1 - b], edges[num_blocks - b]
    total = jnp.zeros((n,), jnp.float32)
    for k in range(draws):
      t_key, mask_key = jax.random.split(jax.random.fold_in(key, b * draws + k))
      u = (k + jax.random.uniform(t_key, (n,))) / draws  # Stratified within the slice.
      t = lo + (hi - lo) * u
      x_t = partitions.MaskingPartition(1, mask_id=mask_id).corrupt(mask_key, tokens, t)
      total = total + bound_integrand(log_probs_fn(x_t, t, b), tokens, t)
    terms.append((hi - lo) * total / draws)
  return jnp.stack(terms, axis=1)


def unmasking_plan(partition: partitions.MaskingPartition, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """(times (N+1,), blocks (N,)): step i unmasks from times[i] to times[i+1] (1 → 0, uniform) and runs the
  block owning the middle of that interval (a step's start may sit on a slice boundary)."""
  times = np.linspace(1.0, 0.0, num_steps + 1)
  owners = np.array([partition.route_static((a + b) / 2) for a, b in zip(times[:-1], times[1:])], np.int32)
  return times, owners


def sample_tokens(key: jax.Array, logits: jax.Array, temperature: float = 1.0, top_k: int = 0) -> jax.Array:
  """Categorical draws from logits / temperature, restricted to the k likeliest tokens when top_k > 0."""
  logits = logits.astype(jnp.float32) / temperature
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def unmask(task: MaskedLM, model, key: jax.Array, num: int, seq_len: int, *, partition, num_steps: int,
           temperature: float = 1.0, top_k: int = 0) -> jax.Array:
  """(num, seq_len) samples: from all [MASK], each step draws every masked token from its block's
  prediction and reveals it with probability (t − s)/t (the reverse of α_t = 1 − t); the last step reveals all."""
  times, owners = unmasking_plan(partition, num_steps)
  t_now, t_next = jnp.asarray(times[:-1], jnp.float32), jnp.asarray(times[1:], jnp.float32)
  own = jnp.asarray(owners)

  def step(x, i):
    draw_key, reveal_key = jax.random.split(jax.random.fold_in(key, i))
    t = jnp.full((num,), t_now[i])
    logits = sampler.at_block(lambda m, b, y, tt: m.denoise(y, tt, b), model, own[i], x, t)
    proposal = sample_tokens(draw_key, logits, temperature, top_k)
    reveal = jax.random.bernoulli(reveal_key, (t_now[i] - t_next[i]) / t_now[i], x.shape)
    return jnp.where((x == task.mask_id) & reveal, proposal, x), None

  x = jnp.full((num, seq_len), task.mask_id, jnp.int32)
  x, _ = jax.lax.scan(step, x, jnp.arange(num_steps))
  return x


# ----------------------------------------------------------------------------------- from a config

def make_task(config, data) -> MaskedLM:
  del config
  return MaskedLM(int(data.vocab_size))


def partition(config, data=None) -> partitions.MaskingPartition:
  """B slices of t for 'mdm_dblock'; one slice (all of [0, 1]) for the end-to-end 'mdm'."""
  return partitions.MaskingPartition(config_lib.num_blocks(config), float(config.diffusion.overlap),
                                    mask_id=int(data.vocab_size) if data is not None else -1)


def train_batch(key, rows, data_config):
  """(inputs, targets) of a step from gathered token windows: no inputs, the window is the target."""
  del key, data_config
  (tokens,) = rows
  return None, tokens.astype(jnp.int32)


def make_train_step(graphdef, config, schedule, *, data, block: int | None = None,
                    placement: blocks.Placement = blocks.ON_DEVICE):
  task = make_task(config, data)
  if not registry.kind(config.model.kind).blockwise:
    return steps.make_end_to_end_step(graphdef, task, config.optim, schedule)
  return steps.make_block_step(graphdef, task, partition(config, data), config.optim, schedule, block=block,
                               placement=placement)


def make_bound_fn(graphdef, config, data):
  """`bound(params, tokens, key) -> (N, B)` nats per token of each slice (jit it)."""
  task = make_task(config, data)
  num_blocks, draws = config_lib.num_blocks(config), config.eval.elbo_draws

  def bound(params, tokens, key):
    model = nnx.merge(graphdef, params)
    fn = lambda x_t, t, b: task.denoise(model, None, x_t, t, b, None)
    return nelbo_terms(fn, tokens.astype(jnp.int32), key, num_blocks, draws, task.mask_id)

  return bound


def make_integrand_fn(graphdef, config, data):
  """`integrand(params, tokens, t, key) -> (N,)` nats per token of the bound's integrand at one t (a Python
  float), run by the block that owns t: the bound across t, slice by slice (notebooks/language.ipynb)."""
  task, plan = make_task(config, data), partition(config, data)

  def integrand(params, tokens, t: float, key):
    model, block = nnx.merge(graphdef, params), plan.route_static(t)
    ts = jnp.full((tokens.shape[0],), t, jnp.float32)
    x_t = task.corrupt(key, tokens, ts)
    return bound_integrand(task.denoise(model, None, x_t, ts, block, None), tokens.astype(jnp.int32), ts)

  return integrand


def make_sample_fn(graphdef, config, data):
  """`sample(params, key, num) -> (num, L)` tokens (`num` static)."""
  task, plan = make_task(config, data), partition(config, data)
  e = config.eval
  num_steps = inference_steps(config, data)

  def sample(params, key, num):
    return unmask(task, nnx.merge(graphdef, params), key, num, data.seq_len, partition=plan, num_steps=num_steps,
                  temperature=e.temperature, top_k=e.top_k)

  return sample



def inference_steps(config, data) -> int:
  """The sampler's steps: config.eval.num_inference_steps, 0 meaning max(B, L) (at most one token unmasked per
  step on average)."""
  return config.eval.num_inference_steps or max(config_lib.num_blocks(config), data.seq_len)


# ----------------------------------------------------------------------------------- evaluation of a run

def make_evaluator(exp, workdir: str):
  """eval/bpc (the bound in bits per character) and its per-block slices; samples and their entropy."""
  bound = jax.jit(make_bound_fn(exp.graphdef, exp.config, exp.data))

  def held_out(params, tokens, key, batch):
    terms = language.mean_over_rows(lambda x, i: bound(params, x, jax.random.fold_in(key, i)), tokens, batch)
    metrics = {'eval/bpc': language.bits_per_char(terms.sum(), exp.data)}
    if len(terms) > 1:
      metrics.update({f'eval/bpc_block{b}': language.bits_per_char(v, exp.data) for b, v in enumerate(terms)})
    return metrics

  return language.LanguageEvaluator(exp, workdir, sample_fn=make_sample_fn(exp.graphdef, exp.config, exp.data),
                                    held_out=held_out)


def write_samples(exp, workdir: str, params, step: int, num: int) -> str:
  return language.write_samples(exp, workdir, params, step, num,
                                make_sample_fn(exp.graphdef, exp.config, exp.data))
