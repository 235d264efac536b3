"""Classifier-free guidance end to end (SPEC §7): training with class dropout, evaluation with cfg_scale."""

import jax
import numpy as np

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
  guided = jax.jit(classification.make_predict_fn(graphdef, config))(state.params, images, jax.random.key(0))
  plain = jax.jit(classification.make_predict_fn(graphdef, config, cfg_scale=1.0))(state.params, images,
                                                                             jax.random.key(0))
  assert guided.shape == plain.shape == (8, 5)
  assert np.all(np.isfinite(np.asarray(guided)))
  assert not np.allclose(np.asarray(guided), np.asarray(plain))  # Guidance changes the answer.
