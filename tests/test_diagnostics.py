"""Per-block accuracy against σ, and the σ density each block is trained on."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from diffblocks_jax.core import partitions
from diffblocks_jax.tasks import classification
from diffblocks_jax.tools import diagnostics
from helpers import tiny_config

NUM_BLOCKS = 3


@pytest.mark.parametrize('p_mean', [-1.2, 0.5])
def test_training_density_matches_the_training_sampler(p_mean):
  edm = partitions.EDM(p_mean=p_mean)
  grid = np.exp(np.linspace(np.log(edm.sigma_min), np.log(edm.sigma_max), 20001))
  density = diagnostics.training_sigma_density(grid, NUM_BLOCKS, edm)
  np.testing.assert_allclose(np.trapezoid(density, np.log(grid), axis=1), 1 / NUM_BLOCKS, rtol=2e-3)
  # Against draws of the training step's own sampler: the share of each block's σ above a few thresholds.
  for block in range(NUM_BLOCKS):
    sigmas, drawn_block = partitions.sample_training_sigmas(jax.random.key(block), 200_000, NUM_BLOCKS, 0.05,
                                                           edm, bucket_index=NUM_BLOCKS - 1 - block)
    assert int(drawn_block) == block
    sigmas = np.asarray(sigmas, np.float64)
    for threshold in (0.1, 0.5, 1.0, 10.0):
      above = grid >= threshold
      expected = NUM_BLOCKS * np.trapezoid(density[block, above], np.log(grid[above]))
      assert abs(np.mean(sigmas >= threshold) - expected) < 4e-3, (block, threshold)


def test_default_block0_is_rarely_trained_where_the_sampler_uses_it():
  """The finding that moved digits_dblock's P_mean: with the EDM defaults, block 0 sees σ > 10 in 0.4 % of its
  draws, yet the sampler calls it at σ = 80 only."""
  grid = np.exp(np.linspace(np.log(0.002), np.log(80.0), 20001))
  density = diagnostics.training_sigma_density(grid, NUM_BLOCKS)
  above = grid >= 10.0
  share = NUM_BLOCKS * np.trapezoid(density[0, above], np.log(grid[above]))
  assert 0.002 < share < 0.006


@pytest.fixture(scope='module')
def setup(tiny_config, tiny_model, jitter_params, tiny_batch):
  config = tiny_config('dblock')
  model, graphdef, params = tiny_model(config)
  params = jitter_params(params, seed=3, scale=0.05)
  # A read-out that is exact when the label is clean: output modulation off, classifier = unit label rows,
  # so at σ = 0.002 (c_skip ≈ 1, c_out ≈ 0.002) the logits are the cosines of z_t with each class.
  params = jax.tree_util.tree_map(lambda x: x, params)
  shared = params['shared']
  table = np.asarray(shared['label_embed'])
  shared['head']['kernel'] = (table / np.linalg.norm(table, axis=-1, keepdims=True)).T
  shared['head']['bias'] = np.zeros_like(shared['head']['bias'])
  shared['modulation'] = jax.tree_util.tree_map(np.zeros_like, shared['modulation'])
  return config, graphdef, params


def test_block_accuracy_is_exact_for_a_clean_label_and_counts_every_image(setup):
  config, graphdef, params = setup
  images = (np.random.default_rng(0).uniform(size=(13, 8, 8, 3)) * 255).astype(np.uint8)
  labels = np.random.default_rng(1).integers(0, 5, 13).astype(np.int32)
  # batch 5 over 13 images: two full batches and a padded one, whose padding must not be counted.
  acc = diagnostics.block_accuracy_by_sigma(graphdef, params, config, images, labels, [0.002, 80.0],
                                            jax.random.key(0), batch_size=5)
  assert acc.shape == (NUM_BLOCKS, 2)
  np.testing.assert_array_equal(acc[:, 0], 1.0)
  # At σ = 80 the label is gone and the (random) model reads an image: not all 13 right.
  assert np.all(acc[:, 1] < 1.0)
  assert np.all(acc * 13 == np.round(acc * 13))  # Whole images: nothing counted twice or half.


def test_block_accuracy_rejects_a_baseline_and_mismatched_labels(setup, tiny_config):
  config, graphdef, params = setup
  images = np.zeros((4, 8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match='model.kind'):
    diagnostics.block_accuracy_by_sigma(graphdef, params, tiny_config('vit'), images, np.zeros(4, np.int32),
                                        [1.0], jax.random.key(0))
  with pytest.raises(ValueError, match='labels'):
    diagnostics.block_accuracy_by_sigma(graphdef, params, config, images, np.zeros(3, np.int32), [1.0],
                                        jax.random.key(0))


SPEC_RANGES = [(0.392048, 80.0), (0.170584, 0.531832), (0.002, 0.224933)]


@pytest.mark.parametrize('p_mean', [-1.2, 0.5])
def test_noise_plan_agrees_with_the_training_sampler_and_the_sampler_schedule(p_mean):
  edm = partitions.EDM(p_mean=p_mean)
  lines = partitions.noise_plan(NUM_BLOCKS, NUM_BLOCKS, edm)
  assert len(lines) == NUM_BLOCKS
  steps = partitions.inference_sigmas(NUM_BLOCKS, edm)
  for block, line in enumerate(lines):
    match = re.fullmatch(r'block (\d): trained on σ in \[(\S+), (\S+)\], median (\S+), (\S+) % above σ = 10; '
                         r'sampler calls it at σ = (\S+)', line)
    assert match and int(match.group(1)) == block, line
    sigmas, _ = partitions.sample_training_sigmas(jax.random.key(7), 200_000, NUM_BLOCKS, 0.05, edm,
                                                 bucket_index=NUM_BLOCKS - 1 - block)
    sigmas = np.asarray(sigmas, np.float64)
    lo, hi = float(match.group(2)), float(match.group(3))
    assert lo * (1 - 5e-3) <= sigmas.min() and sigmas.max() <= hi * (1 + 5e-3), (line, sigmas.min(), sigmas.max())
    if p_mean == -1.2:  # SPEC §5.2's widened ranges, block 0 = the highest bucket.
      np.testing.assert_allclose([lo, hi], SPEC_RANGES[block], rtol=5e-3)
    np.testing.assert_allclose(float(match.group(4)), np.median(sigmas), rtol=1e-2)
    assert abs(float(match.group(5)) - 100 * np.mean(sigmas > 10)) < 0.3
    # N = B: each block is called once, at the sampler's σ of its own rank.
    np.testing.assert_allclose(float(match.group(6)), steps[block], rtol=5e-3)


def test_noise_plan_names_a_block_the_sampler_skips():
  lines = partitions.noise_plan(3, 2)  # Two steps, σ = 80 and 0.002: block 1 is never called.
  assert lines[1].endswith('sampler calls it at σ = (never)'), lines


def test_noise_plan_for_a_config_uses_its_noise_settings_and_sampler_steps():
  config = tiny_config('dblock', diffusion__p_mean=0.5, eval__num_inference_steps=2)
  lines = classification.noise_plan_lines(config)
  assert lines == partitions.noise_plan(3, 2, partitions.EDM(p_mean=0.5))
  assert 'median 4.66' in lines[0] and lines[1].endswith('(never)')
