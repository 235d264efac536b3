"""The Euler sampler over blocks, classifier-free guidance and whole-split prediction (SPEC §7)."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from diffblocks_jax.core import partitions
from diffblocks_jax.tasks import classification
from diffblocks_jax.models import dblock

NUM_BLOCKS, HIDDEN, N = 3, 24, 4


@pytest.fixture(scope='module')
def setup(tiny_config, tiny_model, jitter_params, tiny_batch):
  """(config, graphdef, params, model, images): jittered so every part of the model matters."""
  config = tiny_config('dblock')
  _, graphdef, params = tiny_model(config)
  params = jitter_params(params, seed=11, scale=0.1)
  images = jnp.asarray(tiny_batch(N, seed=4)[0])
  return config, graphdef, params, nnx.merge(graphdef, params), images


def reference_schedule(num_steps):
  law = stats.norm(-1.2, 1.2)
  u = np.linspace(law.cdf(math.log(0.002)), law.cdf(math.log(80.0)), num_steps)
  sigmas = np.exp(law.ppf(u))
  sigmas[0], sigmas[-1] = 0.002, 80.0
  return sigmas[::-1]


def reference_route(sigma, num_blocks=NUM_BLOCKS):
  bounds = np.asarray(reference_schedule(num_blocks + 1)[::-1], np.float32)
  return num_blocks - 1 - int(np.clip(np.sum(np.float32(sigma) >= bounds) - 1, 0, num_blocks - 1))


def reference_sample(model, images, key, num_steps, normalized=False, cfg_scale=1.0):
  """SPEC §7 written out: Euler steps on z, x̂ = softmax(logits)·E, guidance from two separate passes."""
  sigmas = reference_schedule(num_steps)
  n = images.shape[0]
  z = np.asarray(jax.random.normal(key, (n, HIDDEN), jnp.float32), np.float64) * math.sqrt(1 + sigmas[0]**2)
  visited = []

  def logits_at(i):
    b = reference_route(sigmas[i])
    visited.append(b)
    s = jnp.full((n,), sigmas[i], jnp.float32)
    zz = jnp.asarray(z, jnp.float32)
    cond = np.asarray(model.denoise(images, zz, s, b), np.float64)
    if cfg_scale == 1.0:
      return cond, b
    uncond = np.asarray(model.denoise(jnp.zeros_like(images), zz, s, b), np.float64)
    return uncond + cfg_scale * (cond - uncond), b

  for i in range(num_steps - 1):
    logits, b = logits_at(i)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    table = np.asarray(model.label_embeddings(b), np.float64)
    if normalized:
      table = table / np.linalg.norm(table, axis=-1, keepdims=True)
    z = z + (sigmas[i + 1] - sigmas[i]) * (z - p @ table) / sigmas[i]
  logits, _ = logits_at(num_steps - 1)
  return logits, visited


@pytest.fixture
def denoise_calls(monkeypatch):
  """Records (block, batch size) of every DiffusionBlocksViT.denoise call (also while tracing)."""
  calls = []
  original = dblock.DiffusionBlocksViT.denoise

  def recording(self, images, z_t, sigmas, block, **kwargs):
    calls.append((block, images.shape[0]))
    return original(self, images, z_t, sigmas, block, **kwargs)

  monkeypatch.setattr(dblock.DiffusionBlocksViT, 'denoise', recording)
  return calls


@pytest.mark.parametrize('num_steps, blocks', [(0, [0, 1, 2]), (3, [0, 1, 2]), (5, [0, 0, 1, 2, 2])])
def test_sampler_visits_blocks(setup, denoise_calls, num_steps, blocks):
  """N = B (0 = default) runs each block exactly once, high noise first; N = 5 follows route_static."""
  config, graphdef, params, _, images = setup
  config = config.copy_and_resolve_references()
  config.eval.num_inference_steps = num_steps
  predict = jax.jit(classification.make_predict_fn(graphdef, config))
  jax.block_until_ready(predict(params, images, jax.random.key(0)))
  assert denoise_calls == [(b, N) for b in blocks]
  schedule = partitions.inference_sigmas(num_steps or NUM_BLOCKS)
  assert [partitions.route_static(s, NUM_BLOCKS) for s in schedule] == blocks
  denoise_calls.clear()
  predict(params, images, jax.random.key(1))  # cached: no retrace
  assert denoise_calls == []


def test_guidance_batches_unconditional_pass(setup, denoise_calls):
  config, graphdef, params, _, images = setup
  predict = jax.jit(classification.make_predict_fn(graphdef, config, cfg_scale=2.0))
  jax.block_until_ready(predict(params, images, jax.random.key(0)))
  assert denoise_calls == [(b, 2 * N) for b in (0, 1, 2)]  # one pass per step, cond + uncond batched


@pytest.mark.parametrize('num_steps', [3, 5])
@pytest.mark.parametrize('normalized', [False, True])
@pytest.mark.parametrize('cfg_scale', [1.0, 2.5])
def test_sample_matches_reference(setup, num_steps, normalized, cfg_scale):
  _, _, _, model, images = setup
  key = jax.random.key(3)
  logits = classification.sample(model, images, key, num_steps=num_steps, edm=partitions.DEFAULT_EDM,
                          normalized_embeddings=normalized, cfg_scale=cfg_scale)
  expected, visited = reference_sample(model, images, key, num_steps, normalized, cfg_scale)
  assert visited == [partitions.route_static(s, NUM_BLOCKS) for s in partitions.inference_sigmas(num_steps)]
  assert logits.shape == (N, 5)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_guided_logits(setup):
  _, _, _, model, images = setup
  z = jax.random.normal(jax.random.key(9), (N, HIDDEN))
  sigmas = jnp.full((N,), 0.3012, jnp.float32)
  lx = np.asarray(model.denoise(images, z, sigmas, 1), np.float64)
  l0 = np.asarray(model.denoise(jnp.zeros_like(images), z, sigmas, 1), np.float64)
  assert np.max(np.abs(lx - l0)) > 1e-3  # the image matters, so guidance changes something
  # s = 1: exactly the plain conditional pass.
  chex.assert_trees_all_equal(classification.guided_logits(model, images, z, 0.3012, 1, 1.0),
                              model.denoise(images, z, sigmas, 1))
  for s in (0.0, 1.5, 3.0):
    np.testing.assert_allclose(classification.guided_logits(model, images, z, 0.3012, 1, s), l0 + s * (lx - l0),
                               rtol=1e-5, atol=1e-5)


def test_normalized_embeddings_change_predictions(setup):
  _, _, _, model, images = setup
  key = jax.random.key(4)
  kwargs = dict(num_steps=3, edm=partitions.DEFAULT_EDM)
  raw = classification.sample(model, images, key, normalized_embeddings=False, **kwargs)
  norm = classification.sample(model, images, key, normalized_embeddings=True, **kwargs)
  assert np.max(np.abs(np.asarray(raw) - np.asarray(norm))) > 1e-3
  # The final step's block is the same; only the path through z differs.
  table = np.asarray(model.label_embeddings(0))
  assert not np.allclose(np.linalg.norm(table, axis=-1), 1.0)


def test_trajectory(setup):
  _, _, _, model, images = setup
  logits, traj = classification.sample(model, images, jax.random.key(2), num_steps=3, edm=partitions.DEFAULT_EDM,
                                return_trajectory=True)
  assert traj.shape == (N, 3, 5)
  np.testing.assert_allclose(traj.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(traj[:, -1], jax.nn.softmax(logits, -1), rtol=1e-6)


def test_vit_predict_fn(tiny_config, tiny_model, tiny_batch):
  config = tiny_config('vit')
  model, graphdef, params = tiny_model(config)
  images = jnp.asarray(tiny_batch(3)[0])
  predict = classification.make_predict_fn(graphdef, config)
  chex.assert_trees_all_close(predict(params, images, jax.random.key(0)), model(images), rtol=1e-6)


# --- whole splits ---

def counting_jit(fn):
  """jax.jit(fn) plus a list that grows by one per trace (= per compilation)."""
  traces = []

  def traced(*args):
    traces.append(jax.tree.map(lambda a: a.shape, args[1]))
    return fn(*args)

  return jax.jit(traced), traces


@pytest.mark.parametrize('n, batch_size', [(11, 4), (12, 4), (3, 4), (1, 1)])
def test_predict_split_scores_every_example(n, batch_size):
  images = np.arange(n * 2 * 2 * 1, dtype=np.uint8).reshape(n, 2, 2, 1) + 1
  # A stand-in predictor: row i of its output is image i's pixels, so any drop/shift/padding shows.
  predict, traces = counting_jit(lambda params, x, key: x.reshape(x.shape[0], -1).astype(jnp.float32) * params)
  out = classification.predict_split(predict, jnp.float32(2.0), images, batch_size, jax.random.key(0),
                              preprocess=lambda x: x)
  assert out.shape == (n, 4)
  np.testing.assert_array_equal(out, 2.0 * images.reshape(n, -1))
  assert len(traces) == 1, traces  # padding keeps one batch shape
  assert traces[0] == (batch_size, 2, 2, 1)


def test_predict_split_accuracy_over_all_examples():
  labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1])  # 11: not a multiple of 4
  images = labels.reshape(-1, 1, 1, 1).astype(np.uint8)
  predict = jax.jit(lambda params, x, key: jax.nn.one_hot(x.reshape(-1), 3))
  logits = classification.predict_split(predict, None, images, 4, jax.random.key(0))
  np.testing.assert_array_equal(np.argmax(logits, -1), labels)
  assert classification.accuracy(logits, labels) == 1.0
  wrong = labels.copy()
  wrong[-1] = 0  # the last (padded-batch) example counts: 10 / 11
  assert classification.accuracy(logits, wrong) == pytest.approx(10 / 11)


def test_predict_split_with_sampler(setup):
  """The real DiffusionBlocks predictor over 7 examples in batches of 3: one compile, per-batch keys."""
  config, graphdef, params, model, _ = setup
  images_u8 = (np.random.default_rng(5).random((7, 8, 8, 3)) * 255).astype(np.uint8)
  preprocess = lambda x: x.astype(np.float32) / 255.0 - 0.5  # applied to each (padded) host batch
  predict, traces = counting_jit(classification.make_predict_fn(graphdef, config))
  key = jax.random.key(6)
  out = classification.predict_split(predict, params, images_u8, 3, key, preprocess=preprocess)
  assert out.shape == (7, 5) and len(traces) == 1
  for i, start in enumerate(range(0, 7, 3)):
    batch = images_u8[start:start + 3]
    padded = np.concatenate([batch, np.zeros((3 - len(batch),) + batch.shape[1:], np.uint8)])
    expected, _ = reference_sample(model, jnp.asarray(preprocess(padded)), jax.random.fold_in(key, i), 3)
    np.testing.assert_allclose(out[start:start + 3], expected[:len(batch)], rtol=1e-4, atol=1e-4)
