"""Hugging Face checkpoints as a model's start (diffblocks_jax/models/pretrained.py).

The references: tests/fixtures/hf/<name>/ are tiny random models that transformers 5.25 (with torch 2.x on the CPU)
created and saved (`save_pretrained`: config.json + model.safetensors), and reference.npz holds transformers' own
float32 logits on fixed inputs; tests/fixtures/hf/make_fixtures.py wrote them (nothing downloaded). These tests
compare our imported models against those stored logits everywhere, and against a fresh transformers forward
when torch and transformers are importable (skipped otherwise; they are not the project's dependencies).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from diffblocks_jax import models
from diffblocks_jax.core import blocks
from diffblocks_jax.models import pretrained

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'hf')
TEXT = ('llama_gqa', 'llama_tied', 'llama_rope_linear', 'llama3_rope', 'qwen2')
VOCAB = 64  # Their vocab_size; llama_tokenizer's is 400 rows (tests/test_tokenizer.py).


def rel_err(ours, theirs) -> float:
  return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


def text_config(kind: str, folder: str, **overrides):
  """A tiny `kind` config with the checkpoint's model fields, then `overrides`."""
  c = helpers.tiny_config(kind, 'text', model__dropout=0.0)
  c.model.update(pretrained.hf_model_fields(folder))
  return helpers.override(c, **overrides)


def imported(config, folder, **dims):
  dims = dims or dict(vocab_size=VOCAB, seq_len=16)
  abstract = nnx.eval_shape(lambda: models.build(config.model, **dims))
  graphdef, shapes = nnx.split(abstract)
  params = pretrained.load_hf(folder, config.model, nnx.to_pure_dict(shapes))
  return nnx.merge(graphdef, params), params, nnx.to_pure_dict(shapes)


def ar_logits(model, ids):
  """Our 'ar' logits for transformers' input ids (which start with BOS): the tokens are ids shifted by one."""
  tokens = jnp.concatenate([ids[:, 1:], jnp.zeros((ids.shape[0], 1), ids.dtype)], axis=1)
  return model.logits(tokens)


@pytest.mark.parametrize('name', TEXT + ('llama_tokenizer',))
def test_llama_family_logits_equal_transformers(name):
  folder = os.path.join(FIXTURES, name)
  ref = np.load(os.path.join(folder, 'reference.npz'))
  config = text_config('ar', folder)
  with open(os.path.join(folder, 'config.json')) as f:
    rows = json.load(f)['vocab_size']
  model, params, abstract = imported(config, folder, vocab_size=rows, seq_len=16)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(lambda x: (x.shape, x.dtype), abstract)
  assert rel_err(ar_logits(model, jnp.asarray(ref['input_ids'])), ref['logits']) <= 1e-5


def test_the_fixtures_cover_each_option():
  """GQA, tied embeddings, both rotary scalings and Qwen2's biases: each fixture differs where its name says."""
  f = {name: pretrained.hf_model_fields(os.path.join(FIXTURES, name)) for name in TEXT}
  assert f['llama_gqa']['num_kv_heads'] < f['llama_gqa']['num_heads'] and f['llama_gqa']['norm_eps'] == 1e-5
  assert f['llama_tied']['tie_embeddings'] and f['llama_tied']['rope_theta'] == 500000.0
  assert f['llama_rope_linear']['rope_scaling'] == 'linear' and f['llama3_rope']['rope_scaling'] == 'llama3'
  assert f['qwen2']['attention_bias'] and not f['qwen2']['attention_out_bias']


def test_llama3_scaling_blends_some_frequencies():
  """The llama3 fixture's head width puts a wavelength in each of the three bands (kept, blended, divided)."""
  fields = pretrained.hf_model_fields(os.path.join(FIXTURES, 'llama3_rope'))
  c = helpers.tiny_config('ar', 'text')
  c.model.update(fields)
  from diffblocks_jax.models import text  # pylint: disable=g-import-not-at-top
  width = fields['hidden_size'] // fields['num_heads']
  plain = np.asarray(text.rope_frequencies(width, fields['rope_theta']))
  ratio = plain / np.asarray(text.rope_frequencies(width, *text.rope_settings(c.model)))
  assert np.isclose(ratio, 1).any() and np.isclose(ratio, 8).any() and ((ratio > 1.01) & (ratio < 7.99)).any()


def test_vit_features_equal_transformers_and_positions_interpolate():
  folder = os.path.join(FIXTURES, 'vit')
  ref = np.load(os.path.join(folder, 'reference.npz'))
  fields = pretrained.hf_model_fields(folder)
  for size, images, features in ((8, ref['images'], ref['features']), (12, ref['images_12'], ref['features_12'])):
    c = helpers.tiny_config('vit', 'digits', model__dropout=0.0, model__attention_dropout=0.0)
    c.model.update(fields)
    model, params, _ = imported(c, folder, image_size=size, channels=3, num_classes=7)
    ours = model.features(jnp.asarray(images.transpose(0, 2, 3, 1)))
    assert rel_err(ours, features) <= 1e-5, size
    assert params['head']['kernel'].shape == (fields['hidden_size'], 7)  # The new label set's head.
  # With transformers' classifier put in its place, the logits agree too.
  c = helpers.tiny_config('vit', 'digits', model__dropout=0.0, model__attention_dropout=0.0)
  c.model.update(fields)
  model, params, _ = imported(c, folder, image_size=8, channels=3, num_classes=5)
  files = pretrained.SafetensorsFolder(folder)
  params['head'] = {'kernel': files.array('classifier.weight').T, 'bias': files.array('classifier.bias')}
  model = nnx.merge(nnx.split(model)[0], params)
  assert rel_err(model(jnp.asarray(ref['images'].transpose(0, 2, 3, 1))), ref['logits']) <= 1e-5


def test_blockwise_start_reproduces_the_checkpoint_on_the_clean_path():
  """ar_dblock with B = 1 from a checkpoint: the clean half of [clean | noisy] through the block and the head is
  the imported causal LM, so its next-token logits equal transformers' at any σ (the time conditioning starts as
  the identity of the imported layers)."""
  folder = os.path.join(FIXTURES, 'llama_gqa')
  ref = np.load(os.path.join(folder, 'reference.npz'))
  config = text_config('ar_dblock', folder, model__num_blocks=1)
  model, _, _ = imported(config, folder)
  ids = jnp.asarray(ref['input_ids'])
  z = jax.random.normal(jax.random.key(0), ids.shape + (config.model.hidden_size,))
  for sigma in (0.01, 3.0):
    _, clean = model.denoise(ids, z, jnp.full((ids.shape[0],), sigma), 0, clean=True)
    assert rel_err(clean, ref['logits']) <= 1e-5


@pytest.mark.parametrize('kind,source', [('ar_dblock', 'hf'), ('ar_dblock', 'ar'), ('dblock', 'hf'),
                                         ('dblock', 'vit')])
def test_each_block_starts_as_its_slice_of_the_imported_layers(kind, source):
  """B = 2 over 2 layers: block b's layer, at any condition, computes imported layer b on any input."""
  text = kind == 'ar_dblock'
  folder = os.path.join(FIXTURES, 'llama_gqa' if text else 'vit')
  dims = dict(vocab_size=VOCAB, seq_len=16) if text else dict(image_size=8, channels=3, num_classes=4)
  make = (lambda k, **o: text_config(k, folder, **o)) if text else (lambda k, **o: vit_config(k, folder, **o))
  config = make(kind, model__num_blocks=2)
  e2e = make('ar' if text else 'vit')
  plain_model, plain, _ = imported(e2e, folder, **dims)
  abstract = nnx.eval_shape(lambda: models.build(config.model, **dims))
  graphdef, shapes = nnx.split(abstract)
  if source == 'hf':
    params = pretrained.load_hf(folder, config.model, nnx.to_pure_dict(shapes))
  else:
    params = pretrained.from_end_to_end(plain, e2e.model, config.model, nnx.to_pure_dict(shapes))
  model = nnx.merge(graphdef, params)
  plain_layers = plain_model.layers.layers if text else plain_model.layers
  x = jax.random.normal(jax.random.key(1), (2, 6, config.model.hidden_size))
  cond = jax.random.normal(jax.random.key(2), (2, model.outer(model.block(0)).time.fc2.out_features
                                               if text else config.model.hidden_size // 6))
  keys = lambda: None
  for b in range(2):
    layer = model.block(b).layers[0]
    if text:
      mask, pos = jnp.ones((6, 6), bool), jnp.arange(6)
      ours, theirs = layer(x, keys, cond, mask=mask, positions=pos), plain_layers[b](x, keys, None, mask=mask,
                                                                                     positions=pos)
    else:
      from diffblocks_jax.models import vit  # pylint: disable=g-import-not-at-top
      ours, theirs = layer(x, vit.KeyStream(None), cond), plain_layers[b](x, vit.KeyStream(None))
    assert rel_err(ours, theirs) <= 1e-5, b


def vit_config(kind, folder, **overrides):
  c = helpers.tiny_config(kind, 'digits', model__dropout=0.0, model__attention_dropout=0.0)
  c.model.update(pretrained.hf_model_fields(folder))
  return helpers.override(c, **overrides)


# ------------------------------------------------------------------ bad input: one line, naming file and tensor

def copy_fixture(tmp_path, name='llama_gqa'):
  folder = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), folder)
  return str(folder)


def rewrite(folder, change):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  path = os.path.join(folder, 'model.safetensors')
  tensors = dict(load_file(path))
  change(tensors)
  save_file(tensors, path)


def refused(folder, match, kind='ar', **overrides):
  config = text_config(kind, os.path.join(FIXTURES, 'llama_gqa'), **overrides)
  shapes = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: models.build(config.model, vocab_size=VOCAB,
                                                                             seq_len=16)))[1])
  with pytest.raises(ValueError, match=match) as e:
    pretrained.load_hf(folder, config.model, shapes)
  assert '\n' not in str(e.value)
  return str(e.value)


def test_bad_checkpoints_are_refused_in_one_line(tmp_path):
  folder = copy_fixture(tmp_path)
  rewrite(folder, lambda t: t.pop('model.layers.1.mlp.up_proj.weight'))
  refused(folder, 'lacks tensor model.layers.1.mlp.up_proj.weight')

  folder = copy_fixture(tmp_path / 'extra')
  rewrite(folder, lambda t: t.update({'model.layers.0.mlp.extra.weight': np.zeros(2, np.float32)}))
  refused(folder, 'model.safetensors: unexpected tensor model.layers.0.mlp.extra.weight')

  folder = copy_fixture(tmp_path / 'shape')
  rewrite(folder, lambda t: t.update({'model.layers.0.self_attn.k_proj.weight': np.zeros((16, 16), np.float32)}))
  refused(folder, r'model.safetensors: tensor model.layers.0.self_attn.k_proj.weight has shape \(16, 16\)')

  folder = copy_fixture(tmp_path / 'nan')
  rewrite(folder, lambda t: t['model.norm.weight'].__setitem__(0, np.nan))
  refused(folder, 'model.safetensors: tensor model.norm.weight holds NaN')

  folder = copy_fixture(tmp_path / 'empty')
  os.remove(os.path.join(folder, 'model.safetensors'))
  refused(folder, 'no \\*.safetensors weights')

  refused(str(tmp_path / 'nowhere'), 'no such folder')
  refused(os.path.join(FIXTURES, 'llama_gqa'), 'config.model.num_layers=4 but the checkpoint has 2',
          model__num_layers=4)


def test_config_json_problems_are_refused_in_one_line(tmp_path):
  def edited(name, change):
    folder = copy_fixture(tmp_path / name)
    path = os.path.join(folder, 'config.json')
    with open(path) as f:
      hf = json.load(f)
    change(hf)
    with open(path, 'w') as f:
      json.dump(hf, f)
    return folder

  with pytest.raises(ValueError, match=r"config.json: architectures=\['GPT2LMHeadModel'\] is not supported"):
    pretrained.hf_model_fields(edited('arch', lambda h: h.update(architectures=['GPT2LMHeadModel'])))
  with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
    pretrained.hf_model_fields(edited('yarn', lambda h: h['rope_parameters'].update(rope_type='yarn')))
  # The data's vocabulary must be the checkpoint's.
  config = text_config('ar', os.path.join(FIXTURES, 'llama_gqa'))
  shapes = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: models.build(config.model, vocab_size=50,
                                                                             seq_len=16)))[1])
  with pytest.raises(ValueError, match="token embedding has 64 rows; the data's vocabulary has 50 tokens"):
    pretrained.load_hf(os.path.join(FIXTURES, 'llama_gqa'), config.model, shapes)


def test_interpolation_is_torch_bicubic_on_a_known_case():
  """Resizing a constant grid keeps it (weights sum to one); the identity size is the identity."""
  pos = np.random.default_rng(0).normal(size=(1, 1 + 9, 4)).astype(np.float32)
  np.testing.assert_allclose(pretrained.interpolate_positions(pos, 10), pos, atol=1e-6)
  flat = np.ones((1, 1 + 4, 3), np.float32)
  np.testing.assert_allclose(pretrained.interpolate_positions(flat, 1 + 25), np.ones((1, 26, 3)), atol=1e-6)


# ------------------------------------------------------------------ live: transformers itself, when installed

def test_live_transformers_forward_equals_ours(tmp_path):
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('make_fixtures', os.path.join(FIXTURES, 'make_fixtures.py'))
  make = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make)
  for name in ('llama_gqa', 'qwen2'):
    folder = str(tmp_path / name)
    ref = make.build(name, folder)
    model, _, _ = imported(text_config('ar', folder), folder)
    assert rel_err(ar_logits(model, jnp.asarray(ref['input_ids'])), ref['logits']) <= 1e-5, name


# ------------------------------------------------------------------ diffusion.clean_ce_weight

def test_clean_ce_weight_adds_the_clean_paths_next_token_cross_entropy():
  """λ × the clean half's next-token cross-entropy joins the block-wise loss; from a checkpoint with B = 1 that
  cross-entropy is the checkpoint's own (transformers' logits), whatever σ; λ = 0 is the loss alone."""
  from diffblocks_jax.tasks import autoregressive  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  folder = os.path.join(FIXTURES, 'llama_tied')
  ref = np.load(os.path.join(folder, 'reference.npz'))
  ids = jnp.asarray(ref['input_ids'])
  losses = {}
  for lam in (0.0, 0.5):
    config = text_config('ar_dblock', folder, model__num_blocks=1, diffusion__clean_ce_weight=lam)
    model, _, _ = imported(config, folder)
    task = autoregressive.make_task(config)
    z = jax.random.normal(jax.random.key(0), ids.shape + (config.model.hidden_size,))
    sigmas = jnp.array([0.1, 2.0])
    output = task.denoise(model, ids, z, sigmas, 0, None)
    assert isinstance(output, tuple) == bool(lam)
    losses[lam], aux = task.loss(output, ids, sigmas)
  expected = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(ref['logits'])[:, :-1], ids[:, 1:]).mean()
  np.testing.assert_allclose(aux['clean_ce'], expected, rtol=1e-5)
  np.testing.assert_allclose(losses[0.5] - losses[0.0], 0.5 * expected, rtol=1e-4)


# ------------------------------------------------------------------ the command line: init_from=hf:

def fixture_corpus(tmp_path) -> str:
  """A text of exactly the fixture's 64 characters (its char vocabulary is the checkpoint's), 6k characters."""
  chars = [chr(c) for c in range(ord('0'), ord('0') + VOCAB)]
  rng = np.random.default_rng(0)
  path = tmp_path / 'corpus.txt'
  path.write_text(''.join(chars) + ''.join(rng.choice(chars, 6000)))
  return str(path)


def cli_flags(corpus: str) -> list[str]:
  return ['--config.data.source=text', f'--config.data.path={corpus}', '--config.data.seq_len=16',
          '--config.train.batch_size=16', '--config.train.steps_per_call=10', '--config.train.log_every_steps=10',
          '--config.train.eval_every_epochs=0', '--config.eval.batch_size=64', '--config.eval.num_samples=2',
          '--config.model.dropout=0.0']


@pytest.mark.slow
@pytest.mark.long  # 60 s; by default: parity, the CLI's refusal, and a new run from init_from (test_initialisation.py).
def test_cli_fine_tunes_from_a_checkpoint_folder_and_resumes(tmp_path):
  """configs/text_hf.py:FOLDER trains from the checkpoint (a char corpus of the checkpoint's 64 characters),
  resumes for a second epoch, and --mode=eval reads the run back."""
  folder, corpus, workdir = os.path.join(FIXTURES, 'llama_gqa'), fixture_corpus(tmp_path), str(tmp_path / 'run')
  config = f'--config=configs/text_hf.py:{folder}'
  out = helpers.run_cli(config, f'--workdir={workdir}', '--config.train.num_epochs=1', *cli_flags(corpus))
  assert out.returncode == 0, out.stderr[-3000:]
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert records[-1]['step'] > 0 and 'eval/bpc' in records[-1]
  first = records[-1]['step']
  out = helpers.run_cli(config, f'--workdir={workdir}', '--config.train.num_epochs=2', *cli_flags(corpus))
  assert out.returncode == 0, out.stderr[-3000:]
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert records[-1]['step'] == 2 * first
  out = helpers.run_cli(f'--workdir={workdir}', '--mode=eval')
  assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
def test_cli_refuses_a_bad_checkpoint_in_one_line_and_writes_nothing(tmp_path):
  folder = copy_fixture(tmp_path)
  rewrite(folder, lambda t: t.pop('model.norm.weight'))
  workdir = tmp_path / 'run'
  out = helpers.run_cli(f'--config=configs/text_hf.py:{folder}', f'--workdir={workdir}',
                        *cli_flags(fixture_corpus(tmp_path)))
  assert out.returncode == 2, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert 'lacks tensor model.norm.weight' in last and 'Traceback' not in out.stderr, out.stderr[-2000:]
  # No config, no checkpoint (the run's lock may have made the folder).
  assert not (workdir / 'config.json').exists() and not (workdir / 'checkpoints').exists()


def test_vit_into_concat_blocks_keeps_cls_and_resizes_positions():
  """dblock with the paper's 'concat' label token at another image size: the CLS token and the resized grid come
  from the checkpoint, the label token's position is a fresh row; every block gets the same outer parts."""
  folder = os.path.join(FIXTURES, 'vit')
  config = vit_config('dblock', folder, model__label_token='concat', model__num_blocks=2, model__num_layers=2)
  _, params, _ = imported(config, folder, image_size=12, channels=3, num_classes=4)
  files = pretrained.SafetensorsFolder(folder)
  pos = files.array('vit.embeddings.position_embeddings')
  shared = params['shared']
  assert shared['pos_embed'].shape == (1, 1 + 9 + 1, config.model.hidden_size)
  np.testing.assert_allclose(shared['pos_embed'][:, :10], pretrained.interpolate_positions(pos, 10), rtol=1e-6)
  np.testing.assert_array_equal(shared['cls_token'], files.array('vit.embeddings.cls_token'))
