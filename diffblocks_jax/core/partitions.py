"""The noise partitions of DiffusionBlocks: noise levels, boundaries, overlap, routing (SPEC §4, §5, §7).

Noise schedules that depend only on the config (boundaries, widened ranges, inference sigmas) are computed
once in float64 NumPy, so they are exact constants in the compiled step; anything per-example is jnp.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special


@dataclasses.dataclass(frozen=True)
class EDM:
  """EDM noise distribution and preconditioning constants (SPEC §4)."""
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  p_mean: float = -1.2
  p_std: float = 1.2
  sigma_data: float = 0.5

  @classmethod
  def from_config(cls, diffusion_config) -> EDM:
    """The config's EDM with its noise plan resolved (`resolve_noise_plan`: 'matched' sets P_mean)."""
    edm = cls(**{f.name: float(diffusion_config[f.name]) for f in dataclasses.fields(cls)})
    return resolve_noise_plan(edm, diffusion_config.noise_plan)

  def cdf(self, sigma):
    """Φ((ln σ − P_mean)/P_std): the log-normal's CDF, in which blocks get equal probability mass."""
    return special.ndtr((np.log(sigma) - self.p_mean) / self.p_std)

  def icdf(self, u):
    return np.exp(self.p_mean + self.p_std * special.ndtri(u))


DEFAULT_EDM = EDM()


def _equiprobable(num_points: int, edm: EDM) -> np.ndarray:
  u = np.linspace(edm.cdf(edm.sigma_min), edm.cdf(edm.sigma_max), num_points)
  sigmas = edm.icdf(u)
  # Pin the end points: ndtri(ndtr(x)) loses digits in the far tails.
  sigmas[0], sigmas[-1] = edm.sigma_min, edm.sigma_max
  return sigmas


def block_sigmas(num_blocks: int, edm: EDM = DEFAULT_EDM) -> np.ndarray:
  """B+1 ascending boundaries, equally spaced in Φ (SPEC §4). B=3: [0.002, 0.179632, 0.505041, 80]."""
  if num_blocks < 1:
    raise ValueError(f'num_blocks must be >= 1, got {num_blocks}')
  return _equiprobable(num_blocks + 1, edm)


def widened_ranges(num_blocks: int, overlap: float = 0.05, edm: EDM = DEFAULT_EDM) -> np.ndarray:
  """(B, 2) training ranges: each bucket widened by γ of its log-width per side, clipped (SPEC §5.2)."""
  b = np.log(block_sigmas(num_blocks, edm))
  width = b[1:] - b[:-1]
  lo = np.exp(b[:-1] - overlap * width)
  hi = np.exp(b[1:] + overlap * width)
  return np.clip(np.stack([lo, hi], axis=1), edm.sigma_min, edm.sigma_max)


def inference_sigmas(num_steps: int, edm: EDM = DEFAULT_EDM) -> np.ndarray:
  """N descending sigmas, equally spaced in Φ (SPEC §7). N=3: [80, 0.3012, 0.002]."""
  if num_steps < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}')
  if num_steps == 1:
    return np.array([edm.sigma_max])
  return _equiprobable(num_steps, edm)[::-1].copy()


def karras_sigmas(num_steps: int, edm: EDM = DEFAULT_EDM, rho: float = 7.0) -> np.ndarray:
  """N descending sigmas of EDM's sampler: equal steps in σ^(1/ρ) from σ_max to σ_min."""
  if num_steps < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}')
  if num_steps == 1:
    return np.array([edm.sigma_max])
  ramp = np.linspace(0.0, 1.0, num_steps)
  hi, lo = edm.sigma_max**(1 / rho), edm.sigma_min**(1 / rho)
  return (hi + ramp * (lo - hi))**rho


SIGMA_GRIDS = {'quantile': inference_sigmas, 'karras': karras_sigmas}


def bucket(sigmas, num_blocks: int, edm: EDM = DEFAULT_EDM):
  """Index of the boundary interval holding each σ: (#boundaries ≤ σ) − 1, clipped to [0, B−1]."""
  bounds = jnp.asarray(block_sigmas(num_blocks, edm), jnp.float32)
  count = jnp.sum(jnp.asarray(sigmas, jnp.float32)[..., None] >= bounds, axis=-1)
  return jnp.clip(count - 1, 0, num_blocks - 1)


def route(sigmas, num_blocks: int, edm: EDM = DEFAULT_EDM):
  """Block that denoises each σ: high noise → block 0 (first layers), low noise → block B−1 (SPEC §5.4)."""
  return num_blocks - 1 - bucket(sigmas, num_blocks, edm)


def route_static(sigma: float, num_blocks: int, edm: EDM = DEFAULT_EDM) -> int:
  """`route` for one Python float, for the sampler whose schedule is known when tracing."""
  count = int(np.sum(float(sigma) >= block_sigmas(num_blocks, edm)))
  return num_blocks - 1 - min(max(count - 1, 0), num_blocks - 1)


def sample_training_sigmas(key: jax.Array, batch_size: int, num_blocks: int, overlap: float = 0.05,
                           edm: EDM = DEFAULT_EDM, *, bucket_index: int | None = None):
  """One uniform bucket for the batch, then truncated log-normal σ in its widened range (SPEC §5.1-5.4).

  Returns (sigmas (batch,), block) where block = B−1−mode(bucket(σ)), an int32 scalar (the row of the stacked
  blocks to train, or a `lax.switch` index).
  `bucket_index` fixes the bucket instead of drawing it (block-parallel training, benchmarks).
  """
  bucket_key, u_key = jax.random.split(key)
  ranges = jnp.asarray(edm.cdf(widened_ranges(num_blocks, overlap, edm)), jnp.float32)
  if bucket_index is None:
    k = jax.random.randint(bucket_key, (), 0, num_blocks)
  else:
    k = jnp.asarray(bucket_index, jnp.int32)
  u = jax.random.uniform(u_key, (batch_size,), minval=ranges[k, 0], maxval=ranges[k, 1])
  sigmas = jnp.exp(edm.p_mean + edm.p_std * jax.scipy.special.ndtri(u))
  sigmas = jnp.clip(sigmas, edm.sigma_min, edm.sigma_max)
  counts = jnp.bincount(bucket(sigmas, num_blocks, edm), length=num_blocks)
  # argmax returns the first maximum, i.e. the smallest bucket on ties, as torch.mode does.
  block = (num_blocks - 1 - jnp.argmax(counts)).astype(jnp.int32)
  return sigmas, block


@dataclasses.dataclass(frozen=True)
class LogNormalPartition:
  """The EDM noise plan of B blocks, as the core step and sampler use it (SPEC §4, §5, §7).

  Levels are σ; block 0 owns the highest noise (the first layers), block B−1 the lowest. The target is
  corrupted as x_t = x_0 + σ·ε and the sampler takes Euler steps of the probability-flow ODE.
  """
  num_blocks: int
  overlap: float = 0.05
  edm: EDM = DEFAULT_EDM

  @classmethod
  def from_config(cls, num_blocks: int, diffusion_config) -> LogNormalPartition:
    return cls(num_blocks, float(diffusion_config.overlap), EDM.from_config(diffusion_config))

  def boundaries(self) -> np.ndarray:
    return block_sigmas(self.num_blocks, self.edm)

  def sample(self, key: jax.Array, batch_size: int, *, block: int | jax.Array | None = None):
    """(σ (batch,), block): a block drawn uniformly (or the given one) and σ from its widened range."""
    bucket_index = None if block is None else self.num_blocks - 1 - block
    return sample_training_sigmas(key, batch_size, self.num_blocks, self.overlap, self.edm,
                                  bucket_index=bucket_index)

  def corrupt(self, key: jax.Array, x0: jax.Array, sigmas: jax.Array) -> jax.Array:
    noise = jax.random.normal(key, x0.shape, jnp.float32)
    return x0 + sigmas.reshape((-1,) + (1,) * (x0.ndim - 1)) * noise

  def inference_levels(self, num_steps: int, grid: str = 'quantile') -> np.ndarray:
    """The sampler's N descending σ: 'quantile' (the release's grid) or 'karras' (ρ = 7)."""
    if grid not in SIGMA_GRIDS:
      raise ValueError(f"sigma grid must be one of {sorted(SIGMA_GRIDS)}, got {grid!r}")
    return SIGMA_GRIDS[grid](num_steps, self.edm)

  def route_static(self, sigma: float) -> int:
    return route_static(sigma, self.num_blocks, self.edm)

  def prior(self, key: jax.Array, shape: tuple[int, ...], sigma: float) -> jax.Array:
    """The sampler's start: N(0, 1 + σ²) as the release draws it (a unit-norm target plus noise σ)."""
    return jax.random.normal(key, shape, jnp.float32) * np.sqrt(1.0 + sigma**2)

  def velocity(self, x: jax.Array, x_hat: jax.Array, sigma) -> jax.Array:
    """dx/dσ = (x − x̂)/σ of the probability-flow ODE."""
    return (x - x_hat) / sigma

  def euler(self, x: jax.Array, x_hat: jax.Array, sigma, next_sigma) -> jax.Array:
    """One Euler step of dx/dσ (SPEC §7)."""
    return x + (next_sigma - sigma) * self.velocity(x, x_hat, sigma)


@dataclasses.dataclass(frozen=True)
class MaskingPartition:
  """A masking time t ∈ [0, 1] cut into B slices, t_b = b/B (paper App. D, linear schedule α_t = 1 − t).

  Block 0 owns the most-masked slice [(B−1)/B, 1]; each slice is widened by γ of its width per side, in
  units of t. `corrupt` replaces each token by `mask_id` with probability t (absorbing-state diffusion).
  """
  num_blocks: int
  overlap: float = 0.05
  mask_id: int = -1

  def boundaries(self) -> np.ndarray:
    if self.num_blocks < 1:
      raise ValueError(f'num_blocks must be >= 1, got {self.num_blocks}')
    return np.linspace(0.0, 1.0, self.num_blocks + 1)

  def widened_ranges(self) -> np.ndarray:
    """(B, 2) ranges of t per bucket (bucket k = [k/B, (k+1)/B] widened and clipped), ascending in t."""
    b = self.boundaries()
    width = b[1:] - b[:-1]
    return np.clip(np.stack([b[:-1] - self.overlap * width, b[1:] + self.overlap * width], axis=1), 0.0, 1.0)

  def route(self, t):
    """Block of each t: high t (mostly masked) → block 0."""
    bucket_index = jnp.clip(jnp.floor(jnp.asarray(t, jnp.float32) * self.num_blocks), 0, self.num_blocks - 1)
    return (self.num_blocks - 1 - bucket_index).astype(jnp.int32)

  def route_static(self, t: float) -> int:
    return self.num_blocks - 1 - min(max(int(np.floor(float(t) * self.num_blocks)), 0), self.num_blocks - 1)

  def sample(self, key: jax.Array, batch_size: int, *, block: int | jax.Array | None = None):
    """(t (batch,), block): a block drawn uniformly (or the given one) and t uniform in its widened range."""
    block_key, t_key = jax.random.split(key)
    if block is None:
      block = jax.random.randint(block_key, (), 0, self.num_blocks)
    block = jnp.asarray(block, jnp.int32)
    ranges = jnp.asarray(self.widened_ranges(), jnp.float32)[self.num_blocks - 1 - block]
    return jax.random.uniform(t_key, (batch_size,), minval=ranges[0], maxval=ranges[1]), block

  def corrupt(self, key: jax.Array, x0: jax.Array, t: jax.Array) -> jax.Array:
    masked = jax.random.bernoulli(key, t.reshape((-1,) + (1,) * (x0.ndim - 1)), x0.shape)
    return jnp.where(masked, jnp.asarray(self.mask_id, x0.dtype), x0)

  def inference_levels(self, num_steps: int) -> np.ndarray:
    """N descending times from 1 (all masked) to 0."""
    return np.linspace(1.0, 0.0, num_steps) if num_steps > 1 else np.array([1.0])




def loss_weight(sigma, sigma_data: float = 0.5):
  """w(σ) = (σ² + σ_d²) / (σ·σ_d)² (SPEC §4)."""
  sigma = jnp.asarray(sigma, jnp.float32)
  return (sigma**2 + sigma_data**2) / (sigma * sigma_data)**2




def noise_plan(num_blocks: int, num_steps: int, edm: EDM = DEFAULT_EDM,
               overlap: float = 0.05) -> list[str]:
  """One line per block: the σ range training draws from, its median, the share above σ = 10 (where the noisy
  label says next to nothing), and the σ at which the sampler calls the block. Logged when training starts."""
  ranges = widened_ranges(num_blocks, overlap, edm)
  steps = inference_sigmas(num_steps, edm)
  lines = []
  for block in range(num_blocks):
    lo, hi = ranges[num_blocks - 1 - block]
    u_lo, u_hi = edm.cdf(lo), edm.cdf(hi)
    median = float(edm.icdf((u_lo + u_hi) / 2))
    above = float(np.clip((u_hi - edm.cdf(max(10.0, lo))) / (u_hi - u_lo), 0.0, 1.0))
    called = [f'{s:.3g}' for s in steps if route_static(s, num_blocks, edm) == block]
    lines.append(f'block {block}: trained on σ in [{lo:.3g}, {hi:.3g}], median {median:.3g}, '
                 f'{100 * above:.1f} % above σ = 10; sampler calls it at σ = {", ".join(called) or "(never)"}')
  return lines


# ------------------------------------------------------------------------------------- noise plans
# The release's P_mean (−1.2, EDM's image value) leaves block 0 trained where the sampler never calls it: the
# sampler calls block 0 once, at σ_max, for every B, N and σ grid, but σ_max = 80 lies 4.65 P_std above
# P_mean, where the training log-normal has 2e-6 of its mass. Block 0 then learns from draws whose noisy label
# still shows the class (median σ ≈ 0.8) and reads z_t instead of the image (README, "Beyond the paper").

NOISE_PLANS = ('release', 'matched')
MATCHED_REACH = 3.0  # 'matched': σ_max sits this many P_std above P_mean (the three-sigma bulk; tail 0.135 %).


def matched_p_mean(sigma_max: float = DEFAULT_EDM.sigma_max, p_std: float = DEFAULT_EDM.p_std,
                   reach: float = MATCHED_REACH) -> float:
  """The P_mean that puts the sampler's first σ inside the training log-normal's bulk.

  Criterion: (ln σ_max − P_mean) / P_std = reach, i.e. the log-normal gives σ ≥ σ_max the probability
  1 − Φ(reach) (0.135 % at 3), a σ it draws rather than one it never sees. Since the sampler's first σ is
  σ_max whatever B and N are, so is the answer: ln 80 − 3·1.2 = 0.7821 for the EDM defaults.
  """
  if not (sigma_max > 0 and p_std > 0 and math.isfinite(reach)):
    raise ValueError(f'matched_p_mean needs sigma_max > 0, p_std > 0, a finite reach; got {sigma_max}, '
                     f'{p_std}, {reach}')
  return math.log(sigma_max) - reach * p_std


def resolve_noise_plan(edm: EDM, plan: str = 'release') -> EDM:
  """'release': the configured P_mean; 'matched': `matched_p_mean` (P_std, σ_min, σ_max unchanged)."""
  if plan == 'release':
    return edm
  if plan == 'matched':
    return dataclasses.replace(edm, p_mean=matched_p_mean(edm.sigma_max, edm.p_std))
  raise ValueError(f'config.diffusion.noise_plan={plan!r} is not one of {NOISE_PLANS}')
