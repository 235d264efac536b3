"""Classifier-free guidance end to end (SPEC §7): training with class dropout, evaluation with cfg_scale."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffblocks_jax.core import optim, steps
from diffblocks_jax.tasks import classification


def test_drop_class_zeroes_whole_images_at_the_given_rate():
  images = jax.random.normal(jax.random.key(0), (2000, 4, 4, 3)) + 3.0  # No image is zero by chance.
  out = np.asarray(classification.Classification().drop_condition(jax.random.key(1), images, 0.3))
  dropped = np.all(out == 0, axis=(1, 2, 3))
  kept = np.all(out == np.asarray(images), axis=(1, 2, 3))
  assert np.all(dropped | kept)  # Each image is either untouched or entirely zero.
  assert abs(dropped.mean() - 0.3) < 0.04
  assert classification.Classification().drop_condition(jax.random.key(1), images, 0.0) is images


@pytest.mark.slow
def test_training_with_class_dropout_and_guided_evaluation(tiny_config, tiny_model, tiny_batch, jitter_params):
  config = tiny_config('dblock', diffusion__class_dropout_prob=0.5, eval__cfg_scale=2.0)
  _, graphdef, params = tiny_model(config)
  params = jitter_params(params)
  step = jax.jit(classification.make_train_step(graphdef, config, optim.make_schedule(config.optim, 10, 0)))
  state = steps.init_state(params, 0)
  images, labels = tiny_batch(8)
  for _ in range(3):
    state, metrics = step(state, images, labels)
    assert np.isfinite(float(metrics['loss']))
  # One sampler step (σ_max, block 0), the same prior draw for all three: the guided logits (the config's
  # cfg_scale, 2) are l(0) + s·(l(x) − l(0)) of the plain pass on the images and the unconditional pass (the images
  # zeroed, as class dropout trained it).
  predict = lambda **kw: jax.jit(classification.make_predict_fn(graphdef, config, num_steps=1, **kw))
  key = jax.random.key(0)
  guided = predict()(state.params, images, key)
  plain = predict(cfg_scale=1.0)(state.params, images, key)
  uncond = predict(cfg_scale=1.0)(state.params, jnp.zeros_like(images), key)
  assert guided.shape == plain.shape == (8, 5)
  # The image matters (by ~3e-4 at σ_max after three steps): far above the tolerance below, so the check can fail.
  assert np.max(np.abs(np.asarray(plain) - np.asarray(uncond))) > 1e-4
  chex.assert_trees_all_close(guided, uncond + config.eval.cfg_scale * (plain - uncond), rtol=1e-5, atol=1e-6)
