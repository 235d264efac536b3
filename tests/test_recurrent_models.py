"""Recurrent depth (models/recurrent.py, paper Table 5): the Huginn-style baseline's depth draw, truncated
backpropagation and evaluation depth; the weight-tied DiffusionBlocks form's one block per sampler step; the
refusals of config.model.recurrent; the training FLOPs estimate; one tiny run train → resume → --mode=eval."""

from __future__ import annotations

import json
import sys

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from diffblocks_jax import config as config_lib
from diffblocks_jax import models
from diffblocks_jax.models import recurrent, text
from diffblocks_jax.tasks import autoregressive, registry
from helpers import ROOT, override, run_cli, shipped_config, tiny_config

DIMS = dict(vocab_size=11, seq_len=8)
DEPTH = dict(mean_depth=6.0, backprop_depth=2, min_depth=1, depth_distribution='fixed', depth_sigma=0.5)


def rd_config(**depth):
  """A tiny 'rd': 1 prelude layer, a 1-layer recurrent block, 1 coda layer; r fixed at 6 unless `depth` says."""
  config = tiny_config('rd', data='text', model__num_layers=1)
  config.model.recurrent = dict(prelude_layers=1, coda_layers=1, **{**DEPTH, **depth})
  return config


def rd_dblock_config(**overrides):
  """A tiny 'rd_dblock': B = 3 noise slices served by one 1-layer block, 1 prelude and 1 coda layer."""
  config = tiny_config('rd_dblock', data='text', model__num_layers=3, model__num_blocks=3, model__weight_tied=True)
  config.model.recurrent = dict(prelude_layers=1, coda_layers=1)
  return override(config, **overrides)


def jittered(model):
  """The model with every parameter drawn afresh (zero-initialised matrices would hide unrolls)."""
  graphdef, params = models.split(model)
  keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(params))))
  params = jax.tree.map(lambda a: 0.3 * jax.random.normal(next(keys), a.shape, a.dtype), params)
  return graphdef, params


def reference_logits(model, tokens, depth: int, truncated_after: int = 0):
  """Logits from a plain Python loop over the unrolls (no while loop, scan or masks): `depth` unrolls, the first
  `truncated_after` of them under stop_gradient (parameters, prelude output and state)."""
  graphdef, state = nnx.split(model.core)
  frozen = nnx.merge(graphdef, jax.lax.stop_gradient(state))

  def layers(x, keys, cond, *, mask, positions):
    e = model.prelude(x, keys, cond, mask=mask, positions=positions)
    s = jnp.zeros_like(e)
    for i in range(depth):
      if i < truncated_after:
        s = jax.lax.stop_gradient(frozen(jax.lax.stop_gradient(e), s, keys, mask=mask, positions=positions))
      else:
        s = model.core(e, s, keys, mask=mask, positions=positions)
    return model.coda(s, keys, cond, mask=mask, positions=positions)

  return model.parts(layers, tokens)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 8)), jnp.int32)


def test_shapes_and_one_row_of_block_parameters():
  config = rd_config()
  config_lib.validate(config)
  model = models.build(config.model, **DIMS)
  assert model.logits(TOKENS).shape == (2, 8, 11) and model.eval_depth == 6
  assert model.logits(TOKENS, key=jax.random.key(0)).shape == (2, 8, 11)
  config = rd_dblock_config()
  config_lib.validate(config)
  model = models.build(config.model, sigma_data=0.5, **DIMS)
  assert model.num_blocks == 3 and model.num_rows == 1
  _, params = models.split(model)
  assert {a.shape[0] for a in jax.tree.leaves(params['blocks'])} == {1}  # One row, whatever B.
  assert set(params['shared']) >= {'prelude', 'coda', 'token_embed', 'head'}
  z = jnp.zeros((2, 8, 16))
  assert model.denoise(TOKENS, z, jnp.ones((2,)), 2).shape == (2, 8, 11)


@pytest.mark.parametrize('distribution', ['lognormal_poisson', 'poisson'])
def test_the_depth_draw_never_gives_zero_and_has_the_configured_mean(distribution):
  rec = ml_collections.ConfigDict(dict(DEPTH, mean_depth=8.0, depth_distribution=distribution))
  draws = np.asarray(jax.vmap(lambda k: recurrent.draw_depth(k, rec))(jax.random.split(jax.random.key(0), 20000)))
  assert draws.min() >= 1
  assert abs(draws.mean() - 8.0) < 0.15, draws.mean()  # Standard error ~0.03 (log-normal-Poisson: variance ~25).
  assert len(np.unique(draws)) > 5  # A distribution, not a constant.


@pytest.mark.slow  # Compiles the while loop and scan of the unrolls several times (quick tier budget).
def test_truncation_stops_gradients_before_the_last_k_unrolls():
  """With r = 6 and k = 2 the gradients are those of a plain loop whose first 4 unrolls are constants; with k = r
  those of full backpropagation; and the two differ (the truncation changes the gradient)."""
  _, params = jittered(models.build(rd_config().model, **DIMS))
  loss = lambda p, graphdef, logits: jnp.mean(logits(nnx.merge(graphdef, p)) ** 2)
  key = jax.random.key(3)  # 'fixed': r = 6 whatever the key.
  grads = {}
  for k in (2, 6):
    graphdef = nnx.split(models.build(rd_config(backprop_depth=k).model, **DIMS))[0]  # k is static: in the graphdef.
    grads[k] = jax.grad(loss)(params, graphdef, lambda m: m.logits(TOKENS, key=key))
    expected = jax.grad(loss)(params, graphdef, lambda m, k=k: reference_logits(m, TOKENS, 6, truncated_after=6 - k))
    chex.assert_trees_all_close(grads[k], expected, atol=1e-5, rtol=1e-4)
  difference = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), grads[2]['core'], grads[6]['core'])
  assert max(jax.tree.leaves(difference)) > 1e-4


@pytest.mark.slow  # Compiles the while loop and scan of the unrolls several times (quick tier budget).
def test_evaluation_runs_a_fixed_depth_set_by_eval_num_inference_steps():
  config = rd_config(depth_distribution='lognormal_poisson', mean_depth=4.4)
  graphdef, params = jittered(models.build(config.model, **DIMS))
  model = nnx.merge(graphdef, params)
  assert model.eval_depth == 4  # The mean depth, rounded: eval.num_inference_steps = 0.
  chex.assert_trees_all_close(model.logits(TOKENS), reference_logits(model, TOKENS, 4), atol=1e-5)
  at_seven = autoregressive.at_eval_depth(nnx.merge(graphdef, params), override(config, eval__num_inference_steps=7))
  assert at_seven.eval_depth == 7
  chex.assert_trees_all_close(at_seven.logits(TOKENS), reference_logits(model, TOKENS, 7), atol=1e-5)
  assert float(jnp.abs(at_seven.logits(TOKENS) - model.logits(TOKENS)).max()) > 1e-4
  # Training draws its depth: two keys, two depths (log-normal-Poisson around 4.4), different logits.
  drawn = [model.logits(TOKENS, key=jax.random.key(i)) for i in range(6)]
  assert max(float(jnp.abs(d - drawn[0]).max()) for d in drawn) > 1e-4


@pytest.mark.parametrize('steps', [1, 3, 7])
def test_rd_dblock_sampling_runs_the_one_block_once_per_sampler_step(steps, monkeypatch):
  """N sampler steps trace prelude → block → coda N times (3 layers each), for any N, B = 3 slices."""
  config = rd_dblock_config(eval__num_inference_steps=steps, eval__solver='ancestral')
  model = models.build(config.model, sigma_data=0.5, **DIMS)
  graphdef, params = models.split(model)
  calls = []
  layer_call = text.LlamaLayer.__call__
  monkeypatch.setattr(text.LlamaLayer, '__call__', lambda self, *a, **k: calls.append(1) or layer_call(self, *a, **k))
  data = type('Data', (), dict(seq_len=8))
  sample = autoregressive.make_sample_fn(graphdef, config, data)
  out = jax.eval_shape(lambda p: sample(p, jax.random.key(0), 2), params)  # Traced, not run.
  assert out.shape == (2, 8) and len(calls) == 3 * steps


@pytest.mark.parametrize('kind, fields, says', [
    ('rd', dict(backprop_depth=8), 'config.model.recurrent.backprop_depth=8 must be <= config.model.recurrent.'
     'mean_depth=6.0'),
    ('rd', dict(min_depth=0), 'config.model.recurrent.min_depth=0 must be an integer >= 1: the depth distribution '
     'must not draw 0'),
    ('rd', dict(depth_distribution='poisson', min_depth=6), 'config.model.recurrent.mean_depth=6.0 must exceed '
     'min_depth=6'),
    ('rd', dict(depth_distribution='geometric'), "config.model.recurrent.depth_distribution='geometric' is not"),
    ('rd', dict(mean_depth=None), 'config.model.recurrent.mean_depth is missing'),
    ('rd', None, 'config.model.recurrent.prelude_layers is missing'),
    ('rd_dblock', dict(coda_layers=None), 'config.model.recurrent.coda_layers is missing'),
    ('rd_dblock', dict(prelude_layers=-1), 'config.model.recurrent.prelude_layers=-1 must be an integer >= 0'),
    ('rd_dblock', dict(weight_tied=False), "config.model.weight_tied=False: model.kind='rd_dblock' runs ONE"),
])
def test_refusals_name_the_field_and_the_rule(kind, fields, says):
  config = rd_config() if kind == 'rd' else rd_dblock_config()
  if fields is None:
    del config.model['recurrent']
  elif 'weight_tied' in fields:
    config.model.weight_tied = fields['weight_tied']
  else:
    for name, value in fields.items():
      if value is None:
        del config.model.recurrent[name]
      else:
        config.model.recurrent[name] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  [line] = [l for l in str(e.value).splitlines() if 'recurrent' in l or 'weight_tied' in l]
  assert says in line


def test_an_inference_depth_below_one_is_refused():
  with pytest.raises(config_lib.ConfigError, match=r'config.eval.num_inference_steps=-1 must be >= 0'):
    config_lib.validate(override(rd_config(), eval__num_inference_steps=-1))


def test_overrides_reach_the_sub_dict_and_a_saved_config_round_trips(tmp_path, monkeypatch):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=values, lock_config=True)
  argv = ['prog', f'--config={ROOT / "configs" / "text_rd.py"}', '--config.model.recurrent.mean_depth=16',
          '--config.model.recurrent.backprop_depth=8']
  monkeypatch.setattr(sys, 'argv', argv)  # ml_collections reads the overrides from sys.argv, as under main.py.
  values(argv)
  config = values.config
  assert (config.model.recurrent.mean_depth, config.model.recurrent.backprop_depth) == (16.0, 8)
  config_lib.validate(config)
  (tmp_path / 'config.json').write_text(config.to_json_best_effort())
  loaded = config_lib.load_workdir(str(tmp_path))
  assert loaded.model.recurrent.to_dict() == config.model.recurrent.to_dict()
  config_lib.validate(loaded)
  assert not config_lib.changed_fields(json.loads((tmp_path / 'config.json').read_text()), loaded)


def test_the_shipped_text_pair_spends_no_more_training_flops_on_diffusion_blocks():
  """The budget configs/text_rd*.py state: DiffusionBlocks' epochs cost no more than the baseline's."""
  cost = {}
  for name in ('text_rd.py', 'text_rd_dblock.py'):
    config = shipped_config(name)
    cls = registry.model_class(config.model.kind)
    per_step = cls.train_flops_per_step(config.model, vocab_size=103, seq_len=config.data.seq_len,
                                        batch_size=config.train.batch_size)
    cost[name] = per_step * config.train.num_epochs * (config_lib.num_blocks(config)
                                                       if config.train.scale_epochs_by_blocks and
                                                       config.model.kind.endswith('dblock') else 1)
  assert cost['text_rd_dblock.py'] <= cost['text_rd.py'], cost


def test_the_flops_estimate_agrees_with_xla_on_a_forward_pass():
  """One rd_dblock forward pass (no loops: XLA counts every operation once) against a third of the estimated
  training step (forward + backward = 3 forward passes), at a width where the per-sequence terms left out are
  small."""
  config = rd_dblock_config(model__hidden_size=64, model__num_heads=4)
  model = models.build(config.model, sigma_data=0.5, vocab_size=64, seq_len=32)
  graphdef, params = models.split(model)
  tokens = jnp.zeros((4, 32), jnp.int32)
  forward = lambda p: nnx.merge(graphdef, p).denoise(tokens, jnp.zeros((4, 32, 64)), jnp.ones((4,)), 0)
  counted = jax.jit(forward).lower(params).compile().cost_analysis()
  counted = counted[0] if isinstance(counted, list) else counted
  estimate = recurrent.RecurrentDiffusionBlocksAR.train_flops_per_step(config.model, vocab_size=64, seq_len=32,
                                                                       batch_size=4) / 3
  assert counted['flops'] == pytest.approx(estimate, rel=0.25), (counted['flops'], estimate)


@pytest.mark.slow  # Three tiny trainings, two resumed and evaluated through the CLI: 11 min on the loaded 2 cores.
@pytest.mark.long
def test_tiny_runs_train_resume_and_evaluate_at_another_depth(tmp_path):
  """rd_dblock from the CLI: train one epoch, resume to two, --mode=eval at N = 5 sampler steps (B = 3); rd in
  process, scored by nothing (its figures: eval/bpc at its evaluation depth, eval/train_flops)."""
  from diffblocks_jax.training import train  # pylint: disable=g-import-not-at-top
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text(text.__doc__ * 30, encoding='utf-8')
  data = ['--config.data.source=text', f'--config.data.path={corpus}', '--config.data.seq_len=16',
          '--config.model.hidden_size=16', '--config.model.num_heads=2', '--config.train.batch_size=64',
          '--config.train.steps_per_call=2', '--config.eval.num_samples=2', '--config.eval.scorer_workdir=']
  workdir = tmp_path / 'rd_dblock'
  first = run_cli('--config=configs/text_rd_dblock.py', f'--workdir={workdir}', '--config.train.num_epochs=1',
                  *data)
  assert first.returncode == 0, first.stderr[-3000:]
  steps = json.loads((workdir / 'config.json').read_text())  # The run's own record of its config.
  assert steps['model']['kind'] == 'rd_dblock'
  second = run_cli(f'--workdir={workdir}', '--config.train.num_epochs=2')
  assert second.returncode == 0 and 'Resumed from' in second.stderr + second.stdout, second.stderr[-3000:]
  out = run_cli(f'--workdir={workdir}', '--mode=eval', '--config.eval.num_inference_steps=5')
  assert out.returncode == 0, out.stderr[-3000:]
  evaluated = json.loads((workdir / 'eval.json').read_text())
  per_epoch = evaluated['step'] // 2
  assert per_epoch >= 1 and evaluated['eval/train_flops'] > 0 and evaluated['eval/sample_entropy'] > 0
  config = rd_config(depth_distribution='lognormal_poisson', mean_depth=3.0, backprop_depth=2)
  config.data.update(source='text', path=str(corpus), seq_len=16)
  config.train.update(batch_size=64, num_epochs=1, steps_per_call=2)
  config.eval.num_samples = 2
  result = train.train_and_evaluate(config, str(tmp_path / 'rd'))
  assert result['eval/bpc'] > 0 and result['eval/train_flops'] == pytest.approx(
      result['step'] * recurrent.RecurrentDepthLM.train_flops_per_step(
          config.model, vocab_size=len(set(corpus.read_text())), seq_len=16, batch_size=64), rel=1e-6)
