"""Importing the PyTorch release (SPEC §9), checked against an independent float64 NumPy forward (§2, §3)."""

import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from scipy import special


from diffblocks_jax import models
from diffblocks_jax.tools import import_torch
from helpers import HANG_GUARD_S, ROOT, base_config, shipped_config, subprocess_env

HIDDEN, HEADS, LAYERS, MLP, PATCH, IMAGE, CHANNELS, CLASSES = 24, 4, 4, 48, 4, 8, 3, 10


# --- the release's state dict, written from SPEC §9 alone -------------------------------------------------
def release_shapes(kind, hidden=HIDDEN, layers=LAYERS, mlp=MLP, patch=PATCH, image=IMAGE,
                   channels=CHANNELS, classes=CLASSES):
  dc, tokens = hidden // 6, (image // patch)**2 + 1
  s = {'vit.embeddings.position_embeddings': (1, tokens, hidden),
       'vit.embeddings.patch_embeddings.projection.weight': (hidden, channels, patch, patch),
       'vit.embeddings.patch_embeddings.projection.bias': (hidden,),
       'vit.layernorm.weight': (hidden,), 'vit.layernorm.bias': (hidden,),
       'classifier.weight': (classes, hidden), 'classifier.bias': (classes,)}
  for i in range(layers):
    p = f'vit.encoder.layer.{i}.'
    for name in ('attention.attention.query', 'attention.attention.key', 'attention.attention.value',
                 'attention.output.dense'):
      s[p + name + '.weight'], s[p + name + '.bias'] = (hidden, hidden), (hidden,)
    s[p + 'intermediate.dense.weight'], s[p + 'intermediate.dense.bias'] = (mlp, hidden), (mlp,)
    s[p + 'output.dense.weight'], s[p + 'output.dense.bias'] = (hidden, mlp), (hidden,)
    for name in ('layernorm_before', 'layernorm_after'):
      s[p + name + '.weight'], s[p + name + '.bias'] = (hidden,), (hidden,)
    if kind == 'dblock':
      s[p + 'adaLN_modulation.linear.weight'], s[p + 'adaLN_modulation.linear.bias'] = (6 * hidden, dc), (6 * hidden,)
  if kind == 'vit':
    s['vit.embeddings.cls_token'] = (1, 1, hidden)
  else:
    s.update({'vit.embeddings.label_embeddings.weight': (classes, hidden),
              'vit.time_embedder.mlp.0.weight': (dc, 256), 'vit.time_embedder.mlp.0.bias': (dc,),
              'vit.time_embedder.mlp.2.weight': (dc, dc), 'vit.time_embedder.mlp.2.bias': (dc,),
              'adaLN_modulation.linear.weight': (2 * hidden, dc), 'adaLN_modulation.linear.bias': (2 * hidden,)})
  return s


def release_state_dict(kind, seed=0, zeros=False, **dims):
  """Random values of O(1) effect everywhere, zero-initialised modulation and classifier included."""
  rng, out = np.random.default_rng(seed), {'sigmas': np.array([0.002, 0.18, 0.5, 80.0], np.float32)}
  for key, shape in release_shapes(kind, **dims).items():
    if zeros:
      x = np.zeros(shape)
    elif 'layernorm' in key and key.endswith('weight'):
      x = 1 + 0.2 * rng.standard_normal(shape)
    elif key.endswith('weight') and len(shape) >= 2:  # Linear / conv: fan-in scaled.
      x = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    else:
      x = 0.3 * rng.standard_normal(shape)
    out['model.' + key] = x.astype(np.float32)
  return out


def small_config(kind, layers_per_block=(), independent=False):
  """configs/testing.py at the size of release_state_dict's model."""
  return shipped_config(f'testing.py:{kind}', model__hidden_size=HIDDEN, model__num_heads=HEADS,
                        model__num_layers=LAYERS, model__mlp_dim=MLP, model__patch_size=PATCH, model__num_blocks=2,
                        model__layers_per_block=layers_per_block, model__independent_blocks=independent)


# --- independent float64 reference (HF ViT layer; SPEC §3 conditioning) ----------------------------------
def linear(x, w, name):
  return x @ w[name + '.weight'].T + w[name + '.bias']


def layer_norm(x, w, name):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu)**2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-12) * w[name + '.weight'] + w[name + '.bias']


def silu(x):
  return x / (1 + np.exp(-x))


def patchify(w, images):  # NHWC images, torch conv (out, in, kh, kw), patches in row-major order.
  n, h, wd, c = images.shape
  x = images.reshape(n, h // PATCH, PATCH, wd // PATCH, PATCH, c)
  kernel = w['vit.embeddings.patch_embeddings.projection.weight']
  y = np.einsum('nhpwqc,dcpq->nhwd', x, kernel) + w['vit.embeddings.patch_embeddings.projection.bias']
  return y.reshape(n, -1, y.shape[-1])


def attention(w, x, p):
  n, t, d = x.shape
  heads = lambda y: y.reshape(n, t, HEADS, d // HEADS).transpose(0, 2, 1, 3)
  q, k, v = (heads(linear(x, w, p + 'attention.attention.' + m)) for m in ('query', 'key', 'value'))
  s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // HEADS)
  a = np.exp(s - s.max(-1, keepdims=True))
  ctx = (a / a.sum(-1, keepdims=True)) @ v
  return linear(ctx.transpose(0, 2, 1, 3).reshape(n, t, d), w, p + 'attention.output.dense')


def mlp(w, x, p):
  h = linear(x, w, p + 'intermediate.dense')
  return linear(0.5 * h * (1 + special.erf(h / np.sqrt(2))), w, p + 'output.dense')


def layer(w, x, i, cond=None):
  p = f'vit.encoder.layer.{i}.'
  if cond is None:
    x = x + attention(w, layer_norm(x, w, p + 'layernorm_before'), p)
    return x + mlp(w, layer_norm(x, w, p + 'layernorm_after'), p)
  m = silu(linear(cond, w, p + 'adaLN_modulation.linear'))[:, None, :]
  sh1, sc1, g1, sh2, sc2, g2 = np.split(m, 6, axis=-1)
  x = x + g1 * attention(w, layer_norm(x, w, p + 'layernorm_before') * (1 + sc1) + sh1, p)
  return x + g2 * mlp(w, layer_norm(x, w, p + 'layernorm_after') * (1 + sc2) + sh2, p)


def reference_vit(w, images):
  x = patchify(w, images)
  cls = np.broadcast_to(w['vit.embeddings.cls_token'], (x.shape[0], 1, x.shape[-1]))
  x = np.concatenate([cls, x], 1) + w['vit.embeddings.position_embeddings']
  for i in range(LAYERS):
    x = layer(w, x, i)
  return linear(layer_norm(x, w, 'vit.layernorm')[:, 0], w, 'classifier')


def reference_denoise(w, images, z_t, sigma, layer_ids):
  sd2 = 0.25  # sigma_data².
  c_skip, c_out = sd2 / (sigma**2 + sd2), sigma * 0.5 / np.sqrt(sigma**2 + sd2)
  c_in, c_noise = 1 / np.sqrt(sigma**2 + sd2), 0.25 * np.log(sigma)
  x = np.concatenate([(c_in[:, None] * z_t)[:, None], patchify(w, images)], 1)
  x = x + w['vit.embeddings.position_embeddings']
  args = c_noise[:, None] * np.exp(-np.log(10000) * np.arange(128) / 128)
  t = np.concatenate([np.cos(args), np.sin(args)], -1)
  cond = silu(linear(silu(linear(t, w, 'vit.time_embedder.mlp.0')), w, 'vit.time_embedder.mlp.2'))
  for i in layer_ids:
    x = layer(w, x, i, cond)
  out = c_out[:, None] * layer_norm(x, w, 'vit.layernorm')[:, 0] + c_skip[:, None] * z_t
  shift, scale = np.split(silu(linear(cond, w, 'adaLN_modulation.linear')), 2, axis=-1)
  return linear(out * (1 + scale) + shift, w, 'classifier')


def as_float64(state_dict):
  return {k[len('model.'):]: v.astype(np.float64) for k, v in state_dict.items() if k != 'sigmas'}


def build(config, **dims):
  dims = dict(image_size=IMAGE, channels=CHANNELS, num_classes=CLASSES) | dims
  return models.build(config.model, **dims)


def relative_error(out, ref):
  return np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)


# --- tests --------------------------------------------------------------------------------------------------
def test_baseline_logits_match_numpy_reference():
  config, sd = small_config('vit'), release_state_dict('vit')
  graphdef, _ = models.split(build(config))
  model = nnx.merge(graphdef, import_torch.convert(sd, config))
  images = np.random.default_rng(1).standard_normal((3, IMAGE, IMAGE, CHANNELS))
  ref = reference_vit(as_float64(sd), images)
  assert relative_error(model(images.astype(np.float32)), ref) <= 1e-5


@pytest.mark.parametrize('layers_per_block,independent,block_layers', [
    ((), False, [[0, 1], [2, 3]]), ((3, 1), False, [[0, 1, 2], [3]]), ((), True, [[0, 1], [2, 3]])])
def test_dblock_denoise_matches_numpy_reference(layers_per_block, independent, block_layers):
  config, sd = small_config('dblock', layers_per_block, independent), release_state_dict('dblock', seed=2)
  graphdef, _ = models.split(build(config))
  model = nnx.merge(graphdef, import_torch.convert(sd, config))
  rng = np.random.default_rng(3)
  images = rng.standard_normal((4, IMAGE, IMAGE, CHANNELS))
  sigmas = np.array([0.002, 0.2, 3.0, 80.0])
  z_t = rng.standard_normal((4, HIDDEN)) * (1 + sigmas[:, None])
  for block, layer_ids in enumerate(block_layers):
    ref = reference_denoise(as_float64(sd), images, z_t, sigmas, layer_ids)
    out = model.denoise(images.astype(np.float32), z_t.astype(np.float32), sigmas.astype(np.float32), block)
    assert relative_error(out, ref) <= 1e-5, block


@pytest.mark.parametrize('kind,millions', [('vit', 10.30), ('dblock', 10.53)])
def test_cifar_config_converts_to_the_exact_tree(kind, millions):
  config = base_config(kind)
  sd = release_state_dict(kind, zeros=True, hidden=128, layers=12, mlp=3072, image=32, classes=100)
  params = import_torch.convert(sd, config)
  dims = dict(image_size=32, channels=3, num_classes=100)
  _, want = models.split(nnx.eval_shape(lambda: models.build(config.model, **dims)))
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(want)
  for got, ref in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want)):
    assert (got.shape, got.dtype) == (ref.shape, ref.dtype)
  assert round(sum(x.size for x in jax.tree_util.tree_leaves(params)) / 1e6, 2) == millions


def test_every_bad_key_is_named_and_nothing_is_written(tmp_path):
  config, sd = small_config('dblock'), release_state_dict('dblock')
  del sd['model.vit.encoder.layer.3.attention.output.dense.weight']
  sd['model.vit.encoder.layer.9.extra.weight'] = np.ones(3, np.float32)
  sd['model.vit.time_embedder.mlp.2.bias'] = np.ones(5, np.float32)
  path, workdir = str(tmp_path / 'bad.npz'), tmp_path / 'run'
  np.savez(path, **sd)
  with pytest.raises(import_torch.CheckpointImportError) as e:
    import_torch.import_checkpoint(path, config, str(workdir))
  msg = str(e.value)
  assert 'missing: model.vit.encoder.layer.3.attention.output.dense.weight' in msg
  assert 'unexpected: model.vit.encoder.layer.9.extra.weight' in msg
  assert 'mis-shaped: model.vit.time_embedder.mlp.2.bias: checkpoint (5,), expected (4,)' in msg
  assert not workdir.exists()


def test_shape_mismatches_name_the_key_and_both_shapes():
  sd = release_state_dict('dblock')
  with pytest.raises(import_torch.CheckpointImportError, match=r'position_embeddings: checkpoint \(1, 5, 24\), '
                     r'expected \(1, 17, 24\)'):
    import_torch.convert(sd, small_config('dblock'), image_size=16)  # The data says 16 px, the file 8.
  config = small_config('dblock')
  config.model.patch_size = 2
  with pytest.raises(import_torch.CheckpointImportError, match=r'projection.weight: checkpoint \(24, 3, 4, 4\), '
                     r'expected \(24, 3, 2, 2\)'):
    import_torch.convert(sd, config)
  with pytest.raises(import_torch.CheckpointImportError, match='kind=dblock'):
    import_torch.convert(sd, small_config('vit'))


def test_keys_without_prefix_are_accepted():
  config, sd = small_config('vit'), release_state_dict('vit')
  a = import_torch.convert(sd, config)
  b = import_torch.convert({k.removeprefix('model.'): v for k, v in sd.items()}, config)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  with pytest.raises(import_torch.CheckpointImportError, match='same parameter'):
    import_torch.convert(sd | {'classifier.bias': sd['model.classifier.bias']}, config)


def test_npz_and_safetensors_round_trip(tmp_path):
  sd = release_state_dict('dblock')
  np.savez(tmp_path / 'w.npz', **sd)
  paths = [tmp_path / 'w.npz']
  if importlib.util.find_spec('safetensors'):
    from safetensors.numpy import save_file
    save_file(sd, str(tmp_path / 'w.safetensors'))
    paths.append(tmp_path / 'w.safetensors')
  want = import_torch.convert(sd, small_config('dblock'))
  for path in paths:
    loaded = import_torch.load_state_dict(str(path))
    assert sorted(loaded) == sorted(sd)
    for k in sd:
      np.testing.assert_array_equal(loaded[k], sd[k])
    got = import_torch.convert(loaded, small_config('dblock'))
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


@pytest.mark.skipif(importlib.util.find_spec('torch') is not None, reason='torch is installed')
def test_lightning_checkpoint_without_torch_says_what_to_do(tmp_path):
  (tmp_path / 'last.ckpt').write_bytes(b'not read')
  with pytest.raises(import_torch.CheckpointImportError, match=r'pip install torch.*\n.*np\.savez'):
    import_torch.load_state_dict(str(tmp_path / 'last.ckpt'))


@pytest.mark.slow  # A CLI run.
def test_cli_writes_step_zero_once(tmp_path):
  np.savez(tmp_path / 'w.npz', **release_state_dict('dblock'))
  overrides = [f'--config.model.{k}={v}' for k, v in dict(
      hidden_size=HIDDEN, num_heads=HEADS, num_layers=LAYERS, mlp_dim=MLP, num_blocks=2).items()]
  cmd = [sys.executable, '-m', 'diffblocks_jax.tools.import_torch', f'--input={tmp_path / "w.npz"}',
         f'--config={ROOT}/configs/testing.py:dblock', f'--workdir={tmp_path / "run"}', *overrides]
  env = subprocess_env()
  first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert first.returncode == 0, first.stderr[-3000:]
  assert os.listdir(tmp_path / 'run' / 'checkpoints')
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert again.returncode != 0 and 'already holds checkpoints' in again.stderr


def _bad_npz_files(tmp_path):
  """name -> (path, what the message must say) for files np.load fails on, or calls 'pickled' wrongly."""
  good = tmp_path / 'good.npz'
  np.savez(good, **release_state_dict('dblock'))
  blob = good.read_bytes()
  files = {'empty': (b'', 'empty (0 bytes)'), 'truncated': (blob[:len(blob) // 2], 'not a readable .npz'),
           'text': (b'model.classifier.weight 1 2 3\n', 'not a .npz')}
  out = {}
  for name, (data, says) in files.items():
    (tmp_path / f'{name}.npz').write_bytes(data)
    out[name] = (tmp_path / f'{name}.npz', says)
  np.savez(tmp_path / 'pickled.npz', **{'model.classifier.bias': np.array([{'a': 1}], dtype=object)})
  out['pickled'] = (tmp_path / 'pickled.npz', "'model.classifier.bias' holds pickled Python objects")
  return out


def test_bad_npz_files_are_named(tmp_path):
  for name, (path, says) in _bad_npz_files(tmp_path).items():
    with pytest.raises(import_torch.CheckpointImportError) as e:
      import_torch.load_state_dict(str(path))
    assert f'--input={path}' in str(e.value) and says in str(e.value), (name, str(e.value))
    if name != 'pickled':
      assert 'pickle' not in str(e.value), (name, str(e.value))


def test_non_finite_weights_are_refused_by_key(tmp_path):
  sd = release_state_dict('dblock')
  sd['model.vit.encoder.layer.1.output.dense.weight'][0, :3] = [np.nan, np.inf, -np.inf]
  sd['model.classifier.bias'][2] = np.nan
  with pytest.raises(import_torch.CheckpointImportError) as e:
    import_torch.import_checkpoint(_saved(tmp_path, sd), small_config('dblock'), str(tmp_path / 'run'))
  msg = str(e.value)
  assert 'non-finite: model.vit.encoder.layer.1.output.dense.weight has 3 NaN/inf' in msg, msg
  assert 'non-finite: model.classifier.bias has 1 NaN/inf' in msg, msg
  assert not (tmp_path / 'run').exists()


def _saved(tmp_path, sd) -> str:
  np.savez(tmp_path / 'w.npz', **sd)
  return str(tmp_path / 'w.npz')


_KILLED_IMPORT = """
import os, sys
sys.path.insert(0, sys.argv[1])
from test_import_torch import release_state_dict, small_config
from diffblocks_jax.tools import import_torch
from diffblocks_jax.training import checkpointing
checkpointing.Checkpointer.wait = lambda self: os._exit(9)  # Killed while Orbax writes its tmp folder.
import_torch.import_checkpoint(sys.argv[2], small_config('dblock'), sys.argv[3])
"""


@pytest.mark.slow  # Subprocesses.
def test_a_killed_import_does_not_block_the_retry(tmp_path):
  from diffblocks_jax.training import checkpointing
  path, workdir = _saved(tmp_path, release_state_dict('dblock')), tmp_path / 'run'
  killed = subprocess.run([sys.executable, '-c', _KILLED_IMPORT, os.path.dirname(__file__), path, str(workdir)],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
  assert killed.returncode == 9, killed.stderr[-3000:]
  leftovers = os.listdir(workdir / 'checkpoints')
  assert leftovers and all('tmp' in name for name in leftovers), leftovers  # Unfinished: no step.
  assert import_torch.import_checkpoint(path, small_config('dblock'), str(workdir)) == 0
  assert checkpointing.Checkpointer(workdir / 'checkpoints').all_steps() == [0]
  with pytest.raises(import_torch.CheckpointImportError, match=r'already holds checkpoints \(steps \[0\]\)'):
    import_torch.import_checkpoint(path, small_config('dblock'), str(workdir))  # A finished one still counts.
