"""EDM's network side: preconditioning of a denoiser and the sinusoidal time embedding (SPEC §4)."""

import math

import jax.numpy as jnp


def preconditioning(sigma, sigma_data: float = 0.5):
  """EDM coefficients (c_skip, c_out, c_in, c_noise) for σ of any shape (SPEC §4)."""
  sigma = jnp.asarray(sigma, jnp.float32)
  s2, d2 = sigma**2, sigma_data**2
  c_skip = d2 / (s2 + d2)
  c_out = sigma * sigma_data / jnp.sqrt(s2 + d2)
  c_in = 1.0 / jnp.sqrt(s2 + d2)
  c_noise = 0.25 * jnp.log(sigma)
  return c_skip, c_out, c_in, c_noise


def timestep_embedding(t, dim: int = 256, max_period: float = 10000.0):
  """Sinusoidal features of c_noise: first half cos, second half sin, freq_k = exp(−ln(P)·k/half)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
