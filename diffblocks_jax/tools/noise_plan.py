"""The noise plan of a DiffusionBlocks config: where each block trains vs. where the sampler calls it, and a
sweep of P_mean candidates scored on a validation split carved from TRAIN (the test split is never loaded).

  python -m diffblocks_jax.tools.noise_plan --config=configs/digits_dblock_tuned.py
  python -m diffblocks_jax.tools.noise_plan --config=configs/digits_dblock_tuned.py \\
      --sweep=-1.2,0,0.5,matched,1 --seeds=0,1 --epochs=100 \\
      --variants=diffusion.loss_weighting=per_sample,model.label_token=concat,eval.normalized_embeddings=True

Without --sweep it prints the plan (configured and 'matched' P_mean) and writes the figure. With it, every
candidate P_mean trains once per seed on the validation split (`data.validation_fraction`), one run after
another in a temporary workdir; then each --variants override is tried on top of the best candidate. The
best mean validation accuracy wins; ties go to the earlier candidate.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import tempfile
import time
from typing import Callable

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diffblocks_jax import config as config_lib
from diffblocks_jax.core import partitions
from diffblocks_jax.tasks import classification


def _define_flags() -> None:
  """Flags exist only when this runs as a command (importing it next to another tool's flags is safe)."""
  config_flags.DEFINE_config_file('config', None, 'A DiffusionBlocks config file.', lock_config=True)
  flags.DEFINE_list('sweep', [], "P_mean candidates: numbers, 'matched' or 'release' (the config's).")
  flags.DEFINE_list('variants', [], 'field=value overrides, each tried alone on the best candidate; eval.* '
                    'overrides re-score the best candidate\'s runs without training.')
  flags.DEFINE_list('seeds', ['0'], 'Seeds per candidate (config.seed).')
  flags.DEFINE_integer('epochs', 0, "config.train.num_epochs for the sweep (0 = the config's).")
  flags.DEFINE_float('validation_fraction', 0.2, 'Share of TRAIN held out for scoring (> 0).')
  flags.DEFINE_string('workdir', '', 'Where the sweep trains (default: a temporary folder).')
  flags.DEFINE_string('figure', '', 'Write the noise-plan figure here (.png; needs matplotlib).')


READABLE_SIGMA = 10.0  # Above it the noisy label says next to nothing (diffusion.noise_plan's column).


# ------------------------------------------------------------------------------------------ the plan

def resolved_edm(config, p_mean=None) -> partitions.EDM:
  """The config's EDM, with P_mean replaced by a candidate: a number, 'matched' or 'release'/None."""
  edm = partitions.EDM.from_config(config.diffusion)
  if p_mean in (None, 'release'):
    return edm
  if p_mean == 'matched':
    return partitions.resolve_noise_plan(edm, 'matched')
  return dataclasses.replace(edm, p_mean=float(p_mean))


def plan_report(config, p_mean=None) -> list[str]:
  """The header (P_mean, how far σ_max lies above it) and `diffusion.noise_plan`'s line per block."""
  edm = resolved_edm(config, p_mean)
  num_blocks = config_lib.num_blocks(config)
  steps = classification.inference_steps(config)
  reach = (math.log(edm.sigma_max) - edm.p_mean) / edm.p_std
  tail = float(1.0 - edm.cdf(edm.sigma_max)) if reach < 38 else 0.0
  head = (f'P_mean {edm.p_mean:.4f}, P_std {edm.p_std:g}, B={num_blocks}, N={steps}: the sampler starts at '
          f'σ_max = {edm.sigma_max:g}, {reach:.2f} P_std above P_mean (log-normal mass beyond it {tail:.2g})')
  return [head] + partitions.noise_plan(num_blocks, steps, edm, config.diffusion.overlap)


def write_figure(config, path: str, candidates=('release', 'matched')) -> str:
  """Training σ density of each block (in ln σ) against the sampler's σ, one panel per candidate P_mean."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.tools import diagnostics  # pylint: disable=g-import-not-at-top
  num_blocks = config_lib.num_blocks(config)
  steps = classification.inference_steps(config)
  fig, axes = plt.subplots(1, len(candidates), figsize=(5.2 * len(candidates), 3.2), sharey=True, squeeze=False)
  for ax, candidate in zip(axes[0], candidates):
    edm = resolved_edm(config, candidate)
    sigmas = np.exp(np.linspace(np.log(edm.sigma_min), np.log(edm.sigma_max), 600))
    density = diagnostics.training_sigma_density(sigmas, num_blocks, edm, config.diffusion.overlap)
    for block in range(num_blocks):
      line, = ax.plot(sigmas, density[block], label=f'block {block}')
      for s in partitions.inference_sigmas(steps, edm):
        if partitions.route_static(s, num_blocks, edm) == block:
          ax.axvline(s, color=line.get_color(), linestyle=':', linewidth=1.5)
    ax.axvspan(READABLE_SIGMA, edm.sigma_max, color='0.9', zorder=0)
    ax.set_xscale('log')
    ax.set_xlabel('σ (dotted: where the sampler calls each block; grey: σ > 10)')
    named = f'{candidate}: ' if candidate in ('release', 'matched') else ''
    ax.set_title(f'{named}P_mean {edm.p_mean:.2f}')
  axes[0][0].set_ylabel('training density in ln σ')
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------------------- the sweep

def validation_config(config, *, seed: int, fraction: float, epochs: int = 0, p_mean=None,
                      overrides: dict | None = None):
  """A copy of `config` that trains on TRAIN minus a held-out share and evaluates on that share only."""
  if not 0 < fraction < 1:
    raise ValueError(f'the sweep scores on a validation split: validation_fraction must lie in (0, 1), got '
                     f'{fraction}')
  c = config.copy_and_resolve_references()
  c.data.validation_fraction = float(fraction)
  c.seed = int(seed)
  if epochs:
    c.train.num_epochs = int(epochs)
  c.train.eval_every_epochs = 0.0  # One score, at the end.
  c.train.checkpoint_every_steps = 10**9  # Only the final save.
  if p_mean == 'matched':
    c.diffusion.noise_plan = 'matched'
  elif p_mean not in (None, 'release'):
    c.diffusion.noise_plan, c.diffusion.p_mean = 'release', float(p_mean)
  for field, value in (overrides or {}).items():
    *path, leaf = field.split('.')
    node = c
    for part in path:
      node = node[part]
    old = node[leaf]
    node[leaf] = value in (True, 'True', 'true', '1') if isinstance(old, bool) else type(old)(value)
  return c


def parse_override(text: str) -> dict:
  field, sep, value = text.partition('=')
  if not sep:
    raise ValueError(f'--variants entries are field=value, got {text!r}')
  return {field.strip(): value.strip()}


def sweep(config, candidates, *, seeds, fraction: float = 0.2, epochs: int = 0, workdir: str,
          train_fn: Callable | None = None, eval_fn: Callable | None = None,
          log: Callable = functools.partial(print, flush=True)):
  """Validation accuracy per candidate: {label: [accuracy per seed]}.

  Candidates are (label, p_mean, overrides) or (label, p_mean, overrides, trained_label): the last form
  re-scores the runs of `trained_label` under the overrides (eval.* settings) instead of training.
  `train_fn(config, workdir)` and `eval_fn(config, workdir)` return metrics with 'eval/accuracy'; they default
  to `train.train_and_evaluate` and `evaluation.evaluate`'s metrics.
  """
  if train_fn is None:
    from diffblocks_jax.training import train  # pylint: disable=g-import-not-at-top
    train_fn = train.train_and_evaluate
  if eval_fn is None:
    from diffblocks_jax.training import evaluation  # pylint: disable=g-import-not-at-top
    eval_fn = lambda c, w: evaluation.evaluate(c, w)[0]
  scores = {}
  for label, p_mean, overrides, *trained in candidates:
    scores[label] = []
    for seed in seeds:
      c = validation_config(config, seed=seed, fraction=fraction, epochs=epochs, p_mean=p_mean,
                            overrides=overrides)
      start = time.time()
      if trained and trained[0]:
        accuracy = float(eval_fn(c, _run_dir(workdir, trained[0], seed))['eval/accuracy'])
      else:
        accuracy = float(train_fn(c, _run_dir(workdir, label, seed))['eval/accuracy'])
      scores[label].append(accuracy)
      log(f'  {label:<48} seed {seed}: validation accuracy {100 * accuracy:.1f} % ({time.time() - start:.0f} s)')
  return scores


def _run_dir(workdir: str, label: str, seed: int) -> str:
  return os.path.join(workdir, ''.join(ch if ch.isalnum() or ch in '.-' else '_' for ch in label) + f'_seed{seed}')


def best(scores: dict) -> str:
  """The label with the highest mean (the first on ties)."""
  return max(scores, key=lambda label: (np.mean(scores[label]), -list(scores).index(label)))


def summary(scores: dict) -> list[str]:
  return [f'{label:<40} {100 * np.mean(a):5.1f} ± {100 * np.std(a):.1f} %  ({len(a)} seeds)'
          for label, a in scores.items()]


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  if config is None or config.model.kind != 'dblock':
    sys.exit('--config must be a DiffusionBlocks classification config (model.kind dblock)')
  for candidate in ('release', 'matched'):
    print(f'--- {candidate}')
    print('\n'.join(plan_report(config, candidate)))
  if f.figure:
    print('figure:', write_figure(config, f.figure))
  if not f.sweep:
    return
  seeds = [int(s) for s in f.seeds]
  workdir = f.workdir or tempfile.mkdtemp(prefix='noise_plan_sweep_')
  label_of = lambda p: p if p in ('matched', 'release') else f'P_mean {float(p):g}'
  candidates = [(label_of(p), p, {}) for p in f.sweep]
  print(f'--- sweep on a validation split ({f.validation_fraction:.0%} of train; the test split is not loaded), '
        f'workdir {workdir}', flush=True)
  common = dict(seeds=seeds, fraction=f.validation_fraction, epochs=f.epochs, workdir=workdir)
  scores = sweep(config, candidates, **common)
  chosen = best(scores)
  if f.variants:
    p_mean = {c[0]: c[1] for c in candidates}[chosen]
    variants = []
    for text in f.variants:
      override = parse_override(text)
      eval_only = all(field.startswith('eval.') for field in override)
      variants.append((f'{chosen} + {text}', p_mean, override, chosen if eval_only else None))
    scores.update(sweep(config, variants, **common))
  print('--- validation accuracy (mean ± std over seeds)')
  print('\n'.join(summary(scores)))
  print(f'chosen: {best(scores)}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
