"""Evaluation of language models on held-out text, and their samples (model.kind 'mdm' | 'mdm_dblock' | 'ar' |
'ar_dblock'; tasks/masked_lm.py and tasks/autoregressive.py say what is trained).

  masked diffusion   eval/bpc: the bound on the held-out windows in bits per character (per byte for
                     data.vocab='byte'), each t routed to the block owning it; eval/bpc_block{b}: block b's
                     slice of the bound (they add up to eval/bpc).
  'ar'               eval/bpc: next-token cross-entropy in bits; eval/gen_ppl and eval/sample_entropy of its
                     own samples (scored by itself).
  'ar_dblock'        eval/ce_block{b}: each block's held-out denoising cross-entropy (nats) on its own σ;
                     eval/gen_ppl: perplexity of its samples under the 'ar' run of eval.scorer_workdir;
                     eval/sample_entropy.

eval/sample_entropy is the entropy (bits) of each sample's own character frequencies, averaged over samples:
a model that collapses to repeating a few characters scores low while its perplexity may look good.
Samples go to WORKDIR/samples/step_<N>.txt, one per paragraph.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx

from diffblocks_jax.training import sharding
from diffblocks_jax import config as config_lib
from diffblocks_jax.training.experiment import Experiment, load_judge
from diffblocks_jax.tasks import autoregressive, masked_lm

DEFAULT_NUM_SAMPLES = 64  # eval.num_samples = 0.
BITS_PER_NAT = 1.0 / math.log(2.0)


def sample_entropy(tokens: np.ndarray) -> float:
  """Mean over samples of the entropy (bits) of the sample's token frequencies."""
  out = []
  for row in np.asarray(tokens):
    p = np.bincount(row) / len(row)
    p = p[p > 0]
    out.append(float(-(p * np.log2(p)).sum()))
  return float(np.mean(out))


def _batches(tokens: np.ndarray, batch_size: int):
  """(batch, real rows) of one shape: the last batch padded with copies of its last row."""
  for start in range(0, len(tokens), batch_size):
    chunk = tokens[start:start + batch_size]
    real = len(chunk)
    if real < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
    yield chunk, real


def _mean_over_rows(fn, tokens: np.ndarray, batch_size: int) -> np.ndarray:
  """Mean over all rows of `fn(batch, index) -> (batch, ...)`, the padding left out."""
  total, count = 0.0, 0
  for index, (batch, real) in enumerate(_batches(tokens, min(batch_size, len(tokens)))):
    out = np.asarray(fn(batch, index), np.float64)[:real]
    total, count = total + out.sum(axis=0), count + real
  return total / count


class Scorer:
  """An end-to-end 'ar' model: −log p of token windows, for bits per character and the perplexity of samples.
  `params` None: the caller passes them (the baseline scores itself with the parameters being evaluated)."""

  def __init__(self, graphdef, params=None, workdir: str = ''):
    self.params, self.workdir = params, workdir
    self._nll = jax.jit(lambda p, x: autoregressive.token_nll(nnx.merge(graphdef, p), x).mean(-1))

  def mean_nll(self, tokens: np.ndarray, batch_size: int, params=None) -> float:
    """Nats per token, averaged over every token of `tokens` (N, L)."""
    params = self.params if params is None else params
    return float(_mean_over_rows(lambda x, _: self._nll(params, x), tokens, batch_size))

  def perplexity(self, tokens: np.ndarray, batch_size: int, params=None) -> float:
    return float(np.exp(self.mean_nll(tokens, batch_size, params)))


def load_scorer(exp: Experiment) -> Scorer | None:
  """The 'ar' run of config.eval.scorer_workdir (same data), checked up front; None when unset."""
  path = exp.config.eval.scorer_workdir
  if not path:
    logging.warning("config.eval.scorer_workdir is empty: no eval/gen_ppl. Train the end-to-end 'ar' model on "
                    'the same data first (e.g. configs/text_ar.py) and pass its workdir.')
    return None
  kind_error = lambda judge: (None if judge.model.kind == 'ar' else f' holds a {judge.model.kind!r} run; the scorer '
                              "is the end-to-end autoregressive model (model.kind 'ar')")
  _, scorer_exp, state = load_judge(
      exp.config, 'scorer_workdir', kind_error=kind_error, why='its perplexities would not compare',
      data_fields=('source', 'name', 'path', 'vocab', 'seq_len', 'test_fraction', 'train_split', 'test_split'))
  logging.info('Sample perplexity: the autoregressive model of %s (checkpoint step %d).', path, int(state.step))
  return Scorer(scorer_exp.graphdef, state.params, path)


class LanguageEvaluator:
  """(params, step) -> metrics of a language run; writes its samples."""

  def __init__(self, exp: Experiment, workdir: str, scorer: Scorer | None = None):
    self.exp, self.workdir, self.scorer = exp, workdir, scorer
    c, data = exp.config, exp.data
    self.task_name = config_lib.task_name(c)
    self.num_samples = c.eval.num_samples or DEFAULT_NUM_SAMPLES
    self.key = jax.random.fold_in(jax.random.key(c.seed), 0xe7a1)
    module = masked_lm if self.task_name == 'masked_lm' else autoregressive
    self._sample = jax.jit(module.make_sample_fn(exp.graphdef, c, data), static_argnums=2)
    if self.task_name == 'masked_lm':
      self._bound = jax.jit(masked_lm.make_bound_fn(exp.graphdef, c, data))
    elif config_lib.uses_blocks(c):
      task, plan = autoregressive.make_task(c), autoregressive.partition(c)
      self._block_ce = jax.jit(lambda p, x, k: autoregressive.block_ce(task, nnx.merge(exp.graphdef, p), x, k,
                                                                       plan))
    else:
      self.scorer = Scorer(exp.graphdef)  # The baseline scores the held-out text and its own samples.

  def samples(self, params, num: int | None = None, key: jax.Array | None = None) -> np.ndarray:
    params = sharding.on_device(params)  # Offloaded blocks (train.offload_idle_blocks): inference needs them all.
    return np.asarray(self._sample(params, self.key if key is None else key, num or self.num_samples))

  def __call__(self, params, step: int) -> tuple[dict[str, float], str]:
    c, test = self.exp.config, self.exp.data.test_tokens
    params = sharding.on_device(params)
    metrics: dict[str, Any] = {}
    key = jax.random.fold_in(self.key, 1)
    batch = c.eval.batch_size
    if self.task_name == 'masked_lm':
      terms = _mean_over_rows(lambda x, i: self._bound(params, x, jax.random.fold_in(key, i)), test, batch)
      metrics['eval/bpc'] = float(terms.sum() * BITS_PER_NAT)
      if len(terms) > 1:
        metrics.update({f'eval/bpc_block{b}': float(v * BITS_PER_NAT) for b, v in enumerate(terms)})
    elif config_lib.uses_blocks(c):
      ce = _mean_over_rows(lambda x, i: self._block_ce(params, x, jax.random.fold_in(key, i)), test, batch)
      metrics.update({f'eval/ce_block{b}': float(v) for b, v in enumerate(ce)})
    else:
      metrics['eval/bpc'] = self.scorer.mean_nll(test, batch, params) * BITS_PER_NAT
    samples = self.samples(params)
    metrics['eval/sample_entropy'] = sample_entropy(samples)
    if self.scorer is not None:
      own = None if self.scorer.params is not None else params
      metrics['eval/gen_ppl'] = self.scorer.perplexity(samples, batch, own)
    self.write(samples, f'step_{step}.txt')
    return metrics, describe(metrics, self.num_samples)

  def write(self, samples: np.ndarray, name: str) -> str:
    path = os.path.join(self.workdir, 'samples', name)
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, 'w', encoding='utf-8') as f:
        f.write('\n\n'.join(self.exp.data.decode(row) for row in samples) + '\n')
    return path


def describe(metrics: dict[str, float], num_samples: int) -> str:
  parts = []
  if 'eval/bpc' in metrics:
    parts.append(f'held-out {metrics["eval/bpc"]:.4f} bits per character')
  blocks = [f'{v:.3f}' for k, v in sorted(metrics.items()) if k.startswith('eval/ce_block')]
  if blocks:
    parts.append(f'held-out denoising cross-entropy per block {", ".join(blocks)} nats')
  if 'eval/gen_ppl' in metrics:
    parts.append(f'sample perplexity {metrics["eval/gen_ppl"]:.3f}')
  parts.append(f'sample entropy {metrics["eval/sample_entropy"]:.3f} bits ({num_samples} samples)')
  return '; '.join(parts)


def make_evaluator(exp: Experiment, workdir: str):
  """The evaluator of a language run, its scorer (for 'ar_dblock') loaded and checked up front."""
  scorer = load_scorer(exp) if exp.config.model.kind == 'ar_dblock' else None
  evaluator = LanguageEvaluator(exp, workdir, scorer)
  return evaluator


def write_samples(exp: Experiment, workdir: str, params, step: int, num: int, seed: int) -> str:
  """--mode=sample: `num` samples of a checkpoint, printed and written to WORKDIR/samples/sample_<step>.txt."""
  evaluator = LanguageEvaluator(exp, workdir)
  samples = evaluator.samples(params, num, jax.random.key(seed))
  path = evaluator.write(samples, f'sample_{step}.txt')
  for row in samples:
    print(exp.data.decode(row).replace('\n', '\\n'))
    print('-' * 40)
  logging.info('Wrote %d samples of checkpoint step %d to %s (sample entropy %.3f bits).', num, step, path,
               sample_entropy(samples))
  return path

