"""Image generation (tasks/generation.py, models/dit.py, core/sampler.sample_loop): EDM on images, the DiT's
size, the sampler's routing and guidance, the offline quality figures."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffblocks_jax.core import partitions
from diffblocks_jax.models import edm
from diffblocks_jax import config as config_lib
from diffblocks_jax import models
from diffblocks_jax.core import sampler
from diffblocks_jax.tasks import generation, images
from diffblocks_jax.training import reporting
from helpers import LONG_TESTS, judged_by, shipped_config, tiny_config

SHAPE = (8, 8, 1)  # Digits-sized images.


def build(config, seed=0):
  return models.build(config.model, image_size=SHAPE[0], channels=SHAPE[2], num_classes=4, seed=seed)


def jitter(model, scale=0.3, seed=1):
  """Every parameter + N(0, scale²): the zero-initialised gates and output layer no longer hide the network."""
  graphdef, params = models.split(model)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return nnx.merge(graphdef, tree.unflatten([x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))


# ------------------------------------------------------------------------------------------ EDM on images

def test_edm_coefficients_and_weight_on_images():
  sigma = np.array([0.002, 0.5, 3.0, 80.0])
  c_skip, c_out, c_in, c_noise = (np.asarray(c) for c in edm.preconditioning(sigma, 0.5))
  np.testing.assert_allclose(c_skip, 0.25 / (sigma**2 + 0.25), rtol=1e-6)
  np.testing.assert_allclose(c_out, sigma * 0.5 / np.sqrt(sigma**2 + 0.25), rtol=1e-6)
  np.testing.assert_allclose(c_in, 1 / np.sqrt(sigma**2 + 0.25), rtol=1e-6)
  np.testing.assert_allclose(c_noise, np.log(sigma) / 4, rtol=1e-6)
  # The loss: w(σ)·mean over pixels of (D − x₀)², averaged over the batch.
  rng = np.random.default_rng(0)
  x0, denoised = rng.normal(size=(4,) + SHAPE), rng.normal(size=(4,) + SHAPE)
  task = generation.Generation(num_classes=4, image_shape=SHAPE)
  loss, aux = task.loss(jnp.asarray(denoised), jnp.asarray(x0), jnp.asarray(sigma))
  w = (sigma**2 + 0.25) / (sigma * 0.5)**2
  per_image = ((denoised - x0)**2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(float(loss), np.mean(w * per_image), rtol=1e-5)
  np.testing.assert_allclose(float(aux['mse']), per_image.mean(), rtol=1e-5)


@pytest.mark.parametrize('kind', ['dit', 'dit_dblock'])
def test_denoiser_at_init_is_the_skip_connection(kind):
  """The final layer starts at zero, so F = 0 and D(x; σ) = c_skip(σ)·x exactly: the EDM wiring is right."""
  model = build(tiny_config(kind))
  x = jax.random.normal(jax.random.key(0), (3,) + SHAPE)
  sigmas = jnp.array([0.01, 1.0, 50.0])
  c_skip = np.asarray(edm.preconditioning(sigmas)[0])
  for block in range(model.num_blocks):
    out = model.denoise(jnp.array([0, 1, 4]), x, sigmas, block)
    np.testing.assert_allclose(np.asarray(out), c_skip[:, None, None, None] * np.asarray(x), rtol=1e-6)


def test_dit_s2_parameter_count_at_the_papers_size():
  """DiT-S/2 on CIFAR-10 (12 layers, hidden 384, 6 heads, patch 2, MLP ×4, 10 classes + null), counted part
  by part from DiT's design; DiffusionBlocks with shared outer parts has exactly as many."""
  h, p, c, classes, layers = 384, 2, 3, 10, 12
  per_layer = (3 * (h * h + h) + (h * h + h)  # q, k, v, out
               + (h * 4 * h + 4 * h) + (4 * h * h + h)  # MLP
               + (h * 6 * h + 6 * h))  # adaLN-Zero modulation
  outer = ((p * p * c * h + h)  # patch embedding
           + (256 * h + h) + (h * h + h)  # noise-level embedder
           + (classes + 1) * h  # class table with the null class
           + (h * 2 * h + 2 * h) + (h * p * p * c + p * p * c))  # final adaLN and linear
  expected = layers * per_layer + outer
  config = shipped_config('cifar10_dit.py')
  for kind in ('dit', 'dit_dblock'):
    config.model.kind = kind
    model = nnx.eval_shape(lambda: models.build(config.model, image_size=32, channels=3, num_classes=10))
    count = sum(x.size for x in jax.tree.leaves(models.split(model)[1]))
    assert count == expected == 32_475_660, (kind, count)  # ≈ 32.5M (DiT-S/2 on ImageNet latents: 33M).


# ------------------------------------------------------------------------------------------ the sampler

class BlockEcho:
  """A stand-in model whose output is the index of the block that ran, and the level it ran at."""

  def __init__(self, num_blocks):
    self.num_blocks, self.stacked = num_blocks, True

  def denoise(self, labels, x, sigmas, block, key=None):
    del labels, key
    return jnp.stack([jnp.full(x.shape[:1], block, jnp.float32), sigmas], axis=-1)[:, None, None, :]


class EchoTask(generation.Generation):

  def target_shape(self, model, labels):
    return (labels.shape[0], 1, 1, 2)

  def estimate(self, model, out, block):
    return jnp.zeros_like(out)


@pytest.mark.parametrize('grid', ['quantile', 'karras'])
def test_each_of_50_steps_runs_only_the_block_that_owns_its_sigma(grid):
  plan = partitions.LogNormalPartition(3)
  task = EchoTask(num_classes=4, image_shape=(1, 1, 2))
  _, trajectory = sampler.sample_loop(task, BlockEcho(3), jnp.zeros((2,), jnp.int32), jax.random.key(0),
                                      partition=plan, num_steps=50, grid=grid, return_trajectory=True)
  ran, levels = np.asarray(trajectory[:, 0, 0, 0, 0]), np.asarray(trajectory[:, 0, 0, 0, 1])
  np.testing.assert_allclose(levels, plan.inference_levels(50, grid), rtol=1e-6)
  bounds = partitions.block_sigmas(3)  # Block b owns [bounds[B−1−b], bounds[B−b]]: high σ → block 0.
  for b in range(3):
    own = levels[ran == b]
    assert len(own) > 0
    assert np.all((own >= bounds[2 - b] * (1 - 1e-6)) & (own <= bounds[3 - b] * (1 + 1e-6))), (b, own)
  assert np.all(np.diff(ran) >= 0)  # Block 0 first, then 1, then 2: each block's steps are contiguous.


def test_heun_is_more_accurate_than_euler_on_an_exact_denoiser():
  """Gaussian data N(0, s²) has the exact denoiser D(x; σ) = x·s²/(s² + σ²) and the probability-flow ODE the
  solution x(σ) = x(σ_max)·√(s² + σ²)/√(s² + σ_max²): on EDM's Karras grid Heun lands far closer than Euler.
  (On the release's quantile grid the first step, σ 80 → 2.1, is so long that Heun's trapezoid is worse.)"""
  s = 0.5

  class Exact(BlockEcho):
    def denoise(self, labels, x, sigmas, block, key=None):
      return x * s**2 / (s**2 + sigmas[:, None, None, None]**2)

  class Identity(generation.Generation):
    def estimate(self, model, out, block):
      return out

  plan = partitions.LogNormalPartition(3)
  task = Identity(num_classes=2, image_shape=(4, 4, 1))
  labels = jnp.zeros((64,), jnp.int32)
  levels = plan.inference_levels(20, 'karras')
  start = plan.prior(jax.random.key(3), (64, 4, 4, 1), float(levels[0]))
  exact = np.asarray(start) * np.sqrt(s**2 + levels[-1]**2) / np.sqrt(s**2 + levels[0]**2)
  exact_d = exact * s**2 / (s**2 + levels[-1]**2)  # The sampler returns D at the last level.
  errors = {}
  for solver in ('euler', 'heun'):
    out = sampler.sample_loop(task, Exact(3), labels, jax.random.key(3), partition=plan, num_steps=20,
                              solver=solver, grid='karras')
    errors[solver] = float(np.max(np.abs(np.asarray(out) - exact_d)))
  assert errors['heun'] < errors['euler'] / 2, errors  # Measured: 0.079 against 0.25.


def test_karras_grid_endpoints_and_shape():
  levels = partitions.karras_sigmas(7)
  np.testing.assert_allclose([levels[0], levels[-1]], [80.0, 0.002], rtol=1e-9)
  assert np.all(np.diff(levels) < 0)
  # Equal steps in σ^(1/7).
  np.testing.assert_allclose(np.diff(levels**(1 / 7)), np.full(6, (0.002**(1 / 7) - 80**(1 / 7)) / 6), rtol=1e-9)


@pytest.mark.slow
def test_guidance_is_uncond_plus_scale_times_difference():
  model = jitter(build(tiny_config('dit_dblock')))
  task = generation.Generation(num_classes=4, image_shape=SHAPE)
  labels = jnp.array([0, 1, 2, 3])
  x = jax.random.normal(jax.random.key(2), (4,) + SHAPE)
  cond = model.denoise(labels, x, jnp.full((4,), 2.0), 1)
  uncond = model.denoise(jnp.full((4,), 4), x, jnp.full((4,), 2.0), 1)
  assert float(jnp.max(jnp.abs(cond - uncond))) > 1e-3  # The class matters to this network.
  one = sampler.guided(task, model, labels, x, 2.0, 1, 1.0)
  np.testing.assert_allclose(np.asarray(one), np.asarray(cond), rtol=1e-5, atol=1e-6)
  two = sampler.guided(task, model, labels, x, 2.0, 1, 2.0)
  np.testing.assert_allclose(np.asarray(two), np.asarray(uncond + 2.0 * (cond - uncond)), rtol=1e-4, atol=1e-5)


def test_null_class_dropout_rate():
  task = generation.Generation(num_classes=10, image_shape=SHAPE)
  labels = jnp.arange(200_000) % 10
  dropped = np.asarray(task.drop_condition(jax.random.key(0), labels, 0.1))
  null = dropped == 10
  assert abs(null.mean() - 0.1) < 0.004  # 200k Bernoulli(0.1): std 0.00067.
  np.testing.assert_array_equal(dropped[~null], np.asarray(labels)[~null])  # The rest untouched.
  np.testing.assert_array_equal(np.asarray(task.drop_condition(jax.random.key(0), labels, 0.0)), labels)


@pytest.mark.parametrize('stack', [True, False])
def test_sampling_a_dblock_model_matches_step_by_step_calls(stack):
  """The scanned sampler (traced block index; a switch for a list of blocks) equals Euler written out by hand."""
  config = tiny_config('dit_dblock')
  model = jitter(models.DiffusionBlocksDiT(config.model, [1, 1, 1], image_size=8, channels=1, num_classes=4,
                                           rngs=nnx.Rngs(0), stack=stack))
  plan = partitions.LogNormalPartition(3)
  task = generation.Generation(num_classes=4, image_shape=SHAPE)
  labels, key = jnp.array([0, 3]), jax.random.key(5)
  out = sampler.sample_loop(task, model, labels, key, partition=plan, num_steps=6, cfg_scale=1.5)
  levels = plan.inference_levels(6)
  x = plan.prior(key, (2,) + SHAPE, float(levels[0]))
  for i, level in enumerate(levels):
    d = sampler.guided(task, model, labels, x, float(level), plan.route_static(level), 1.5)
    if i + 1 < len(levels):
      x = x + (levels[i + 1] - level) * (x - d) / level
  np.testing.assert_allclose(np.asarray(out), np.asarray(d), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ offline figures

def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(200_000, 3)) * [1.0, 2.0, 0.5]
  b = rng.normal(size=(200_000, 3)) * [2.0, 2.0, 1.0] + [1.0, 0.0, 0.0]
  # ‖Δμ‖² + Σ (σa² + σb² − 2σaσb) = 1 + (1 + 4 − 4) + 0 + (0.25 + 1 − 1) = 2.25
  assert images.frechet_distance(a, b) == pytest.approx(2.25, abs=0.03)
  assert images.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
  with pytest.raises(ValueError, match='feature sets'):
    images.frechet_distance(a, b[:, :2])


def test_sample_accuracy_and_balanced_labels():
  labels = images.balanced_labels(25, 10)
  assert np.bincount(labels).tolist() == [3] * 5 + [2] * 5
  logits = np.eye(10)[labels]
  logits[:5] = np.eye(10)[(labels[:5] + 1) % 10]  # 5 of 25 assigned elsewhere.
  assert images.sample_accuracy(logits, labels) == pytest.approx(0.8)


def test_png_grid_reads_back(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  unit = rng.uniform(size=(6, 5, 4, 3)).astype(np.float32)
  grid = images.image_grid(unit, rows=2, min_size=1)  # As drawn: no upscaling.
  assert grid.shape == (2 * 6 - 1, 3 * 5 - 1, 3) and grid.dtype == np.uint8
  np.testing.assert_array_equal(grid[6:11, 5:9], np.round(unit[4] * 255).astype(np.uint8))  # Row 1, col 1.
  # By default each image is shown at least 32 px a side: 4 px wide → 8x, nearest neighbour.
  shown = images.image_grid(unit, rows=2)
  assert shown.shape == (2 * 41 - 1, 3 * 33 - 1, 3)
  big = np.repeat(np.repeat(np.round(unit[4] * 255).astype(np.uint8), 8, axis=0), 8, axis=1)
  np.testing.assert_array_equal(shown[41:81, 33:65], big)
  for image in (grid, grid[..., :1]):
    path = str(tmp_path / 'g.png')
    images.write_png(path, image)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image if image.shape[-1] == 3 else image[..., 0])


# ------------------------------------------------------------------------------------------ end to end

def cifar10_config(name, workdir_of_classifier=''):
  """A CIFAR-10 config shrunk to seconds: 16 mock images, a 3-layer DiT, 4 sampling steps."""
  config = shipped_config(name)
  config.train.batch_size, config.train.num_epochs = 8, 1
  config.train.steps_per_call = config.train.log_every_steps = config.train.checkpoint_every_steps = 2
  config.train.eval_every_epochs = 0.0
  config.eval.batch_size = 8
  if 'dit' in name:
    config.model.hidden_size, config.model.num_heads, config.model.num_layers = 24, 2, 3
    config.eval.num_inference_steps, config.eval.num_samples = 4, 12
    config.eval.classifier_workdir = workdir_of_classifier
  else:
    config.model.hidden_size, config.model.num_heads, config.model.num_layers, config.model.mlp_dim = 24, 2, 1, 32
  return config


@pytest.mark.slow
def test_cifar10_generation_configs_train_resume_evaluate_sample_under_mock_data(tmp_path):
  """The block-wise CIFAR-10 config trains and scores against a classifier trained first, resumes, evaluates and
  samples (the end-to-end DiT shares that code; with DIFFBLOCKS_LONG_TESTS=1 it trains and scores too)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.training import evaluation, train  # pylint: disable=g-import-not-at-top
  classifier = str(tmp_path / 'vit')
  with tfds.testing.mock_data(num_examples=16):
    train.train_and_evaluate(cifar10_config('cifar10_vit.py'), classifier)
    runs = (('cifar10_dit.py', 1),) if LONG_TESTS else ()
    for name, blocks in runs + (('cifar10_dit_dblock.py', 3),):
      workdir = str(tmp_path / name)
      result = train.train_and_evaluate(cifar10_config(name, classifier), workdir)
      assert result['step'] == 2 * blocks  # 16 // 8 steps, one epoch (x B for DiffusionBlocks).
      assert os.path.exists(os.path.join(workdir, 'samples', f'step_{2 * blocks}.png'))
      # Mock data gives both splits the same images, so the floor is ~0 here; the samples are far from them.
      assert result['eval/fd'] > 0.01 and result['eval/fd_floor'] < 1e-6 and 'eval/sample_accuracy' in result
    config = cifar10_config('cifar10_dit_dblock.py', classifier)
    config.train.num_epochs = 2
    assert train.train_and_evaluate(config, workdir)['step'] == 12  # Resumed at 6, not restarted.
    evaluated, _ = evaluation.evaluate(config, workdir)
    assert evaluated['step'] == 12 and evaluated['eval/fd'] > 0.01
    line = evaluation.sample(config, workdir, num_samples=12)
  stem = os.path.join(workdir, 'samples', 'sample_12')
  assert stem + '.npz' in line and stem + '.png' in line, line
  saved = np.load(stem + '.npz')
  assert saved['images'].shape == (12, 32, 32, 3) and saved['images'].dtype == np.uint8
  assert np.bincount(saved['labels']).tolist() == [2] * 2 + [1] * 8  # Class-balanced.
  assert os.path.getsize(stem + '.png') > 0
  logged = [r['step'] for r in reporting.read_metrics(workdir) if 'train/loss' in r]
  assert logged == sorted(set(logged)) and logged[-1] == 12  # No step trained twice.


def test_classifier_workdir_errors_name_the_field(tmp_path):
  config = cifar10_config('cifar10_dit.py', str(tmp_path / 'missing'))
  with pytest.raises(config_lib.ConfigError, match=r'config.eval.classifier_workdir=.*missing.*config.json'):
    generation.load_classifier(judged_by(config))
  for kind, name, match in (('dit', 'cifar10', "holds a 'dit' run; the features come from an end-to-end "
                                                "classifier \\(model.kind 'vit' or 'cnn'\\)"), ('vit', 'cifar100', 'other data')):
    other = shipped_config('cifar10_vit.py')
    other.model.kind, other.data.name = kind, name
    os.makedirs(tmp_path / kind, exist_ok=True)
    (tmp_path / kind / 'config.json').write_text(other.to_json())
    config.eval.classifier_workdir = str(tmp_path / kind)
    with pytest.raises(config_lib.ConfigError, match=match):
      generation.load_classifier(judged_by(config))


