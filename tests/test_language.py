"""Language tasks: the masking partition's numbers, the bound split over blocks against an exact enumeration,
carry-over, and that both samplers call each block only for its own noise levels (tasks/masked_lm.py,
tasks/autoregressive.py)."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffblocks_jax.core import partitions
from diffblocks_jax.tasks import language
from diffblocks_jax.core import sampler
from diffblocks_jax.tasks import autoregressive, masked_lm


def test_masking_partition_numbers():
  """B = 3, γ = 0.05: t_b = b/3, each slice widened by 5 % of its width (1/60) per side, clipped to [0, 1];
  block 0 owns the most-masked slice."""
  plan = partitions.MaskingPartition(3, overlap=0.05, mask_id=7)
  np.testing.assert_allclose(plan.boundaries(), [0, 1 / 3, 2 / 3, 1])
  np.testing.assert_allclose(plan.widened_ranges(), [[0.0, 1 / 3 + 1 / 60], [1 / 3 - 1 / 60, 2 / 3 + 1 / 60],
                                                     [2 / 3 - 1 / 60, 1.0]])
  assert [plan.route_static(t) for t in (0.99, 0.7, 0.5, 0.34, 0.2, 0.0)] == [0, 0, 1, 1, 2, 2]
  np.testing.assert_array_equal(plan.route(jnp.array([0.99, 0.5, 0.01])), [0, 1, 2])
  for b, (lo, hi) in zip(range(3), [(2 / 3 - 1 / 60, 1.0), (1 / 3 - 1 / 60, 2 / 3 + 1 / 60), (0.0, 1 / 3 + 1 / 60)]):
    t, block = plan.sample(jax.random.key(b), 4000, block=b)
    assert int(block) == b
    assert lo - 1e-6 <= float(t.min()) and float(t.max()) <= hi + 1e-6
    assert float(t.max() - t.min()) > 0.9 * (hi - lo)  # It covers the widened range, not just the slice.


def test_carry_over_costs_nothing_where_a_token_is_shown():
  logits = jax.random.normal(jax.random.key(0), (2, 4, 5))
  x_t = jnp.array([[5, 1, 5, 3], [0, 5, 5, 5]])  # 5 = [MASK].
  tokens = jnp.array([[2, 1, 4, 3], [0, 2, 2, 1]])
  nll = masked_lm.masked_nll(masked_lm.carry_over(logits, x_t, 5), tokens)
  np.testing.assert_array_equal(np.asarray(nll)[np.asarray(x_t) != 5], 0.0)
  expected = -jax.nn.log_softmax(logits, -1)[0, 0, 2]
  np.testing.assert_allclose(nll[0, 0], expected, rtol=1e-6)


# ------------------------------------------------------------------ the bound, against an exact enumeration

V, L, B = 3, 3, 3
TABLE = np.array(jax.random.normal(jax.random.key(1), (L, V)))


def toy_logits(x_t: jax.Array, block) -> jax.Array:
  """A fixed toy denoiser: logits depend on the position, on how many tokens are masked and on the block."""
  num_masked = jnp.sum(x_t == V, axis=-1).astype(jnp.float32)
  shift = jnp.arange(V, dtype=jnp.float32) * (0.4 * num_masked[:, None, None] - 0.3 * block)
  return jnp.asarray(TABLE)[None] + shift


def exact_terms(tokens: np.ndarray) -> np.ndarray:
  """Each block's share of the NELBO of one sequence, by enumerating the 2^L masks and integrating
  (1/t)·t^k·(1−t)^(L−k) exactly over the block's slice of t."""
  edges = np.linspace(0, 1, B + 1)
  terms = np.zeros(B)
  for mask in itertools.product([False, True], repeat=L):
    k = sum(mask)
    if not k:
      continue
    x_t = np.where(mask, V, tokens)[None]
    for b in range(B):
      log_probs = masked_lm.carry_over(toy_logits(jnp.asarray(x_t), b), jnp.asarray(x_t), V)
      cost = float(masked_lm.masked_nll(log_probs, jnp.asarray(tokens[None]))[0].sum())
      lo, hi = edges[B - 1 - b], edges[B - b]
      # ∫ t^(k−1) (1−t)^(L−k) dt, expanded binomially.
      poly = sum(math.comb(L - k, j) * (-1)**j * np.poly1d([1] + [0] * (k - 1 + j)) for j in range(L - k + 1))
      integral = np.polyint(poly)
      terms[b] += cost / L * (integral(hi) - integral(lo))
  return terms


def test_block_terms_of_the_bound_match_an_exact_enumeration():
  """Monte Carlo per block (t drawn in the block's slice and run by that block) against the exact integral;
  the terms add up to the whole bound."""
  tokens = np.array([2, 0, 1])
  exact = exact_terms(tokens)
  n = 6000
  fn = lambda x_t, t, b: masked_lm.carry_over(toy_logits(x_t, b), x_t, V)
  batch = jnp.asarray(np.tile(tokens, (n, 1)))
  per_sequence = np.asarray(masked_lm.nelbo_terms(fn, batch, jax.random.key(0), B, 4, V))  # (n, B)
  estimate, stderr = per_sequence.mean(0), per_sequence.std(0) / math.sqrt(n)
  assert np.all(np.abs(estimate - exact) < 4 * stderr + 1e-3), (estimate, exact, stderr)
  # The whole bound: ∫0^1 over the same enumeration is a sum of Beta functions.
  whole = 0.0
  for mask in itertools.product([False, True], repeat=L):
    k = sum(mask)
    if k:
      x_t = jnp.asarray(np.where(mask, V, tokens)[None])
      # One block only (b = 0) for the whole interval: the end-to-end model.
      cost = float(masked_lm.masked_nll(masked_lm.carry_over(toy_logits(x_t, 0), x_t, V), jnp.asarray(tokens[None]))[0].sum())
      whole += cost / L * math.gamma(k) * math.gamma(L - k + 1) / math.gamma(L + 1)
  one_block = np.asarray(masked_lm.nelbo_terms(lambda x, t, b: fn(x, t, 0), batch, jax.random.key(1), 1, 8, V))
  assert abs(one_block.mean() - whole) < 4 * one_block.std() / math.sqrt(n) + 1e-3
  assert np.all(exact > 0)


# ------------------------------------------------------------------ samplers: each block for its own levels

class RecordingModel(nnx.Module):
  """A list of B blocks (so the sampler must switch) whose every call records (block, level) at run time."""

  def __init__(self, num_blocks: int, calls: list, vocab: int = V, width: int = 4):
    self.num_blocks, self.stacked, self.vocab = num_blocks, False, vocab
    self.table = nnx.Param(jax.random.normal(jax.random.key(0), (vocab, width)))
    self._calls = calls

  def _record(self, block: int, level):
    jax.debug.callback(lambda lv: self._calls.append((block, float(np.asarray(lv)[0]))), level, ordered=True)

  def denoise(self, *args, key=None):
    del key
    if len(args) == 3:  # Masked: (x_t, t, block).
      x_t, t, block = args
      self._record(block, t)
      return jnp.zeros(x_t.shape + (self.vocab,)) + 0.0 * self.table[...].sum()
    tokens, z_t, sigmas, block = args  # Autoregressive: (tokens, z_t, σ, block).
    self._record(block, sigmas)
    return jnp.zeros(tokens.shape + (self.vocab,)) + 0.0 * z_t.sum()

  # What tasks/autoregressive.normalised_table reads.
  def block(self, b):
    return b

  def outer(self, block):
    del block
    return self

  def embedding_table(self):
    return self.table[...]


def test_unmasking_sampler_calls_each_block_only_inside_its_slice():
  calls = []
  plan = partitions.MaskingPartition(B, overlap=0.05, mask_id=V)
  out = masked_lm.unmask(masked_lm.MaskedLM(V), RecordingModel(B, calls), jax.random.key(0), 2, 5, partition=plan,
                         num_steps=6)
  jax.effects_barrier()
  assert out.shape == (2, 5) and int(out.max()) < V  # Everything unmasked at the end.
  times, owners = masked_lm.unmasking_plan(plan, 6)
  assert [b for b, _ in calls] == owners.tolist() == [0, 0, 1, 1, 2, 2]
  ranges = plan.widened_ranges()
  for (block, t), t_next in zip(calls, times[1:]):
    lo, hi = ranges[B - 1 - block]
    assert lo - 1e-6 <= t <= hi + 1e-6 and lo - 1e-6 <= t_next <= hi + 1e-6  # The whole step is the block's.


@pytest.mark.parametrize('solver', autoregressive.AR_SOLVERS)
def test_autoregressive_sampler_calls_each_block_only_for_its_own_sigma(solver):
  calls = []
  plan = partitions.LogNormalPartition(4, overlap=0.1)
  seq_len, steps = 3, 8
  out = autoregressive.denoise_tokens(autoregressive.Autoregressive(), RecordingModel(4, calls), jax.random.key(0),
                                      2, seq_len, partition=plan, num_steps=steps, solver=solver)
  jax.effects_barrier()
  assert out.shape == (2, seq_len)
  assert len(calls) == seq_len * steps  # N steps per token.
  levels, owners = sampler.plan(plan, steps)
  assert sorted(set(owners.tolist())) == [0, 1, 2, 3]
  edges = plan.boundaries()  # Ascending σ: block b owns [edges[B−1−b], edges[B−b]].
  for i, (block, sigma) in enumerate(calls):
    assert block == owners[i % steps]
    np.testing.assert_allclose(sigma, levels[i % steps], rtol=1e-5)
    assert edges[3 - block] * (1 - 1e-6) <= sigma <= edges[4 - block] * (1 + 1e-6)


def test_top_k_and_temperature():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  draws = jax.vmap(lambda k: masked_lm.sample_tokens(k, logits, 1.0, 2))(jax.random.split(jax.random.key(0), 2000))
  assert set(np.unique(np.asarray(draws)).tolist()) == {0, 1}
  cold = jax.vmap(lambda k: masked_lm.sample_tokens(k, logits, 0.05))(jax.random.split(jax.random.key(1), 200))
  assert np.all(np.asarray(cold) == 0)


def test_sample_entropy():
  assert language.sample_entropy(np.array([[1, 1, 1, 1]])) == 0.0
  assert language.sample_entropy(np.array([[0, 1, 2, 3], [5, 5, 6, 6]])) == pytest.approx((2.0 + 1.0) / 2)


@pytest.mark.parametrize('kind', ['mdm', 'mdm_dblock'])
def test_untrained_bound_is_a_uniform_guess(kind):
  """The masked DiT's head starts at zero: every masked token costs log V, so the bound is log₂ V bits per
  character in expectation (E[#masked] = tL cancels the 1/t), whichever blocks run."""
  from diffblocks_jax import models  # pylint: disable=g-import-not-at-top
  from helpers import tiny_config  # pylint: disable=g-import-not-at-top
  c = tiny_config(kind, data='text', eval__elbo_draws=8)
  vocab, seq_len = 11, 8
  data = type('Data', (), {'vocab_size': vocab, 'seq_len': seq_len})()
  graphdef, params = models.split(models.build(c.model, vocab_size=vocab, seq_len=seq_len))
  tokens = jax.random.randint(jax.random.key(0), (512, seq_len), 0, vocab)
  terms = np.asarray(jax.jit(masked_lm.make_bound_fn(graphdef, c, data))(params, tokens, jax.random.key(1)))
  total = terms.sum(-1) * language.BITS_PER_NAT
  assert abs(total.mean() - math.log2(vocab)) < 4 * total.std() / math.sqrt(len(total))


def test_scorer_workdir_errors_name_the_field(tmp_path):
  """load_scorer: the scorer must be an end-to-end 'ar' run on the same data."""
  import os  # pylint: disable=g-import-not-at-top
  from diffblocks_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from helpers import judged_by, shipped_config  # pylint: disable=g-import-not-at-top
  config = shipped_config('text_ar_dblock.py')
  config.eval.scorer_workdir = str(tmp_path / 'missing')
  with pytest.raises(config_lib.ConfigError, match=r'config.eval.scorer_workdir=.*missing'):
    language.load_scorer(judged_by(config), autoregressive.token_nll)
  for kind, seq_len, match in (('mdm', 64, "holds a 'mdm' run"), ('ar', 32, 'other data')):
    other = shipped_config('text_ar.py')
    other.model.kind, other.data.seq_len = kind, seq_len
    os.makedirs(tmp_path / kind, exist_ok=True)
    (tmp_path / kind / 'config.json').write_text(other.to_json())
    config.eval.scorer_workdir = str(tmp_path / kind)
    with pytest.raises(config_lib.ConfigError, match=match):
      language.load_scorer(judged_by(config), autoregressive.token_nll)
