"""Evaluation of language models on held-out text, and their samples: what the masked-diffusion and the
autoregressive tasks share (tasks/masked_lm.py and tasks/autoregressive.py say what is trained).

  masked diffusion   eval/bpc: the bound on the held-out windows in bits per character (per byte for
                     data.vocab='byte'), each t routed to the block owning it; eval/bpc_block{b}: block b's
                     slice of the bound (they add up to eval/bpc).
  autoregressive,    eval/bpc: next-token cross-entropy in bits; eval/gen_ppl and eval/sample_entropy of its
  end to end         own samples (scored by itself).
  autoregressive     eval/ce_block{b}: each block's held-out denoising cross-entropy (nats) on its own σ;
  DiffusionBlocks    eval/gen_ppl: perplexity of its samples under the end-to-end run of eval.scorer_workdir;
                     eval/sample_entropy.

eval/sample_entropy is the entropy (bits) of each sample's own token frequencies (characters for
data.vocab='char'), averaged over samples: a model that collapses to repeating a few tokens scores low while its
perplexity may look good. eval/gen_ppl is per token; held-out bits are per character whatever the vocabulary
(`bits_per_char`).
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

from diffblocks_jax.data import dataset
from diffblocks_jax.tasks import registry

DEFAULT_NUM_SAMPLES = 64  # eval.num_samples = 0.
BITS_PER_NAT = 1.0 / math.log(2.0)


def bits_per_char(nats_per_token, data) -> float:
  """Nats per held-out token -> bits per character of the held-out text (per byte for data.vocab='byte'), so that
  runs with a character vocabulary and with a tokenizer compare (`TextDataset.tokens_per_char`)."""
  return float(nats_per_token) * BITS_PER_NAT * data.tokens_per_char


def sample_entropy(tokens: np.ndarray) -> float:
  """Mean over samples of the entropy (bits) of the sample's token frequencies."""
  out = []
  for row in np.asarray(tokens):
    p = np.bincount(row) / len(row)
    p = p[p > 0]
    out.append(float(-(p * np.log2(p)).sum()))
  return float(np.mean(out))


def mean_over_rows(fn, tokens: np.ndarray, batch_size: int) -> np.ndarray:
  """Mean over all rows of `fn(batch, index) -> (batch, ...)`, the padding left out."""
  total, count = 0.0, 0
  for index, (batch, real) in enumerate(dataset.padded_batches(tokens, min(batch_size, len(tokens)))):
    out = np.asarray(fn(batch, index), np.float64)[:real]
    total, count = total + out.sum(axis=0), count + real
  return total / count


class Scorer:
  """An end-to-end autoregressive model: −log p of token windows, for bits per character and the perplexity of
  samples. `token_nll(model, tokens) -> (N, L)` is its task's; `params` None: the caller passes them (the baseline
  scores itself with the parameters being evaluated)."""

  def __init__(self, graphdef, token_nll, params=None, workdir: str = ''):
    self.params, self.workdir = params, workdir
    self._nll = jax.jit(lambda p, x: token_nll(nnx.merge(graphdef, p), x).mean(-1))

  def mean_nll(self, tokens: np.ndarray, batch_size: int, params=None) -> float:
    """Nats per token, averaged over every token of `tokens` (N, L)."""
    params = self.params if params is None else params
    return float(mean_over_rows(lambda x, _: self._nll(params, x), tokens, batch_size))

  def perplexity(self, tokens: np.ndarray, batch_size: int, params=None) -> float:
    return float(np.exp(self.mean_nll(tokens, batch_size, params)))


def load_scorer(exp, token_nll) -> Scorer | None:
  """The end-to-end autoregressive run of config.eval.scorer_workdir (same data), checked up front; None when
  unset."""
  path = exp.config.eval.scorer_workdir
  baselines = registry.kinds_where(lambda k: k.task == 'autoregressive' and not k.blockwise)
  if not path:
    logging.warning(f'config.eval.scorer_workdir is empty: no eval/gen_ppl. Train the end-to-end autoregressive '
                    f'model (model.kind {" or ".join(map(repr, baselines))}) on the same data first (e.g. '
                    'configs/text_ar.py) and pass its workdir.')
    return None
  kind_error = lambda judge: (None if judge.model.kind in baselines else f' holds a {judge.model.kind!r} run; the '
                              'scorer is the end-to-end autoregressive model (model.kind '
                              f'{" or ".join(map(repr, baselines))})')
  _, scorer_exp, state = exp.load_judge(
      'scorer_workdir', kind_error=kind_error, why='its perplexities would not compare',
      data_fields=('source', 'name', 'path', 'vocab', 'tokenizer', 'vocab_size', 'seq_len', 'test_fraction',
                   'train_split', 'test_split'))
  logging.info('Sample perplexity: the autoregressive model of %s (checkpoint step %d).', path, int(state.step))
  return Scorer(scorer_exp.graphdef, token_nll, state.params, path)


class LanguageEvaluator:
  """(params, step) -> (metrics, log line) of a language run; writes its samples.

  `sample_fn(params, key, num) -> (num, L)` tokens is the task's sampler; `held_out(params, tokens, key, batch)`
  its figures on the held-out windows; `scorer` judges the samples (eval/gen_ppl; its `params` None: the
  parameters being evaluated).
  """

  def __init__(self, exp, workdir: str, *, sample_fn, held_out=None, scorer: Scorer | None = None):
    self.exp, self.workdir, self.held_out, self.scorer = exp, workdir, held_out, scorer
    self.num_samples = exp.config.eval.num_samples or DEFAULT_NUM_SAMPLES
    self.key = exp.key('eval')
    self._sample = jax.jit(sample_fn, static_argnums=2)

  def samples(self, params, num: int | None = None, key: jax.Array | None = None) -> np.ndarray:
    params = self.exp.on_device(params)  # Offloaded blocks (train.offload_idle_blocks): inference needs them all.
    return np.asarray(self._sample(params, self.key if key is None else key, num or self.num_samples))

  def __call__(self, params, step: int) -> tuple[dict[str, float], str]:
    params = self.exp.on_device(params)
    batch = self.exp.config.eval.batch_size
    metrics: dict[str, Any] = {}
    if self.held_out is not None:
      metrics.update(self.held_out(params, self.exp.data.test_tokens, jax.random.fold_in(self.key, 1), batch))
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


def write_samples(exp, workdir: str, params, step: int, num: int, sample_fn) -> str:
  """--mode=sample: `num` samples of a checkpoint, printed and written to WORKDIR/samples/sample_<step>.txt."""
  evaluator = LanguageEvaluator(exp, workdir, sample_fn=sample_fn)
  samples = evaluator.samples(params, num, exp.key('samples'))
  path = evaluator.write(samples, f'sample_{step}.txt')
  for row in samples:
    print(exp.data.decode(row).replace('\n', '\\n'))
    print('-' * 40)
  return f'{num} samples in {path} (sample entropy {sample_entropy(samples):.3f} bits)'
