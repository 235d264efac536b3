"""Autoregressive language modelling with DiffusionBlocks (paper §5.3, Table 4, App. B-C).

The end-to-end baseline ('ar') is a plain Llama-style causal LM trained with next-token cross-entropy.
Its DiffusionBlocks form ('ar_dblock') diffuses the NEXT token instead: the target of slot i is the
L2-normalised embedding of x_i, corrupted with EDM's noise (σ from the equi-probability partition, B blocks,
overlap γ), and the network reads [clean tokens | noisy slots] under the Block Diffusion mask with block size 1
(models/text.py): slot i sees x_{<i} and itself. A block's output is logits over the vocabulary; its loss the
cross-entropy weighted by w(σ) (clamped at diffusion.max_loss_weight when set); its estimate of the clean
target x̂ = softmax(logits)·Ê, Ê the normalised embedding rows (classification's rule, per token). With
diffusion.clean_ce_weight = λ > 0 the loss adds λ × the next-token cross-entropy of the clean half (clean position
i predicts x_{i+1} through the block's layers and the same head), so a block fine-tuned from a language model keeps
modelling language (issue 25; docs/finetune.md).

Sampling, per token: Euler over the blocks from σ_max, each step run by the block owning its σ, then a draw
from the last step's logits (temperature, top-k).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from diffblocks_jax import config as config_lib
from diffblocks_jax.core import blocks, partitions, sampler, steps
from diffblocks_jax.tasks import language, registry
from diffblocks_jax.tasks.masked_lm import sample_tokens

UNIT = 'seq'  # Progress lines count sequences per second.


AR_SOLVERS = ('euler', 'ancestral')  # eval.solver for 'ar_dblock'.


def normalised_table(model, block) -> jax.Array:
  """Ê: the token embedding rows of the outer parts that `block` runs between, L2-normalised (V, h)."""
  table = model.outer(model.block(block)).embedding_table().astype(jnp.float32)
  # A zero row stays zero, value and gradient: checkpoints keep their padding token's row at zero (torch's
  # Embedding(padding_idx=...)), and a plain norm would make the whole table, so the loss, NaN.
  # (The double where: no rsqrt of 0 in either branch, so the gradient of a zero row is 0, not NaN or 1e15.)
  squared = jnp.sum(table * table, axis=-1, keepdims=True)
  nonzero = squared > 0
  return table * jnp.where(nonzero, jax.lax.rsqrt(jnp.where(nonzero, squared, 1.0)), 0.0)


@dataclasses.dataclass(frozen=True)
class Autoregressive:
  """What the core asks of a task, for 'ar_dblock': inputs are the clean windows (the context), targets the
  same windows (slot i's clean target is x_i's normalised embedding)."""
  sigma_data: float = 0.5
  max_loss_weight: float = 0.0
  clean_ce_weight: float = 0.0  # λ: the clean path's next-token cross-entropy joins the loss.

  @classmethod
  def from_config(cls, config) -> Autoregressive:
    return cls(float(config.diffusion.sigma_data), float(config.diffusion.max_loss_weight),
               float(config.diffusion.clean_ce_weight))

  def target(self, model, tokens, block) -> jax.Array:
    return normalised_table(model, block)[tokens.astype(jnp.int32)]

  def logits(self, model, tokens, z_t, sigmas, block, key) -> jax.Array:
    """The slots' logits (N, L, V): what sampling and evaluation read."""
    return model.denoise(tokens.astype(jnp.int32), z_t, sigmas, block, key=key)

  def denoise(self, model, tokens, z_t, sigmas, block, key):
    """What the training step hands to `loss`: the slots' logits, with λ > 0 also the clean half's."""
    if not self.clean_ce_weight:
      return self.logits(model, tokens, z_t, sigmas, block, key)
    return model.denoise(tokens.astype(jnp.int32), z_t, sigmas, block, key=key, clean=True)

  def weight(self, sigmas) -> jax.Array:
    w = partitions.loss_weight(sigmas, self.sigma_data)
    return jnp.minimum(w, self.max_loss_weight) if self.max_loss_weight else w

  def loss(self, output, tokens, sigmas):
    """w(σ)·cross-entropy per slot, averaged; aux: the plain cross-entropy (nats per token). With λ > 0 (`output`
    = (slot logits, clean logits)) plus λ × the clean half's next-token cross-entropy, aux 'clean_ce'."""
    logits, clean = output if isinstance(output, tuple) else (output, None)
    tokens = tokens.astype(jnp.int32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens)
    loss, aux = jnp.mean(self.weight(sigmas)[:, None] * ce), {'ce': ce.mean()}
    if clean is None:
      return loss, aux
    clean_ce = optax.softmax_cross_entropy_with_integer_labels(clean[:, :-1].astype(jnp.float32), tokens[:, 1:])
    return loss + self.clean_ce_weight * clean_ce.mean(), dict(aux, clean_ce=clean_ce.mean())

  def estimate(self, model, logits, block) -> jax.Array:
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1) @ normalised_table(model, block)

  def drop_condition(self, key, tokens, prob: float):
    del key, prob
    return tokens  # The context is never dropped.

  def end_to_end_loss(self, model, inputs, tokens, key):
    """The baseline: next-token cross-entropy of the plain causal LM."""
    del inputs
    ce = token_nll(model, tokens, key=key).mean()
    return ce, {'ce': ce}


def token_nll(model, tokens, *, key=None) -> jax.Array:
  """(N, L) −log p(x_i | x_{<i}) in nats under an end-to-end 'ar' model."""
  logits = model.logits(tokens.astype(jnp.int32), key=key).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens.astype(jnp.int32))


def ancestral(model, key: jax.Array, num: int, seq_len: int, *, temperature: float = 1.0,
              top_k: int = 0) -> jax.Array:
  """(num, seq_len) samples of an end-to-end 'ar' model, one token per forward pass."""

  def position(tokens, i):
    logits = jax.lax.dynamic_index_in_dim(model.logits(tokens), i, axis=1, keepdims=False)
    return tokens.at[:, i].set(sample_tokens(jax.random.fold_in(key, i), logits, temperature, top_k)), None

  tokens, _ = jax.lax.scan(position, jnp.zeros((num, seq_len), jnp.int32), jnp.arange(seq_len))
  return tokens


def denoise_tokens(task: Autoregressive, model, key: jax.Array, num: int, seq_len: int, *, partition,
                   num_steps: int, grid: str = 'quantile', solver: str = 'euler', temperature: float = 1.0,
                   top_k: int = 0) -> jax.Array:
  """(num, seq_len) samples of an 'ar_dblock' model: per position i, slot i starts from the prior at σ_max and
  takes `num_steps` steps, step n run by the block that owns σ_n (`sampler.plan`, known when tracing); x_i is
  drawn from the last step's logits. The other slots hold noise that slot i cannot see.

  solver 'euler' (the paper's): x̂ = softmax(logits)·Ê and an Euler step of the probability-flow ODE.
  'ancestral': a token drawn from the step's logits, its embedding noised afresh to the next σ, so every block
  sees inputs of the form it was trained on (one clean embedding plus noise) rather than a blend of embeddings.
  """
  if solver not in AR_SOLVERS:
    raise ValueError(f'solver must be one of {AR_SOLVERS}, got {solver!r}')
  levels, owners = sampler.plan(partition, num_steps, grid)
  width = normalised_table(model, 0).shape[-1]

  def position(tokens, i):
    noise_key, draw_key, step_key = jax.random.split(jax.random.fold_in(key, i), 3)
    z = partition.prior(noise_key, (num, seq_len, width), float(levels[0]))
    for n, block in enumerate(owners.tolist()):
      logits = task.logits(model, tokens, z, jnp.full((num,), levels[n], jnp.float32), block, None)
      if n + 1 == num_steps:
        break
      if solver == 'euler':
        z = partition.euler(z, task.estimate(model, logits, block), float(levels[n]), float(levels[n + 1]))
      else:
        draw, noise = jax.random.split(jax.random.fold_in(step_key, n))
        drawn = normalised_table(model, block)[sample_tokens(draw, logits, temperature, top_k)]
        z = drawn + float(levels[n + 1]) * jax.random.normal(noise, z.shape)
    final = jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False)
    return tokens.at[:, i].set(sample_tokens(draw_key, final, temperature, top_k)), None

  tokens, _ = jax.lax.scan(position, jnp.zeros((num, seq_len), jnp.int32), jnp.arange(seq_len))
  return tokens


def block_ce(task: Autoregressive, model, tokens, key, partition) -> jax.Array:
  """(N, B) denoising cross-entropy of each sequence under each block, on σ drawn from the block's own range
  (nats per token)."""
  out = []
  for b in range(partition.num_blocks):
    level_key, noise_key = jax.random.split(jax.random.fold_in(key, b))
    sigmas, _ = partition.sample(level_key, tokens.shape[0], block=b)
    z_t = partition.corrupt(noise_key, task.target(model, tokens, b), sigmas)
    logits = task.logits(model, tokens, z_t, sigmas, b, None).astype(jnp.float32)
    out.append(optax.softmax_cross_entropy_with_integer_labels(logits, tokens.astype(jnp.int32)).mean(-1))
  return jnp.stack(out, axis=1)


# ----------------------------------------------------------------------------------- from a config

def make_task(config, data=None) -> Autoregressive:
  del data
  return Autoregressive.from_config(config)


def partition(config, data=None) -> partitions.LogNormalPartition:
  del data
  return partitions.LogNormalPartition.from_config(config_lib.num_blocks(config), config.diffusion)


def train_batch(key, rows, data_config):
  """(inputs, targets) of a step from gathered token windows: the window is both the context and the target."""
  del key, data_config
  (tokens,) = rows
  tokens = tokens.astype(jnp.int32)
  return tokens, tokens


def make_train_step(graphdef, config, schedule, *, data, block: int | None = None,
                    placement: blocks.Placement = blocks.ON_DEVICE):
  task = make_task(config, data)
  if not registry.kind(config.model.kind).blockwise:
    return steps.make_end_to_end_step(graphdef, task, config.optim, schedule)
  return steps.make_block_step(graphdef, task, partition(config), config.optim, schedule, block=block,
                               placement=placement)


def make_sample_fn(graphdef, config, data):
  """`sample(params, key, num) -> (num, L)` tokens (`num` static): ancestral for 'ar', per-token Euler over the
  blocks for 'ar_dblock'."""
  e = config.eval
  options = dict(temperature=e.temperature, top_k=e.top_k)
  if not registry.kind(config.model.kind).blockwise:
    return lambda params, key, num: ancestral(at_eval_depth(nnx.merge(graphdef, params), config), key, num,
                                              data.seq_len, **options)
  task, plan = make_task(config), partition(config)
  num_steps = inference_steps(config)
  return lambda params, key, num: denoise_tokens(task, nnx.merge(graphdef, params), key, num, data.seq_len,
                                                 partition=plan, num_steps=num_steps, grid=e.sigma_grid,
                                                 solver=e.solver, **options)


def inference_steps(config) -> int:
  """The sampler's steps per token: config.eval.num_inference_steps, 0 meaning B (each block once)."""
  return config.eval.num_inference_steps or config_lib.num_blocks(config)


def at_eval_depth(model, config):
  """`model` as evaluated: a recurrent-depth one (an `eval_depth` attribute: models/recurrent.py) unrolled
  config.eval.num_inference_steps times (0: its own default, the mean training depth); any other as it is."""
  if getattr(model, 'eval_depth', None) is not None and config.eval.num_inference_steps:
    model.eval_depth = int(config.eval.num_inference_steps)
  return model


# ----------------------------------------------------------------------------------- evaluation of a run

def make_evaluator(exp, workdir: str):
  """End to end: eval/bpc and the perplexity of its own samples under itself. DiffusionBlocks: each block's
  held-out denoising cross-entropy, and its samples' perplexity under the end-to-end run of
  config.eval.scorer_workdir (loaded and checked here, before training)."""
  c, graphdef = exp.config, exp.graphdef
  model_class = registry.model_class(c.model.kind)
  if not exp.blockwise:
    own = language.Scorer(graphdef, lambda model, x: token_nll(at_eval_depth(model, c), x))
    held_out = lambda params, tokens, key, batch: {
        'eval/bpc': language.bits_per_char(own.mean_nll(tokens, batch, params), exp.data)}
    # The plain LM scores its own samples; a recurrent-depth baseline is judged as DiffusionBlocks is.
    scorer = language.load_scorer(exp, token_nll) if hasattr(model_class, 'eval_depth') else own
  else:
    scorer = language.load_scorer(exp, token_nll)
    task, plan = make_task(c), partition(c)
    block_ce_fn = jax.jit(lambda p, x, k: block_ce(task, nnx.merge(graphdef, p), x, k, plan))

    def held_out(params, tokens, key, batch):
      ce = language.mean_over_rows(lambda x, i: block_ce_fn(params, x, jax.random.fold_in(key, i)), tokens, batch)
      return {f'eval/ce_block{b}': float(v) for b, v in enumerate(ce)}

  evaluator = language.LanguageEvaluator(exp, workdir, sample_fn=make_sample_fn(graphdef, c, exp.data),
                                         held_out=held_out, scorer=scorer)
  if not hasattr(model_class, 'train_flops_per_step'):
    return evaluator
  # eval/train_flops: the model's analytic estimate per step (models/recurrent.py) times the steps trained.
  per_step = model_class.train_flops_per_step(c.model, vocab_size=exp.data.vocab_size, seq_len=exp.data.seq_len,
                                              batch_size=c.train.batch_size)

  def evaluate(params, step):
    metrics, line = evaluator(params, step)
    metrics['eval/train_flops'] = per_step * step
    return metrics, f'{line}; {metrics["eval/train_flops"]:.3g} training FLOPs'

  return evaluate


def write_samples(exp, workdir: str, params, step: int, num: int) -> str:
  return language.write_samples(exp, workdir, params, step, num,
                                make_sample_fn(exp.graphdef, exp.config, exp.data))
