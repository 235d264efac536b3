"""The baseline ViT and the DiffusionBlocks ViT-DiT (SPEC §2, §3): sizes, init, partition, forward."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import special

from diffblocks_jax import config as config_lib
from diffblocks_jax import models
from diffblocks_jax.core import blocks
from diffblocks_jax.models import dblock
from helpers import base_config

CIFAR_DIMS = dict(image_size=32, channels=3, num_classes=100)  # The base config's models are CIFAR-100's.


def count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def abstract_params(config, dims=CIFAR_DIMS):
  return models.split(nnx.eval_shape(lambda: models.build(config.model, **dims)))[1]


def flat(params):
  """{'a/b/c': leaf} for a nested pure dict."""
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


# --- sizes of the CIFAR config (SPEC §2, §3, §9) ---

def test_param_count_baseline():
  assert count(abstract_params(base_config('vit'))) == 10_302_180


def test_param_count_diffusion_blocks():
  assert count(abstract_params(base_config('dblock'))) == 10_529_095


def test_param_count_independent_blocks():
  shared = abstract_params(base_config('dblock'))
  indep = abstract_params(base_config('dblock', model__independent_blocks=True))
  assert 'shared' not in indep
  assert count(indep) == count(shared) + 2 * count(shared['shared'])  # B = 3 copies instead of one


def test_cifar_shapes_match_release():
  p = blocks.unstack(abstract_params(base_config('dblock')))  # Stacked blocks, read block by block.
  s, layer = p['shared'], p['blocks'][0]['layers'][0]
  shapes = {
      'pos_embed': (s['pos_embed'].shape, (1, 65, 128)),
      'patch': (s['patch']['proj']['kernel'].shape, (4, 4, 3, 128)),  # (out,in,kh,kw) in torch
      'label_embed': (s['label_embed'].shape, (100, 128)),
      'time_fc1': (s['time_fc1']['kernel'].shape, (256, 21)),
      'time_fc2': (s['time_fc2']['kernel'].shape, (21, 21)),
      'final_modulation': (s['modulation']['kernel'].shape, (21, 256)),
      'head': (s['head']['kernel'].shape, (128, 100)),
      'layer_modulation': (layer['modulation']['kernel'].shape, (21, 768)),
      'fc1': (layer['mlp']['fc1']['kernel'].shape, (128, 3072)),
      'fc2': (layer['mlp']['fc2']['kernel'].shape, (3072, 128)),
  }
  assert {k: v[0] for k, v in shapes.items()} == {k: v[1] for k, v in shapes.items()}
  assert sorted(p['blocks']) == [0, 1, 2]
  assert [len(p['blocks'][b]['layers']) for b in range(3)] == [4, 4, 4]
  assert 'cls_token' not in s  # the noisy label replaces CLS (release default)
  v = abstract_params(base_config('vit'))
  assert v['cls_token'].shape == (1, 1, 128) and v['pos_embed'].shape == (1, 65, 128)
  assert len(v['layers']) == 12


# --- initialisation (SPEC §2 "Init", §3.2-3.5) ---

def init_category(path: str, kind: str) -> str:
  leaf = path.split('/')[-1]
  if kind == 'dblock' and ('modulation' in path or path.startswith('shared/head')):
    return 'zero'
  if leaf == 'bias':
    return 'zero'
  if leaf == 'scale':
    return 'one'
  if leaf in ('kernel', 'pos_embed', 'cls_token', 'label_embed'):
    return 'normal'
  raise AssertionError(f'unexpected parameter {path}')


@pytest.mark.parametrize('kind', ['vit', 'dblock'])
def test_init_statistics(kind):
  params = flat(blocks.unstack(models.split(models.build(base_config(kind).model, seed=3, **CIFAR_DIMS))[1]))
  normal = []
  for path, leaf in params.items():
    leaf = np.asarray(leaf, np.float64)
    category = init_category(path, kind)
    if category == 'zero':
      np.testing.assert_array_equal(leaf, 0.0, err_msg=path)
    elif category == 'one':
      np.testing.assert_array_equal(leaf, 1.0, err_msg=path)
    else:
      n = leaf.size
      assert abs(leaf.mean()) < 6 * 0.02 / math.sqrt(n), path
      assert abs(leaf.std() / 0.02 - 1) < 6 / math.sqrt(2 * n), f'{path}: std {leaf.std()}'
      normal.append(leaf.ravel())
  pooled = np.concatenate(normal)
  assert abs(pooled.std() / 0.02 - 1) < 0.01
  # Untruncated (torch's trunc_normal_ cuts at ±2 absolute, i.e. ±100σ): millions of draws reach > 4σ.
  assert np.abs(pooled).max() > 4 * 0.02
  expected_zero = {'vit': [], 'dblock': ['shared/head/kernel', 'shared/modulation/kernel',
                                         'blocks/0/layers/0/modulation/kernel']}[kind]
  for path in expected_zero:
    assert init_category(path, kind) == 'zero' and path in params


def test_init_independent_copies_identical(tiny_config, tiny_model):
  _, _, params = tiny_model(tiny_config('dblock', model__independent_blocks=True))
  assert 'shared' not in params
  params = blocks.unstack(params)
  copies = [params['blocks'][b]['shared'] for b in range(3)]
  chex.assert_trees_all_equal(copies[0], copies[1])
  chex.assert_trees_all_equal(copies[0], copies[2])


def test_init_depends_on_seed(tiny_config, tiny_model):
  c = tiny_config('dblock')
  a, b = tiny_model(c, seed=0)[2], tiny_model(c, seed=1)[2]
  assert not np.array_equal(a['shared']['label_embed'], b['shared']['label_embed'])
  chex.assert_trees_all_equal(a, tiny_model(c, seed=0)[2])


# --- partition (SPEC §3) ---

def test_partition_layers_even():
  assert dblock.partition_layers(12, 3) == [4, 4, 4]
  assert dblock.partition_layers(12, 2) == [6, 6]
  assert dblock.partition_layers(12, 1) == [12]


def test_partition_layers_errors():
  with pytest.raises(ValueError, match='model.num_layers'):
    dblock.partition_layers(12, 5)
  with pytest.raises(ValueError, match='model.num_layers'):
    dblock.partition_layers(12, 3, (5, 4, 4))  # sums to 13
  with pytest.raises(ValueError, match='model.layers_per_block'):
    dblock.partition_layers(12, 3, (6, 6))  # wrong length
  with pytest.raises(ValueError, match='model.layers_per_block'):
    dblock.partition_layers(12, 3, (6, 6, 0))


def test_build_rejects_indivisible_depth(tiny_config):
  c = tiny_config('dblock', model__num_layers=4, model__num_blocks=3)
  with pytest.raises(ValueError, match='model.num_layers'):
    models.build(c.model, image_size=8, channels=3, num_classes=5)


def test_build_uses_explicit_uneven_partition(tiny_config, tiny_model, tiny_batch):
  c = tiny_config('dblock', model__num_layers=4, model__num_blocks=3, model__layers_per_block=(2, 1, 1))
  model, _, params = tiny_model(c)
  assert model.layer_counts == [2, 1, 1] and model.num_blocks == 3
  assert [len(params['blocks'][b]['layers']) for b in range(3)] == [2, 1, 1]
  images, _ = tiny_batch(4)
  for b in range(3):
    logits = model.denoise(jnp.asarray(images), jnp.ones((4, 24)), jnp.full((4,), 0.3), b)
    assert logits.shape == (4, 5)


def test_validated_partition_builds(tiny_config, tiny_model):
  """A config that `config.validate` accepts builds with the B that `config.num_blocks` reports; one it refuses
  is refused up front, by name (layers_per_block (2, 1) with num_blocks left at its default 3)."""
  refused = tiny_config('dblock', model__num_layers=3, model__layers_per_block=(2, 1))
  assert refused.model.num_blocks == 3  # left at the default
  with pytest.raises(config_lib.ConfigError, match=r'config\.model\.layers_per_block=\(2, 1\) must have '
                     r'config\.model\.num_blocks=3'):
    config_lib.validate(refused)
  for overrides, counts in [(dict(model__num_blocks=2, model__layers_per_block=(2, 1)), [2, 1]),
                            (dict(model__num_blocks=3), [1, 1, 1])]:
    c = tiny_config('dblock', model__num_layers=3, **overrides)
    config_lib.validate(c)
    model, _, _ = tiny_model(c)
    assert model.num_blocks == config_lib.num_blocks(c) and model.layer_counts == counts


def test_validate_and_partition_layers_agree(tiny_config):
  """`config.validate` states the partition rule; `partition_layers` accepts exactly what it accepts."""
  for num_layers in range(1, 7):
    for num_blocks in range(0, 5):
      for layers_per_block in [(), (num_layers - 1, 1), (1,) * num_blocks, (2,) * num_blocks, (0, num_layers)]:
        c = tiny_config('dblock', model__num_layers=num_layers, model__num_blocks=num_blocks,
                             model__layers_per_block=layers_per_block, model__hidden_size=24)
        try:
          config_lib.validate(c)
          accepted = True
        except config_lib.ConfigError:
          accepted = False
        try:
          counts = dblock.partition_layers(num_layers, num_blocks, layers_per_block)
        except ValueError as e:
          counts = None
          assert 'config.validate' in str(e)  # The model points at the one statement of the rule.
        assert accepted == (counts is not None), (num_layers, num_blocks, layers_per_block)
        if counts is not None:
          assert len(counts) == config_lib.num_blocks(c) and sum(counts) == num_layers


# --- forward against a NumPy reference of SPEC §2/§3 ---

def np_dense(x, p):
  return x @ np.asarray(p['kernel'], np.float64) + np.asarray(p['bias'], np.float64)


def np_ln(x, p, eps=1e-12):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu)**2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p['scale'], np.float64) + np.asarray(p['bias'], np.float64)


def np_silu(x):
  return x / (1 + np.exp(-x))


def np_patches(images, p, patch):
  n, h, w, c = images.shape
  x = images.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(n, (h // patch) * (w // patch), patch * patch * c)
  return x @ np.asarray(p['kernel'], np.float64).reshape(patch * patch * c, -1) + np.asarray(p['bias'])


def np_attention(x, p, heads):
  n, t, d = x.shape
  hd = d // heads
  q, k, v = (np_dense(x, p[name]).reshape(n, t, heads, hd) for name in ('query', 'key', 'value'))
  logits = np.einsum('nqhd,nkhd->nhqk', q, k) / math.sqrt(hd)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np_dense(np.einsum('nhqk,nkhd->nqhd', probs, v).reshape(n, t, d), p['out'])


def np_mlp(x, p):
  h = np_dense(x, p['fc1'])
  return np_dense(0.5 * h * (1 + special.erf(h / math.sqrt(2))), p['fc2'])


def np_layer(x, p, heads, cond=None):
  if cond is None:
    x = x + np_attention(np_ln(x, p['norm1']), p['attn'], heads)
    return x + np_mlp(np_ln(x, p['norm2']), p['mlp'])
  mod = np_silu(np_dense(cond, p['modulation']))[:, None, :]
  shift1, scale1, gate1, shift2, scale2, gate2 = np.split(mod, 6, axis=-1)
  x = x + gate1 * np_attention(np_ln(x, p['norm1']) * (1 + scale1) + shift1, p['attn'], heads)
  return x + gate2 * np_mlp(np_ln(x, p['norm2']) * (1 + scale2) + shift2, p['mlp'])


def np_vit(params, images, cfg):
  x = np_patches(images, params['patch']['proj'], cfg.patch_size)
  cls = np.broadcast_to(np.asarray(params['cls_token'], np.float64), (x.shape[0], 1, x.shape[-1]))
  x = np.concatenate([cls, x], 1) + np.asarray(params['pos_embed'])
  for i in range(cfg.num_layers):
    x = np_layer(x, params['layers'][i], cfg.num_heads)
  return np_dense(np_ln(x, params['norm'])[:, 0], params['head'])


def np_denoise(params, images, z_t, sigmas, block, cfg, sigma_data=0.5):
  params = blocks.unstack(params)  # Block by block (a no-op for a list of blocks).
  s = params['blocks'][block]['shared'] if cfg.independent_blocks else params['shared']
  sig = sigmas.astype(np.float64)
  c_skip = sigma_data**2 / (sig**2 + sigma_data**2)
  c_out = sig * sigma_data / np.sqrt(sig**2 + sigma_data**2)
  c_in = 1 / np.sqrt(sig**2 + sigma_data**2)
  c_noise = 0.25 * np.log(sig)
  x = np_patches(images, s['patch']['proj'], cfg.patch_size)
  label = (c_in[:, None] * z_t)[:, None, :]
  if cfg.label_token == 'replace':
    x = np.concatenate([label, x], 1)
  else:
    cls = np.broadcast_to(np.asarray(s['cls_token'], np.float64), label.shape)
    x = np.concatenate([cls, x, label], 1)
  x = x + np.asarray(s['pos_embed'])
  freqs = np.exp(-math.log(10000) * np.arange(128) / 128)
  t = np.concatenate([np.cos(c_noise[:, None] * freqs), np.sin(c_noise[:, None] * freqs)], -1)
  cond = np_silu(np_dense(np_silu(np_dense(t, s['time_fc1'])), s['time_fc2']))
  for layer in params['blocks'][block]['layers'].values():
    x = np_layer(x, layer, cfg.num_heads, cond)
  h = np_ln(x, s['norm'])[:, 0]
  out = c_out[:, None] * h + c_skip[:, None] * z_t
  shift, scale = np.split(np_silu(np_dense(cond, s['modulation'])), 2, -1)
  return np_dense(out * (1 + scale) + shift, s['head'])


def test_vit_forward_matches_reference(tiny_config, tiny_model, tiny_batch, jitter_params):
  c = tiny_config('vit')
  _, graphdef, params = tiny_model(c)
  params = jitter_params(params, scale=0.1)
  images, _ = tiny_batch(6)
  logits = nnx.merge(graphdef, params)(jnp.asarray(images))
  assert logits.shape == (6, 5) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, np_vit(params, images.astype(np.float64), c.model), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('variant', [{}, {'model__label_token': 'concat'}, {'model__independent_blocks': True}])
def test_denoise_matches_reference(tiny_config, tiny_model, tiny_batch, jitter_params, variant):
  c = tiny_config('dblock', **variant)
  _, graphdef, params = tiny_model(c)
  params = jitter_params(params, scale=0.1)  # the zero-initialised modulation/head now matter
  images, _ = tiny_batch(6)
  z_t = np.random.default_rng(1).normal(size=(6, 24)).astype(np.float32)
  sigmas = np.array([80.0, 3.0, 0.5, 0.3, 0.05, 0.002], np.float32)
  model = nnx.merge(graphdef, params)
  for b in range(3):
    logits = model.denoise(jnp.asarray(images), jnp.asarray(z_t), jnp.asarray(sigmas), b)
    assert logits.shape == (6, 5) and logits.dtype == jnp.float32
    expected = np_denoise(params, images.astype(np.float64), z_t.astype(np.float64), sigmas, b, c.model)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4, err_msg=f'block {b}')


def test_concat_layout(tiny_config, tiny_model, tiny_batch):
  c = tiny_config('dblock', model__label_token='concat')
  model, _, params = tiny_model(c)
  assert params['shared']['cls_token'].shape == (1, 1, 24)
  assert params['shared']['pos_embed'].shape == (1, 4 + 2, 24)  # CLS + 4 patches + label token
  images, _ = tiny_batch(3)
  logits = model.denoise(jnp.asarray(images), jnp.ones((3, 24)), jnp.full((3,), 0.3), 1)
  assert logits.shape == (3, 5) and np.all(np.isfinite(logits))


def test_zero_init_dblock_outputs_zero_logits(tiny_config, tiny_model, tiny_batch):
  """At init the head is zero, so every block's logits are exactly 0 (uniform prediction)."""
  model, _, _ = tiny_model(tiny_config('dblock'))
  images, _ = tiny_batch(3)
  for b in range(3):
    logits = model.denoise(jnp.asarray(images), jnp.ones((3, 24)), jnp.full((3,), 0.3), b)
    np.testing.assert_array_equal(logits, 0.0)


# --- block isolation ---

@pytest.mark.parametrize('independent', [False, True])
def test_denoise_reads_only_its_block(tiny_config, tiny_model, tiny_batch, jitter_params, independent):
  c = tiny_config('dblock', model__independent_blocks=independent)
  _, graphdef, params = tiny_model(c)
  params = jitter_params(params, scale=0.1)
  images, _ = tiny_batch(4)
  z_t = jnp.asarray(np.random.default_rng(2).normal(size=(4, 24)), jnp.float32)
  sigmas = jnp.array([0.01, 0.3, 1.0, 10.0])
  images = jnp.asarray(images)
  fn = lambda p, b: nnx.merge(graphdef, p).denoise(images, z_t, sigmas, b)

  def perturbed(which):
    per_block = blocks.unstack(params)['blocks']
    per_block = {k: jitter_params(v, seed=100 + k, scale=0.5) if k in which else v for k, v in per_block.items()}
    return blocks.restack(dict(params, blocks=per_block))

  for b in range(3):
    reference = fn(params, b)
    others = [k for k in range(3) if k != b]
    chex.assert_trees_all_equal(fn(perturbed(others), b), reference)
    # ... while perturbing block b itself does change its logits (so the check can fail).
    assert np.max(np.abs(fn(perturbed([b]), b) - reference)) > 1e-3


# --- dropout and dtypes ---

@pytest.mark.parametrize('kind', ['vit', 'dblock'])
def test_dropout_key(tiny_config, tiny_model, tiny_batch, jitter_params, kind):
  c = tiny_config(kind)
  assert c.model.dropout > 0 and c.model.attention_dropout > 0
  _, graphdef, params = tiny_model(c)
  params = jitter_params(params, scale=0.1)
  images = jnp.asarray(tiny_batch(4)[0])

  def fn(p, key):
    model = nnx.merge(graphdef, p)
    if kind == 'vit':
      return model(images, key=key)
    return model.denoise(images, jnp.ones((4, 24)), jnp.full((4,), 0.3), 1, key=key)

  def fn_eval(p):
    model = nnx.merge(graphdef, p)
    if kind == 'vit':
      return model(images)
    return model.denoise(images, jnp.ones((4, 24)), jnp.full((4,), 0.3), 1)

  chex.assert_trees_all_equal(fn_eval(params), fn_eval(params))
  k1, k2 = jax.random.key(1), jax.random.key(2)
  on1 = fn(params, k1)
  chex.assert_trees_all_equal(on1, fn(params, k1))  # same key: same mask
  assert np.max(np.abs(on1 - fn_eval(params))) > 1e-4
  assert np.max(np.abs(on1 - fn(params, k2))) > 1e-4


@pytest.mark.parametrize('kind', ['vit', 'dblock'])
def test_bfloat16_compute(tiny_config, tiny_model, tiny_batch, jitter_params, kind):
  c16, c32 = tiny_config(kind, model__compute_dtype='bfloat16'), tiny_config(kind)
  _, graphdef16, params16 = tiny_model(c16)
  _, graphdef32, params32 = tiny_model(c32)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params16))
  chex.assert_trees_all_equal(params16, params32)  # same draws; only the compute dtype differs
  params = jitter_params(params32, scale=0.1)
  images, _ = tiny_batch(4)

  def run(graphdef):
    model = nnx.merge(graphdef, params)
    if kind == 'vit':
      return model(jnp.asarray(images))
    return model.denoise(jnp.asarray(images), jnp.ones((4, 24)), jnp.full((4,), 0.3), 2)

  l16, l32 = run(graphdef16), run(graphdef32)
  assert l16.dtype == jnp.float32 and np.all(np.isfinite(l16))
  assert not np.array_equal(l16, l32)  # bf16 really computes in bf16
  np.testing.assert_allclose(l16, l32, atol=0.05 * float(np.max(np.abs(l32))) + 1e-3)


def test_build_rejects_unknown_dtype(tiny_config):
  with pytest.raises(ValueError, match='compute_dtype'):
    models.build(tiny_config('dblock', model__compute_dtype='float16').model, image_size=8, channels=3,
                 num_classes=5)
