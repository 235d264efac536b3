"""The convolutional stack (models/cnn.py; paper Table 6): shapes, the block cut, the method's identities on a tiny
config, a float64 NumPy forward pass, the shipped configs, and one short CLI run (train, resume, --mode=eval)."""

from __future__ import annotations

import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffblocks_jax import config as config_lib
from diffblocks_jax import models
from diffblocks_jax.core import blocks
from diffblocks_jax.models import cnn
from diffblocks_jax.training import reporting
from helpers import TINY_DIMS, shipped_config, tiny_config

N = 4
SIGMAS = np.array([0.01, 0.3, 1.0, 10.0], np.float32)


def tiny(kind: str, **overrides):
  """The tiny image config with a 2x2 stem: 4x4 feature maps, so the 3x3 convolutions' padding matters."""
  return tiny_config(kind, model__patch_size=2, **overrides)


_BUILT = {}


def build(config, seed: int = 0, stack: bool | None = None):
  """(graphdef, params) of `config`'s model on TINY_DIMS, built once per (model config, seed, stack)."""
  key = (config.model.to_json(), seed, stack)
  if key not in _BUILT:
    if stack is None:
      model = models.build(config.model, seed=seed, **TINY_DIMS)
    else:
      counts = models.partition_layers(config.model.num_layers, config.model.num_blocks,
                                       config.model.layers_per_block)
      model = cnn.DiffusionBlocksCNN(config.model, counts, rngs=nnx.Rngs(seed), stack=stack, **TINY_DIMS)
    _BUILT[key] = models.split(model)
  return _BUILT[key]


def inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(N, 8, 8, 3)).astype(np.float32)
  z_t = rng.normal(size=(N, 24)).astype(np.float32)
  return images, z_t


def jitter(params, seed: int = 0, scale: float = 0.1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(np.asarray(p) + scale * rng.normal(size=p.shape), p.dtype), params)


def denoise(graphdef, params, images, z_t, block, key=None):
  return nnx.merge(graphdef, params).denoise(jnp.asarray(images), jnp.asarray(z_t), jnp.asarray(SIGMAS), block,
                                             key=key)


# --- a float64 NumPy forward pass, written from the module's docstring ---

def np_dense(p, x):
  return x @ np.asarray(p['kernel'], np.float64) + np.asarray(p['bias'], np.float64)


def np_silu(x):
  return x / (1 + np.exp(-x))


def np_group_norm(p, x, eps=1e-5):
  n, h, w, c = x.shape
  g = math.gcd(cnn.GROUPS, c)
  y = x.reshape(n, h, w, g, c // g)
  y = (y - y.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(y.var(axis=(1, 2, 4), keepdims=True) + eps)
  return y.reshape(x.shape) * np.asarray(p['scale'], np.float64) + np.asarray(p['bias'], np.float64)


def np_layer_norm(p, x, eps):
  y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
  return y * np.asarray(p['scale'], np.float64) + np.asarray(p['bias'], np.float64)


def np_stem(p, images, patch):
  n, h, w, c = images.shape
  x = images.reshape(n, h // patch, patch, w // patch, patch, c)
  return np.einsum('nipjqc,pqco->nijo', x, np.asarray(p['kernel'], np.float64)) + np.asarray(p['bias'])


def np_conv3x3(p, x):
  k = np.asarray(p['kernel'], np.float64)
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1:3]
  return sum(padded[:, i:i + h, j:j + w] @ k[i, j] for i in range(3) for j in range(3)) + np.asarray(p['bias'])


def np_layer(p, x, cond=None):
  h = np_group_norm(p['norm'], x)
  if cond is None:
    return x + np_conv3x3(p['conv'], np.maximum(h, 0))
  shift, scale, gate = np.split(np_dense(p['modulation'], np_silu(cond))[:, None, None, :], 3, axis=-1)
  return x + gate * np_conv3x3(p['conv'], np.maximum(h * (1 + scale) + shift, 0))


def np_head(p, h):
  return np_dense(p['out'], np.maximum(np_dense(p['fc'], h), 0))


def np_baseline(params, images, cfg):
  x = np_stem(params['stem'], images.astype(np.float64), cfg.patch_size)
  for j in sorted(params['layers']['layers']):
    x = np_layer(params['layers']['layers'][j], x)
  return np_head(params['head'], np_layer_norm(params['norm'], x.mean(axis=(1, 2)), cfg.layer_norm_eps))


def np_denoise(params, images, z_t, sigmas, block, cfg, sigma_data=0.5):
  s = sigmas.astype(np.float64)[:, None]
  c_skip, c_out = sigma_data**2 / (s**2 + sigma_data**2), s * sigma_data / np.sqrt(s**2 + sigma_data**2)
  c_in, c_noise = 1 / np.sqrt(s**2 + sigma_data**2), 0.25 * np.log(s)
  shared, layers = params['shared'], blocks.block_tree(params, block)['layers']
  freqs = np.exp(-math.log(10000.0) * np.arange(128) / 128)
  t = np.concatenate([np.cos(c_noise * freqs), np.sin(c_noise * freqs)], axis=-1)
  cond = np_dense(shared['time_fc2'], np_silu(np_dense(shared['time_fc1'], t)))
  cond = cond + np_dense(shared['label_fc'], c_in * z_t)
  x = np_stem(shared['stem'], images.astype(np.float64), cfg.patch_size)
  for j in sorted(layers):
    x = np_layer(layers[j], x, cond)
  h = np_layer_norm(shared['norm'], x.mean(axis=(1, 2)), cfg.layer_norm_eps)
  out = c_out * h + c_skip * z_t
  shift, scale = np.split(np_dense(shared['modulation'], np_silu(cond)), 2, axis=-1)
  return np_head(shared['head'], out * (1 + scale) + shift)


# --- shapes and the block cut ---

def test_shapes_and_the_block_cut():
  images, z_t = inputs()
  c = tiny('cnn')
  graphdef, params = build(c)
  model = nnx.merge(graphdef, params)
  chex.assert_shape(model(jnp.asarray(images)), (N, 5))
  chex.assert_shape(model.features(jnp.asarray(images)), (N, 24))
  assert len(params['layers']['layers']) == 3

  c = tiny('cnn_dblock', model__num_layers=6)  # B = 3 blocks of 2 layers, stacked on a leading block axis.
  graphdef, params = build(c)
  model = nnx.merge(graphdef, params)
  assert model.num_blocks == 3 and model.layer_counts == [2, 2, 2]
  assert set(params['blocks']['layers']) == {0, 1}
  assert all(x.shape[0] == 3 for x in jax.tree.leaves(params['blocks']))
  chex.assert_shape(model.label_embeddings(), (5, 24))
  for b in range(3):
    chex.assert_shape(denoise(graphdef, params, images, z_t, b), (N, 5))


def test_uneven_cut_is_a_list_of_blocks():
  c = tiny('cnn_dblock', model__num_layers=4, model__layers_per_block=(2, 1, 1))
  graphdef, params = build(c)
  assert nnx.merge(graphdef, params).layer_counts == [2, 1, 1]
  assert [len(params['blocks'][b]['layers']) for b in range(3)] == [2, 1, 1]
  chex.assert_shape(denoise(graphdef, params, *inputs(), 2), (N, 5))


# --- the convolutions (matmuls over shifted copies) against lax.conv ---

def test_convolutions_match_lax_conv():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 5)), jnp.float32)
  conv = cnn.Conv3x3(5, 7, jnp.float32, nnx.Rngs(0))
  conv.bias[...] = jnp.asarray(rng.normal(size=7), jnp.float32)
  dims = ('NHWC', 'HWIO', 'NHWC')
  reference = jax.lax.conv_general_dilated(x, conv.kernel[...], (1, 1), 'SAME', dimension_numbers=dims)
  np.testing.assert_allclose(conv(x), reference + conv.bias[...], rtol=1e-5, atol=1e-5)
  stem = cnn.Stem(5, 7, 3, jnp.float32, nnx.Rngs(1))
  reference = jax.lax.conv_general_dilated(x, stem.kernel[...], (3, 3), 'VALID', dimension_numbers=dims)
  np.testing.assert_allclose(stem(x), reference, rtol=1e-5, atol=1e-5)


# --- the forward pass against float64 NumPy ---

def test_baseline_matches_numpy_reference():
  c = tiny('cnn')
  graphdef, params = build(c)
  params = jitter(params)
  images, _ = inputs()
  logits = nnx.merge(graphdef, params)(jnp.asarray(images))
  np.testing.assert_allclose(logits, np_baseline(jax.device_get(params), images, c.model), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('independent', [False, True])
def test_denoise_matches_numpy_reference(independent):
  c = tiny('cnn_dblock', model__independent_blocks=independent)
  graphdef, params = build(c)
  params = jitter(params)
  images, z_t = inputs()
  host = jax.device_get(params)
  for b in range(3):
    ref_params = host if not independent else {'shared': blocks.block_tree(host, b)['shared'], **host}
    ref = np_denoise(ref_params, images, z_t, SIGMAS, b, c.model)
    np.testing.assert_allclose(denoise(graphdef, params, images, z_t, b), ref, rtol=1e-4, atol=1e-4)


# --- the method's identities ---

def test_at_init_logits_are_zero_and_every_layer_is_the_identity():
  c = tiny('cnn_dblock')
  graphdef, params = build(c)
  images, z_t = inputs()
  for b in range(3):
    np.testing.assert_array_equal(denoise(graphdef, params, images, z_t, b), 0.0)  # Zero head: uniform.
  # With only the head moved off zero, every block gives the same logits: zero gates make each conv layer the
  # identity, so the blocks (which differ only in their layers) cannot differ yet.
  head = params['shared']['head']
  moved = dict(params, shared=dict(params['shared'], head=jitter(head, scale=0.5)))
  outs = [denoise(graphdef, moved, images, z_t, b) for b in range(3)]
  assert np.max(np.abs(outs[0])) > 1e-3
  for out in outs[1:]:
    chex.assert_trees_all_equal(out, outs[0])


def test_denoise_reads_only_its_block():
  c = tiny('cnn_dblock')
  graphdef, params = build(c)
  params = jitter(params)
  images, z_t = inputs()

  def perturbed(which):
    per_block = blocks.unstack(params)['blocks']
    per_block = {k: jitter(v, seed=100 + k, scale=0.5) if k in which else v for k, v in per_block.items()}
    return blocks.restack(dict(params, blocks=per_block))

  for b in range(3):
    reference = denoise(graphdef, params, images, z_t, b)
    chex.assert_trees_all_equal(denoise(graphdef, perturbed([k for k in range(3) if k != b]), images, z_t, b),
                                reference)
    assert np.max(np.abs(denoise(graphdef, perturbed([b]), images, z_t, b) - reference)) > 1e-3


def test_stacked_and_listed_blocks_agree():
  """Same seed, same draws: the stacked layout and a list of blocks hold the same parameters and compute the same
  logits."""
  c = tiny('cnn_dblock')
  g_stacked, p_stacked = build(c)
  g_list, p_list = build(c, stack=False)
  chex.assert_trees_all_equal(blocks.unstack(p_stacked), p_list)
  p_stacked = jitter(p_stacked)
  p_list = blocks.unstack(p_stacked)
  images, z_t = inputs()
  for b in range(3):
    np.testing.assert_allclose(denoise(g_stacked, p_stacked, images, z_t, b),
                               denoise(g_list, p_list, images, z_t, b), rtol=1e-6, atol=1e-6)


def test_the_noisy_label_and_sigma_reach_the_logits():
  c = tiny('cnn_dblock')
  graphdef, params = build(c)
  params = jitter(params)
  images, z_t = inputs()
  reference = denoise(graphdef, params, images, z_t, 1)
  assert np.max(np.abs(denoise(graphdef, params, images, z_t + 1.0, 1) - reference)) > 1e-3
  model = nnx.merge(graphdef, params)
  other_sigma = model.denoise(jnp.asarray(images), jnp.asarray(z_t), jnp.asarray(SIGMAS * 2), 1)
  assert np.max(np.abs(other_sigma - reference)) > 1e-3


@pytest.mark.parametrize('kind', ['cnn', 'cnn_dblock'])
def test_dropout_takes_a_key(kind):
  c = tiny(kind, model__dropout=0.5)
  graphdef, params = build(c)
  params = jitter(params)
  images, z_t = inputs()
  model = nnx.merge(graphdef, params)
  run = (lambda key: model(jnp.asarray(images), key=key)) if kind == 'cnn' else (
      lambda key: denoise(graphdef, params, images, z_t, 1, key=key))
  chex.assert_trees_all_equal(run(None), run(None))
  chex.assert_trees_all_equal(run(jax.random.key(1)), run(jax.random.key(1)))
  assert np.max(np.abs(run(jax.random.key(1)) - run(None))) > 1e-4


# --- the shipped configs ---

def test_shipped_configs_validate_and_pair_up():
  digits = {name: shipped_config(f'digits_{name}.py') for name in ('cnn', 'cnn_dblock')}
  cifar = {name: shipped_config(f'cifar100_{name}.py') for name in ('cnn', 'cnn_dblock')}
  for pair in (digits, cifar):
    for config in pair.values():
      config_lib.validate(config)
    # Equal layer-updates: the same model and epochs; DiffusionBlocks trains B x the epochs of one block each.
    same = lambda m: {k: v for k, v in m.to_dict().items() if k not in ('kind', 'label_token')}  # (ViT-only field)
    assert same(pair['cnn'].model) == same(pair['cnn_dblock'].model)
    assert pair['cnn'].train.num_epochs == pair['cnn_dblock'].train.num_epochs
    assert pair['cnn_dblock'].train.scale_epochs_by_blocks
  paper = cifar['cnn_dblock']  # Table 6: B = 3, γ = 0.1, AdamW lr 1e-4, batch 128, 1000 epochs.
  assert (paper.model.num_blocks, paper.diffusion.overlap, paper.optim.lr, paper.train.batch_size,
          paper.train.num_epochs) == (3, 0.1, 1e-4, 128, 1000)


# --- one short run: train, resume, evaluate ---

@pytest.mark.slow
def test_trains_resumes_and_evaluates_on_digits(tmp_path):
  """In-process, as the CLI calls it (the CLI itself: tests/test_main.py, tests/test_failures.py)."""
  from diffblocks_jax.training import evaluation, train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')

  def config(epochs):
    return shipped_config('digits_cnn_dblock.py', model__hidden_size=8, model__num_layers=3, model__mlp_dim=8,
                          train__batch_size=256, train__log_every_steps=5, train__checkpoint_every_steps=15,
                          train__eval_every_epochs=0.0, eval__batch_size=360, train__num_epochs=epochs)

  first = train.train_and_evaluate(config(1), workdir)
  assert first['step'] == 15  # 1437 // 256 = 5 steps per epoch, x B = 3.
  resumed = train.train_and_evaluate(config(2), workdir)  # The same run, longer: resumes at step 15.
  trained = [r['step'] for r in reporting.read_metrics(workdir) if 'train/loss' in r]
  assert resumed['step'] == 30 and trained == sorted(set(trained)) and trained[-1] == 30  # No step trained twice.
  evaluated, _ = evaluation.evaluate(config(2), workdir)
  assert evaluated['step'] == 30 and evaluated['eval/accuracy'] == pytest.approx(resumed['eval/accuracy'])
  assert json.load(open(os.path.join(workdir, 'config.json')))['model']['kind'] == 'cnn_dblock'
