"""One run of each text config end to end (shrunk: a small slice of the CPython corpus as a file, tiny models):
train, evaluate, sample (tasks/, configs/text_*). The language settings' errors: tests/test_config.py (config.validate)
and tests/test_language.py (the scorer run)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from diffblocks_jax import config as config_lib
from helpers import LONG_TESTS, override, run_cli, shipped_config


def corpus_file(tmp_path) -> tuple[str, float]:
  """(path, bits of a uniform guess): the first 24k characters of the CPython corpus as a UTF-8 file. With 5 %
  held out and windows of 16: 1,425 training windows, 11 steps of 128 per epoch."""
  from diffblocks_jax.data import text  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'corpus.txt'
  corpus = text.pydoc_text()[:24_000]
  path.write_text(corpus, encoding='utf-8')
  return str(path), float(np.log2(len(set(corpus))))


def shrunk(name: str, corpus: str, **fields):
  """The shipped text config `name` on `corpus` in windows of 16, its model cut to width 16, one short epoch;
  `fields` (dotted, '__' for '.') on top."""
  config = shipped_config(name)
  config.data.source, config.data.path, config.data.seq_len = 'text', corpus, 16
  config.data.test_fraction = 0.05
  m = config.model
  m.hidden_size, m.num_heads, m.num_layers = 16, 2, m.num_blocks if m.kind.endswith('_dblock') else 2
  config.train.batch_size, config.train.num_epochs = 128, 1
  config.train.steps_per_call, config.train.log_every_steps, config.train.checkpoint_every_steps = 5, 5, 10
  config.train.eval_every_epochs = 0.0
  config.eval.num_samples, config.eval.num_inference_steps, config.eval.elbo_draws = 4, 0, 1
  return override(config, **fields)


@pytest.mark.slow
def test_masked_configs_train_and_evaluate(tmp_path):
  from diffblocks_jax.training import evaluation, train  # pylint: disable=g-import-not-at-top
  corpus, uniform = corpus_file(tmp_path)
  results = {}
  # The end-to-end baseline shares the task's code: with DIFFBLOCKS_LONG_TESTS=1 only (time budget).
  for name in (('text_mdm.py',) if LONG_TESTS else ()) + ('text_mdm_dblock.py', 'text8_mdm_dblock.py'):
    workdir = str(tmp_path / name)
    # text8's blocks live in host memory between their steps: evaluation must bring them back to the device.
    config = shrunk(name, corpus, train__offload_idle_blocks=name.startswith('text8'))
    results[name] = train.train_and_evaluate(config, workdir)
    blocks = config_lib.num_blocks(config)
    assert results[name]['step'] == 11 * blocks  # One epoch, x B for DiffusionBlocks.
    terms = [results[name][f'eval/bpc_block{b}'] for b in range(blocks)] if blocks > 1 else []
    if terms:  # The per-block terms are the bound's pieces: they add up to it.
      assert sum(terms) == pytest.approx(results[name]['eval/bpc'], rel=1e-5)
    # The untrained bound is a uniform guess (test_language); a few steps already beat it.
    assert 0 < results[name]['eval/bpc'] < uniform
    assert os.path.getsize(os.path.join(workdir, 'samples', f'step_{11 * blocks}.txt')) > 0
  # --mode=eval on the finished run: the same bound again (other draws of t), from the checkpoint. (Resuming is the
  # loop's, tested on images: tests/test_resume.py.)
  workdir = str(tmp_path / 'text_mdm_dblock.py')
  evaluated, _ = evaluation.evaluate(shrunk('text_mdm_dblock.py', corpus), workdir)
  assert evaluated['step'] == 33 and 0 < evaluated['eval/bpc'] < uniform


def rescored(workdir: str, scorer_workdir: str) -> tuple[float, float]:
  """The reference for a finished run's eval/gen_ppl and eval/sample_entropy: its evaluation samples drawn again
  from its checkpoint (the evaluator's own key), their entropy, and exp(their mean next-character NLL) under the
  checkpoint of the 'ar' run in `scorer_workdir`, restored here rather than through the run's evaluator."""
  from diffblocks_jax.tasks import autoregressive, language  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.training import experiment  # pylint: disable=g-import-not-at-top
  exp, state = experiment.load_trained(config_lib.load_workdir(workdir), workdir)
  samples = autoregressive.make_evaluator(exp, workdir).samples(state.params)
  judge, judge_state = experiment.load_trained(config_lib.load_workdir(scorer_workdir), scorer_workdir)
  nll = language.Scorer(judge.graphdef, autoregressive.token_nll, judge_state.params).mean_nll(samples, 64)
  return math.exp(nll), language.sample_entropy(samples)


@pytest.mark.slow
def test_autoregressive_configs_train_score_and_sample(tmp_path):
  """'ar' first (the scorer), then 'ar_dblock' scored by it; --mode=sample through the CLI prints samples."""
  from diffblocks_jax.training import train  # pylint: disable=g-import-not-at-top
  corpus, uniform = corpus_file(tmp_path)
  scorer = str(tmp_path / 'ar')
  baseline = train.train_and_evaluate(shrunk('text_ar.py', corpus), scorer)
  assert baseline['step'] == 11 and 0 < baseline['eval/bpc'] < uniform
  # The baseline scores its own samples.
  figures = lambda r: (r['eval/gen_ppl'], r['eval/sample_entropy'])
  assert figures(baseline) == pytest.approx(rescored(scorer, scorer), rel=1e-5), baseline
  assert baseline['eval/sample_entropy'] > 0  # Not collapsed onto one character.
  workdir = str(tmp_path / 'ar_dblock')
  result = train.train_and_evaluate(shrunk('text_ar_dblock.py', corpus, eval__scorer_workdir=scorer), workdir)
  assert result['step'] == 44 and 'eval/bpc' not in result
  assert figures(result) == pytest.approx(rescored(workdir, scorer), rel=1e-5), result
  assert result['eval/sample_entropy'] > 0
  # Each block's held-out denoising cross-entropy is below the untrained model's: its head starts at zero, so
  # every block starts at the uniform guess, ln V nats.
  vocab = round(2**uniform)
  assert all(result[f'eval/ce_block{b}'] < math.log(vocab) for b in range(4)), (result, vocab)
  out = run_cli(f'--workdir={workdir}', '--mode=sample', '--num_samples=3')
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.count('-' * 40) == 3
  assert os.path.exists(os.path.join(workdir, 'samples', 'sample_44.txt'))


@pytest.mark.slow
@pytest.mark.long  # Opt-in (time budget): the default suite trains the paper's recipe above.
def test_the_tuned_autoregressive_recipe_trains_and_scores(tmp_path):
  """text_ar_dblock.py:recipe=tuned ('matched' plan, ancestral sampler), scored by a shrunk 'ar' run."""
  from diffblocks_jax.training import train  # pylint: disable=g-import-not-at-top
  corpus, _ = corpus_file(tmp_path)
  scorer = str(tmp_path / 'ar')
  train.train_and_evaluate(shrunk('text_ar.py', corpus), scorer)
  tuned_workdir = str(tmp_path / 'ar_dblock_tuned')
  tuned = train.train_and_evaluate(shrunk('text_ar_dblock.py:recipe=tuned', corpus, eval__scorer_workdir=scorer),
                                   tuned_workdir)
  figures = (tuned['eval/gen_ppl'], tuned['eval/sample_entropy'])
  assert tuned['step'] == 44 and figures == pytest.approx(rescored(tuned_workdir, scorer), rel=1e-5), tuned
  assert tuned['eval/sample_entropy'] > 0


# Opt-in (DIFFBLOCKS_LONG_TESTS=1): the five shipped small text configs, unchanged, about an hour on 2 cores.
@pytest.mark.slow
@pytest.mark.long
def test_text_configs_hold_what_was_measured(tmp_path):
  """At equal layer-updates: the masked DiffusionBlocks model's bound is at most 0.15 bits per character above the
  end-to-end model's (the issue's bar; measured 0.39 below). The autoregressive DiffusionBlocks samples'
  perplexity under the end-to-end model, against the end-to-end model's own samples': with the paper's sampler
  2.4-2.9x, which misses the issue's 2x, so pinned here is what held, below 3.5x; with
  text_ar_dblock.py:recipe=tuned ('matched' noise plan, ancestral sampler) 1.4x, within the issue's 2x (README).
  Neither model collapsed (sample entropy above 3 bits; held-out windows have 3.45)."""
  from diffblocks_jax.training import train  # pylint: disable=g-import-not-at-top
  results = {}
  for name in ('text_mdm', 'text_mdm_dblock', 'text_ar', 'text_ar_dblock', 'text_ar_dblock_tuned'):
    file = 'text_ar_dblock.py:recipe=tuned' if name == 'text_ar_dblock_tuned' else f'{name}.py'
    config = shipped_config(file)
    config.eval.scorer_workdir = str(tmp_path / 'text_ar')
    results[name] = train.train_and_evaluate(config, str(tmp_path / name))
  assert results['text_mdm_dblock']['eval/bpc'] <= results['text_mdm']['eval/bpc'] + 0.15, results
  assert results['text_ar_dblock']['eval/gen_ppl'] <= 3.5 * results['text_ar']['eval/gen_ppl'], results
  assert results['text_ar_dblock_tuned']['eval/gen_ppl'] <= 2.0 * results['text_ar']['eval/gen_ppl'], results
  assert min(r['eval/sample_entropy'] for r in results.values()) > 3.0, results
