"""The language models (models/text.py): masks, rotary positions, shapes, who sees whom, block layouts, build()."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffblocks_jax import models
from diffblocks_jax.core import blocks
from diffblocks_jax.models import text

V, L, N = 7, 5, 2
TEXT_DIMS = dict(vocab_size=V, seq_len=L)
H = 16  # The tiny text models' width (helpers.tiny_config(data='text')).


def inputs(seed=0):
  """Clean tokens (N, L), masked tokens (N, L) with about half masked, times, noisy slots z_t (N, L, H), σ."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, V, (N, L)).astype(np.int32)
  x_t = np.where(rng.random((N, L)) < 0.5, V, tokens).astype(np.int32)
  return dict(tokens=jnp.asarray(tokens), x_t=jnp.asarray(x_t), t=jnp.asarray([0.3, 0.8], jnp.float32),
              z_t=jnp.asarray(rng.normal(size=(N, L, H)), jnp.float32), sigmas=jnp.asarray([0.5, 3.0], jnp.float32))


def jitted(graphdef, method):
  """params, *args -> the merged model's `method`: one compile per test instead of op-by-op dispatch."""
  return jax.jit(lambda params, *args: getattr(nnx.merge(graphdef, params), method)(*args))


def built(config, jitter_params, seed=0, **kwargs):
  """(graphdef, jittered params): every leaf moved off its init, so adaLN-Zero layers are no longer identities."""
  graphdef, params = models.split(models.build(config.model, seed=seed, **TEXT_DIMS, **kwargs))
  return graphdef, jitter_params(params)


# --- masks and positions ---

def test_block_diffusion_mask_written_out():
  # Rows and columns: clean x0 x1 x2 | noisy z0 z1 z2.
  want = np.array([[1, 0, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0, 0],
                   [1, 1, 1, 0, 0, 0],
                   [0, 0, 0, 1, 0, 0],
                   [1, 0, 0, 0, 1, 0],
                   [1, 1, 0, 0, 0, 1]], bool)
  got = text.block_diffusion_mask(3)
  assert got.dtype == bool
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(text.causal_mask(3), np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1]], bool))


def test_rotary_scores_depend_on_offset_only():
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32) for _ in range(2))
  score = lambda i, j: float(jnp.sum(text.rotary(q, jnp.array([i])) * text.rotary(k, jnp.array([j]))))
  np.testing.assert_allclose(score(3, 1), score(7, 5), rtol=1e-5)
  np.testing.assert_allclose(score(0, 0), float(jnp.sum(q * k)), rtol=1e-6)  # Position 0 is no rotation.
  assert abs(score(3, 1) - score(3, 2)) > 1e-3


# --- shapes, dtypes, build() ---

@pytest.mark.parametrize('kind,cls', [('mdm', text.MaskedDiT), ('mdm_dblock', text.DiffusionBlocksMaskedDiT),
                                      ('ar', text.ARLM), ('ar_dblock', text.DiffusionBlocksAR)])
def test_build_and_output_shapes(tiny_config, kind, cls):
  model = models.build(tiny_config(kind, data='text').model, **TEXT_DIMS)
  assert isinstance(model, cls)
  x = inputs()  # Eager calls: their compiled ops are reused by the later tests' eager calls.
  if kind.startswith('mdm'):
    out = model.denoise(x['x_t'], x['t'], 1 if kind.endswith('dblock') else None)
  elif kind == 'ar':
    out = model.logits(x['tokens'])
  else:
    out = model.denoise(x['tokens'], x['z_t'], x['sigmas'], 1)
    assert model.embedding_table(1).shape == (V, H)
  chex.assert_shape(out, (N, L, V))
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(models.split(model)[1]))


def test_bfloat16_compute_keeps_fp32_params_and_logits(tiny_config, jitter_params):
  """The same (jittered) parameters in float32 and in bfloat16 compute: fp32 parameters and logits, which are the
  fp32 model's up to bfloat16's rounding (and not bit for bit: the compute really is bfloat16)."""
  x = inputs()
  out = {}
  for dtype in ('float32', 'bfloat16'):
    model = models.build(tiny_config('ar_dblock', data='text', model__compute_dtype=dtype).model, **TEXT_DIMS)
    graphdef, params = models.split(model)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    out[dtype] = jitted(graphdef, 'denoise')(jitter_params(params), x['tokens'], x['z_t'], x['sigmas'], 0)
  assert out['bfloat16'].dtype == jnp.float32
  assert not np.array_equal(out['bfloat16'], out['float32'])
  np.testing.assert_allclose(out['bfloat16'], out['float32'], atol=0.05 * float(np.max(np.abs(out['float32']))))


def test_build_names_what_is_missing(tiny_config):
  with pytest.raises(ValueError, match=r"'mdm' needs the data dimensions vocab_size, seq_len; missing: vocab_size;"):
    models.build(tiny_config('mdm', data='text').model, seq_len=L)
  with pytest.raises(ValueError, match='missing: image_size, channels, num_classes'):
    models.build(tiny_config('dit', data='text').model, **TEXT_DIMS)
  with pytest.raises(ValueError, match=r"model.kind='gpt' is not one of .*'mdm_dblock'"):
    models.build(tiny_config('gpt', data='text').model, **TEXT_DIMS)


# --- who sees whom ---

def test_arlm_position_i_sees_only_tokens_before_i(tiny_config, jitter_params):
  graphdef, params = built(tiny_config('ar', data='text'), jitter_params)
  logits = jitted(graphdef, 'logits')
  tokens = inputs()['tokens']
  base = logits(params, tokens)
  for i in range(L):
    changed = tokens.at[:, i:].set((tokens[:, i:] + 1) % V)
    out = logits(params, changed)
    np.testing.assert_array_equal(out[:, :i + 1], base[:, :i + 1])  # x_i.. are unseen at positions <= i.
    if i + 1 < L:
      assert not np.allclose(out[:, i + 1], base[:, i + 1])  # Position i+1 reads x_i.


def test_ar_diffusion_slot_i_sees_its_prefix_and_itself(tiny_config, jitter_params):
  graphdef, params = built(tiny_config('ar_dblock', data='text'), jitter_params)
  denoise = jitted(graphdef, 'denoise')
  x = inputs()
  tokens, z_t, sigmas = x['tokens'], x['z_t'], x['sigmas']
  base = denoise(params, tokens, z_t, sigmas, 1)
  rng = np.random.default_rng(1)
  for i in range(L):
    later = tokens.at[:, i:].set((tokens[:, i:] + 1) % V)
    others = z_t + jnp.asarray(rng.normal(size=z_t.shape), jnp.float32) * (jnp.arange(L) != i)[:, None]
    np.testing.assert_allclose(denoise(params, later, others, sigmas, 1)[:, i], base[:, i], rtol=1e-6, atol=1e-6)
    own = z_t.at[:, i].add(1.0)
    assert not np.allclose(denoise(params, tokens, own, sigmas, 1)[:, i], base[:, i])
    if i:
      earlier = tokens.at[:, i - 1].set((tokens[:, i - 1] + 1) % V)
      assert not np.allclose(denoise(params, earlier, z_t, sigmas, 1)[:, i], base[:, i])
  assert not np.allclose(denoise(params, tokens, z_t, sigmas * 2, 1), base)  # σ conditions the output.


def test_masked_dit_every_position_sees_every_token(tiny_config, jitter_params):
  graphdef, params = built(tiny_config('mdm', data='text'), jitter_params)
  denoise = jitted(graphdef, 'denoise')
  x = inputs()
  base = denoise(params, x['x_t'], x['t'])
  for j in range(L):
    changed = x['x_t'].at[:, j].set(jnp.where(x['x_t'][:, j] == V, 0, V))  # Mask or unmask token j.
    diff = np.abs(np.asarray(denoise(params, changed, x['t']) - base)).max(axis=-1)
    assert (diff > 1e-6).all(), (j, diff)


# --- blocks ---

@pytest.mark.parametrize('kind', ['mdm_dblock', 'ar_dblock'])
def test_stacked_blocks_run_the_same_layers_as_a_list(tiny_config, jitter_params, kind):
  """Same seed, stacked (default) vs listed (stack=False): same parameters, and each block (an int, or a traced
  index into the stack) gives the listed block's output; the blocks differ from each other."""
  c = tiny_config(kind, data='text', model__num_layers=4)
  cls = text.DiffusionBlocksMaskedDiT if kind == 'mdm_dblock' else text.DiffusionBlocksAR
  make = lambda **kw: models.split(cls(c.model, [2, 2], rngs=nnx.Rngs(0), **TEXT_DIMS, **kw))
  (stacked_def, stacked), (listed_def, listed) = make(), make(stack=False)
  chex.assert_trees_all_equal(blocks.unstack(stacked), listed)
  stacked = jitter_params(stacked)
  listed = blocks.unstack(stacked)
  x = inputs()
  args = (x['x_t'], x['t']) if kind == 'mdm_dblock' else (x['tokens'], x['z_t'], x['sigmas'])
  traced = jitted(stacked_def, 'denoise')
  outs = []
  for b in range(2):
    want = nnx.merge(listed_def, listed).denoise(*args, b)
    chex.assert_trees_all_close(nnx.merge(stacked_def, stacked).denoise(*args, b), want, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(traced(stacked, *args, jnp.int32(b)), want, rtol=1e-5, atol=1e-6)
    outs.append(want)
  assert not np.allclose(outs[0], outs[1])


def test_one_block_of_every_layer_is_the_end_to_end_model(tiny_config, jitter_params):
  """The end-to-end masked model draws parts then layers, as DiffusionBlocks does: one seed, the same numbers."""
  c = tiny_config('mdm', data='text')
  e2e = text.MaskedDiT(c.model, rngs=nnx.Rngs(3), **TEXT_DIMS)
  one = text.DiffusionBlocksMaskedDiT(c.model, [2], rngs=nnx.Rngs(3), stack=False, **TEXT_DIMS)
  x = inputs()
  args = (x['x_t'], x['t'])
  e2e_def, e2e_params = models.split(e2e)
  one_def, one_params = models.split(one)
  as_blocks = lambda p: {'shared': p['parts'], 'blocks': {0: p['layers']}}
  chex.assert_trees_all_equal(as_blocks(e2e_params), one_params)
  e2e_params = jitter_params(e2e_params)
  chex.assert_trees_all_close(nnx.merge(e2e_def, e2e_params).denoise(*args),
                              nnx.merge(one_def, as_blocks(e2e_params)).denoise(*args, 0), rtol=1e-6)


def test_independent_blocks_start_from_one_embedding(tiny_config):
  model = models.build(tiny_config('ar_dblock', data='text', model__independent_blocks=True).model, **TEXT_DIMS)
  params = models.split(model)[1]
  assert 'shared' not in params and params['blocks']['shared']['token_embed'].shape == (2, V, H)
  np.testing.assert_array_equal(model.embedding_table(0), model.embedding_table(1))


def test_dropout_takes_an_explicit_key(tiny_config):
  model = models.build(tiny_config('ar', data='text', model__dropout=0.5).model, **TEXT_DIMS)
  tokens = inputs()['tokens']
  key = jax.random.key(0)
  np.testing.assert_array_equal(model(tokens), model(tokens))  # key=None: deterministic.
  np.testing.assert_array_equal(model(tokens, key=key), model(tokens, key=key))
  assert not np.allclose(model(tokens, key=key), model(tokens))
