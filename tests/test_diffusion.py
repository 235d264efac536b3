"""Noise levels, routing, EDM preconditioning and σ sampling against SPEC §4, §5 and §7."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffblocks_jax.core import partitions
from diffblocks_jax.models import edm

SIGMA_MIN, SIGMA_MAX, P_MEAN, P_STD, SIGMA_DATA = 0.002, 80.0, -1.2, 1.2, 0.5


def sig6(values):
  """Values rounded to 6 significant digits, as SPEC writes them."""
  return [float(f'{float(v):.6g}') for v in np.asarray(values).ravel()]


def reference_equiprobable(num_points):
  """B+1 (or N) points equally spaced in Φ((ln σ − P_mean)/P_std), in float64 via scipy.stats."""
  law = stats.norm(P_MEAN, P_STD)
  u = np.linspace(law.cdf(math.log(SIGMA_MIN)), law.cdf(math.log(SIGMA_MAX)), num_points)
  return np.exp(law.ppf(u))


# --- boundaries, widened ranges, inference sigmas (SPEC §4, §5.2, §7) ---

@pytest.mark.parametrize('num_blocks, expected', [
    (2, [0.002, 0.3012, 80]),
    (3, [0.002, 0.179632, 0.505041, 80]),
    (4, [0.002, 0.134076, 0.3012, 0.676649, 80]),
])
def test_block_boundaries(num_blocks, expected):
  sigmas = partitions.block_sigmas(num_blocks)
  assert sigmas.shape == (num_blocks + 1,)
  assert sig6(sigmas) == expected
  assert np.all(np.diff(sigmas) > 0)
  np.testing.assert_allclose(sigmas, reference_equiprobable(num_blocks + 1), rtol=1e-9)


def test_block_boundaries_rejects_zero_blocks():
  with pytest.raises(ValueError):
    partitions.block_sigmas(0)


def test_widened_ranges_b3():
  ranges = partitions.widened_ranges(3, overlap=0.05)
  assert ranges.shape == (3, 2)
  assert sig6(ranges) == [0.002, 0.224933, 0.170584, 0.531832, 0.392048, 80]


@pytest.mark.parametrize('num_blocks', [2, 3, 4])
@pytest.mark.parametrize('overlap', [0.0, 0.05, 0.2])
def test_widened_ranges_formula(num_blocks, overlap):
  b = np.log(reference_equiprobable(num_blocks + 1))
  width = b[1:] - b[:-1]
  lo = np.maximum(np.exp(b[:-1] - overlap * width), SIGMA_MIN)
  hi = np.minimum(np.exp(b[1:] + overlap * width), SIGMA_MAX)
  np.testing.assert_allclose(partitions.widened_ranges(num_blocks, overlap), np.stack([lo, hi], 1), rtol=1e-9)


@pytest.mark.parametrize('num_steps, expected', [
    (3, [80, 0.3012, 0.002]),
    (5, [80, 0.676649, 0.3012, 0.134076, 0.002]),
])
def test_inference_sigmas(num_steps, expected):
  sigmas = partitions.inference_sigmas(num_steps)
  assert sigmas.shape == (num_steps,)
  assert sig6(sigmas) == expected
  assert np.all(np.diff(sigmas) < 0)  # descending: first block first
  np.testing.assert_allclose(sigmas, reference_equiprobable(num_steps)[::-1], rtol=1e-9)


# --- routing (SPEC §5.4) ---

def test_route_high_noise_to_first_block():
  sigmas = jnp.array([80.0, 0.3012, 0.002])
  np.testing.assert_array_equal(partitions.route(sigmas, 3), [0, 1, 2])
  np.testing.assert_array_equal(partitions.bucket(sigmas, 3), [2, 1, 0])
  assert [partitions.route_static(s, 3) for s in (80.0, 0.3012, 0.002)] == [0, 1, 2]


def test_route_of_inference_schedules():
  # N=3 visits every block once; N=5: 80 and 0.6766 → block 0, 0.3012 → 1, 0.1341 and 0.002 → 2.
  assert [partitions.route_static(s, 3) for s in partitions.inference_sigmas(3)] == [0, 1, 2]
  assert [partitions.route_static(s, 3) for s in partitions.inference_sigmas(5)] == [0, 0, 1, 2, 2]
  np.testing.assert_array_equal(partitions.route(jnp.asarray(partitions.inference_sigmas(5)), 3),
                                [0, 0, 1, 2, 2])


@pytest.mark.parametrize('num_blocks', [1, 2, 3, 4])
def test_route_matches_definition_on_a_grid(num_blocks):
  grid = np.geomspace(1e-4, 1e3, 701).astype(np.float32)
  bounds = reference_equiprobable(num_blocks + 1).astype(np.float32)
  bounds[0], bounds[-1] = SIGMA_MIN, SIGMA_MAX
  expected = num_blocks - 1 - np.clip(np.sum(grid[:, None] >= bounds[None], axis=1) - 1, 0, num_blocks - 1)
  np.testing.assert_array_equal(partitions.route(jnp.asarray(grid), num_blocks), expected)
  assert [partitions.route_static(s, num_blocks) for s in grid] == expected.tolist()


# --- preconditioning and weight (SPEC §4) ---

SIGMAS = np.array([0.002, 0.01, 0.1795, 0.5, 1.0, 3.0, 80.0])


def test_preconditioning_coefficients():
  s, d = SIGMAS.astype(np.float64), SIGMA_DATA
  c_skip, c_out, c_in, c_noise = edm.preconditioning(jnp.asarray(SIGMAS, jnp.float32))
  np.testing.assert_allclose(c_skip, d**2 / (s**2 + d**2), rtol=1e-6)
  np.testing.assert_allclose(c_out, s * d / np.sqrt(s**2 + d**2), rtol=1e-6)
  np.testing.assert_allclose(c_in, 1 / np.sqrt(s**2 + d**2), rtol=1e-6)
  np.testing.assert_allclose(c_noise, 0.25 * np.log(s), rtol=1e-6)
  # Identity of EDM: c_skip + c_out²/σ_d² = 1.
  np.testing.assert_allclose(np.asarray(c_skip) + np.asarray(c_out)**2 / d**2, 1.0, rtol=1e-6)


def test_preconditioning_keeps_shape():
  sigma = jnp.full((2, 3), 0.7)
  assert all(c.shape == (2, 3) for c in edm.preconditioning(sigma))


def test_loss_weight():
  s, d = SIGMAS.astype(np.float64), SIGMA_DATA
  np.testing.assert_allclose(partitions.loss_weight(jnp.asarray(SIGMAS, jnp.float32)),
                             (s**2 + d**2) / (s * d)**2, rtol=1e-6)
  # w = 1 / c_out²: the weight that makes the effective target unit-variance.
  _, c_out, _, _ = edm.preconditioning(jnp.asarray(SIGMAS, jnp.float32))
  np.testing.assert_allclose(partitions.loss_weight(jnp.asarray(SIGMAS)), 1 / np.asarray(c_out)**2, rtol=1e-5)


# --- training σ sampling (SPEC §5.1-5.4) ---

NUM_DRAWS, BATCH = 3000, 64


@pytest.fixture(scope='module')
def draws():
  """{B: (sigmas (NUM_DRAWS, BATCH), blocks (NUM_DRAWS,))} from independent keys."""
  out = {}
  for num_blocks in (2, 3, 4):
    keys = jax.random.split(jax.random.key(1234 + num_blocks), NUM_DRAWS)
    fn = jax.jit(jax.vmap(lambda k: partitions.sample_training_sigmas(k, BATCH, num_blocks, 0.05)))
    sigmas, blocks = fn(keys)
    out[num_blocks] = (np.asarray(sigmas, np.float64), np.asarray(blocks))
  return out


@pytest.mark.parametrize('num_blocks', [2, 3, 4])
def test_training_sigmas_in_range(draws, num_blocks):
  sigmas, blocks = draws[num_blocks]
  assert sigmas.shape == (NUM_DRAWS, BATCH) and blocks.shape == (NUM_DRAWS,)
  assert np.all(np.isfinite(sigmas))
  ranges = partitions.widened_ranges(num_blocks, 0.05)
  # Union of the widened ranges.
  assert sigmas.min() >= ranges[:, 0].min() * (1 - 1e-5)
  assert sigmas.max() <= ranges[:, 1].max() * (1 + 1e-5)
  assert set(np.unique(blocks)) == set(range(num_blocks))


@pytest.mark.parametrize('num_blocks', [2, 3, 4])
def test_training_block_is_uniform(draws, num_blocks):
  _, blocks = draws[num_blocks]
  p = 1 / num_blocks
  counts = np.bincount(blocks, minlength=num_blocks)
  bound = 5 * math.sqrt(NUM_DRAWS * p * (1 - p))  # 5 binomial standard deviations
  np.testing.assert_array_less(np.abs(counts - NUM_DRAWS * p), bound)


@pytest.mark.parametrize('num_blocks', [2, 3, 4])
def test_training_batch_inside_chosen_bucket(draws, num_blocks):
  """Every σ of a batch lies in the widened range of the bucket whose block was returned."""
  sigmas, blocks = draws[num_blocks]
  ranges = partitions.widened_ranges(num_blocks, 0.05)
  k = num_blocks - 1 - blocks  # the block is B−1−bucket
  lo, hi = ranges[k, 0][:, None], ranges[k, 1][:, None]
  assert np.all(sigmas >= lo * (1 - 1e-5)), 'a σ below its bucket'
  assert np.all(sigmas <= hi * (1 + 1e-5)), 'a σ above its bucket'
  # The block is B−1−mode(bucket(σ)) of the batch.
  bounds = partitions.block_sigmas(num_blocks)
  buckets = np.clip(np.sum(sigmas.astype(np.float32)[..., None] >= bounds.astype(np.float32), -1) - 1,
                    0, num_blocks - 1)
  modes = np.array([np.argmax(np.bincount(row, minlength=num_blocks)) for row in buckets])
  np.testing.assert_array_equal(blocks, num_blocks - 1 - modes)


@pytest.mark.parametrize('bucket_index', [0, 1, 2])
def test_training_sigmas_truncated_lognormal(draws, bucket_index):
  """ln σ within a bucket follows N(P_mean, P_std²) truncated to the widened range (KS bound)."""
  sigmas, blocks = draws[3]
  x = np.sort(np.log(sigmas[blocks == 2 - bucket_index].ravel()))
  n = len(x)
  assert n > 500 * BATCH
  lo, hi = np.log(partitions.widened_ranges(3, 0.05)[bucket_index])
  law = stats.norm(P_MEAN, P_STD)
  cdf = (law.cdf(x) - law.cdf(lo)) / (law.cdf(hi) - law.cdf(lo))
  ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
  # P(D > 1.95/√n) ≈ 2·exp(−2·1.95²) ≈ 0.1 %; the keys are fixed, so this is deterministic.
  assert ks < 1.95 / math.sqrt(n), f'KS distance {ks:.5f} vs bound {1.95 / math.sqrt(n):.5f}'
  # Not the untruncated law: the same statistic against N(P_mean, P_std²) itself is far larger.
  ks_untruncated = np.max(np.abs(law.cdf(x) - np.arange(1, n + 1) / n))
  assert ks_untruncated > 10 / math.sqrt(n)


def test_training_sigmas_deterministic_per_key():
  fn = jax.jit(lambda k: partitions.sample_training_sigmas(k, 16, 3))
  a, b = fn(jax.random.key(7)), fn(jax.random.key(7))
  chex.assert_trees_all_equal(a, b)
  c = fn(jax.random.key(8))
  assert not np.array_equal(a[0], c[0])


# --- time embedding (SPEC §3.2) ---

def test_timestep_embedding_layout():
  t = np.array([0.0, 0.25 * math.log(0.002), 0.25 * math.log(0.3), 0.25 * math.log(80.0), 0.7])
  emb = np.asarray(edm.timestep_embedding(jnp.asarray(t, jnp.float32), 256))
  assert emb.shape == (5, 256)
  freqs = np.exp(-math.log(10000.0) * np.arange(128) / 128)
  args = t[:, None] * freqs[None]
  np.testing.assert_allclose(emb[:, :128], np.cos(args), atol=2e-6)  # cos first
  np.testing.assert_allclose(emb[:, 128:], np.sin(args), atol=2e-6)  # then sin
  # At t = 0: all cosines 1, all sines 0.
  np.testing.assert_array_equal(emb[0, :128], 1.0)
  np.testing.assert_array_equal(emb[0, 128:], 0.0)
  # Highest frequency first (freq_0 = 1): sin part's first entry is sin(t).
  np.testing.assert_allclose(emb[:, 128], np.sin(t), atol=1e-6)


def test_timestep_embedding_batch_shape():
  emb = edm.timestep_embedding(jnp.zeros((2, 3)), 256)
  assert emb.shape == (2, 3, 256)


# ------------------------------------------------------------------ partitions as the core uses them

def test_lognormal_partition_is_the_spec_schedule():
  plan = partitions.LogNormalPartition(3)
  np.testing.assert_allclose(plan.boundaries(), [0.002, 0.179632, 0.505041, 80.0], rtol=1e-5)
  np.testing.assert_allclose(plan.inference_levels(3), [80.0, 0.3012, 0.002], rtol=1e-3)
  assert [plan.route_static(s) for s in plan.inference_levels(3)] == [0, 1, 2]
  key = jax.random.key(0)
  sigmas, block = plan.sample(key, 16)
  want_sigmas, want_block = partitions.sample_training_sigmas(key, 16, 3, 0.05)
  np.testing.assert_array_equal(sigmas, want_sigmas)
  assert int(block) == int(want_block)
  x0 = jnp.ones((16, 4))
  noisy = plan.corrupt(jax.random.key(1), x0, sigmas)
  np.testing.assert_allclose(noisy, x0 + sigmas[:, None] * jax.random.normal(jax.random.key(1), (16, 4)),
                             rtol=1e-6)


def test_lognormal_partition_fixed_block_samples_its_own_range():
  plan = partitions.LogNormalPartition(3)
  ranges = partitions.widened_ranges(3)
  for block in range(3):
    sigmas, _ = plan.sample(jax.random.key(block), 256, block=block)
    lo, hi = ranges[2 - block]
    assert np.all(np.asarray(sigmas) >= lo * (1 - 1e-5)) and np.all(np.asarray(sigmas) <= hi * (1 + 1e-5))


def test_masking_partition_boundaries_overlap_and_routing():
  """App. D: t_b = b/B; γ widens each slice by γ of its width per side; high t (mostly masked) → block 0."""
  plan = partitions.MaskingPartition(num_blocks=4, overlap=0.1, mask_id=99)
  np.testing.assert_allclose(plan.boundaries(), [0.0, 0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(plan.widened_ranges(), [[0.0, 0.275], [0.225, 0.525], [0.475, 0.775],
                                                     [0.725, 1.0]])
  assert [plan.route_static(t) for t in (1.0, 0.8, 0.6, 0.3, 0.1, 0.0)] == [0, 0, 1, 2, 3, 3]
  np.testing.assert_array_equal(plan.route(jnp.array([1.0, 0.8, 0.6, 0.3, 0.1, 0.0])), [0, 0, 1, 2, 3, 3])
  for block in range(4):
    t, got = plan.sample(jax.random.key(block), 512, block=block)
    lo, hi = plan.widened_ranges()[3 - block]
    assert int(got) == block and float(t.min()) >= lo and float(t.max()) <= hi
  # Without a block: one drawn uniformly, and t drawn as for that block given.
  t, drawn = plan.sample(jax.random.key(7), 4)
  chex.assert_trees_all_equal(t, plan.sample(jax.random.key(7), 4, block=int(drawn))[0])
  drawn = jax.vmap(lambda key: plan.sample(key, 4)[1])(jax.random.split(jax.random.key(8), 400))
  assert np.all(np.abs(np.bincount(np.asarray(drawn), minlength=4) - 100) < 40)  # Binomial(400, 1/4): sd 8.7.
  np.testing.assert_allclose(plan.inference_levels(5), [1.0, 0.75, 0.5, 0.25, 0.0])


def test_masking_partition_corrupts_at_rate_t():
  plan = partitions.MaskingPartition(num_blocks=2, mask_id=7)
  tokens = jnp.zeros((4, 4000), jnp.int32)
  t = jnp.array([0.0, 0.25, 0.5, 1.0])
  masked = np.asarray(plan.corrupt(jax.random.key(0), tokens, t)) == 7
  np.testing.assert_allclose(masked.mean(axis=1), [0.0, 0.25, 0.5, 1.0], atol=0.03)
