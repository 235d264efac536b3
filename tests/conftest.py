"""Shared fixtures for the core tests: tiny configs and models that run in well under a second on CPU.

Fixtures here are factories (they return functions) so a test can build several variants:
  tiny_config(kind='dblock', data='digits', **overrides) -> ConfigDict   helpers.tiny_config
  tiny_model(config, seed=0) -> (model, graphdef, params) an initialised model on TINY_DIMS inputs
  tiny_batch(n, seed=0) -> (images float32 NHWC, labels int32)
  jitter_params(params, seed=0, scale=0.05) -> params       every leaf + N(0, scale): the zero-initialised
                                                            head/modulation no longer block the gradients
What is not a fixture (the repository root, the hang guard, the CLI runner, the config builders) is in
tests/helpers.py.
"""

from __future__ import annotations

import os
import shutil

import helpers

os.environ['XLA_FLAGS'] = helpers.xla_flags(os.environ.get('XLA_FLAGS', ''))  # Before JAX starts (helpers.py).
_SESSION_CACHE = helpers.share_compilation_cache()  # Before JAX starts: one XLA cache per session (helpers.py).

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np
import pytest

from diffblocks_jax import models
from helpers import HANG_GUARD_S, TINY_DIMS, tiny_config as make_tiny_config  # pylint: disable=unused-import

_MODEL_CACHE = {}

def pytest_collection_modifyitems(config, items):
  """Tests marked `long` (trainings to a target, every kill point, every notebook) run only with
  DIFFBLOCKS_LONG_TESTS=1: the default suite has a time budget on two cores (docs/testing.md)."""
  del config
  if helpers.LONG_TESTS:
    return
  skip = pytest.mark.skip(reason='long: run with DIFFBLOCKS_LONG_TESTS=1 (docs/testing.md)')
  for item in items:
    if 'long' in item.keywords:
      item.add_marker(skip)


def pytest_unconfigure(config):
  """The session's XLA cache goes with the session (removed by the process that made it: xdist's controller)."""
  del config
  if _SESSION_CACHE:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def make_tiny_model(config, seed: int = 0):
  """Built once per (model config, seed) per session; treat the returned objects as read-only."""
  cache_key = (config.model.to_json(), seed)
  if cache_key not in _MODEL_CACHE:
    model = models.build(config.model, seed=seed, **TINY_DIMS)
    graphdef, params = models.split(model)
    _MODEL_CACHE[cache_key] = model, graphdef, params
  return _MODEL_CACHE[cache_key]


def make_tiny_batch(n: int = 8, seed: int = 0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, TINY_DIMS['image_size'], TINY_DIMS['image_size'], TINY_DIMS['channels']))
  labels = rng.integers(0, TINY_DIMS['num_classes'], n)
  return images.astype(np.float32), labels.astype(np.int32)


def jitter(params, seed: int = 0, scale: float = 0.05):
  """Host-side NumPy noise (no per-shape compilation), returned as device arrays of the same dtypes."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jax.device_put(
      (np.asarray(p) + scale * rng.normal(size=p.shape)).astype(p.dtype)), params)


@pytest.fixture(scope='session')
def tiny_config():
  return make_tiny_config


@pytest.fixture(scope='session')
def tiny_model():
  return make_tiny_model


@pytest.fixture(scope='session')
def tiny_batch():
  return make_tiny_batch


@pytest.fixture(scope='session')
def jitter_params():
  return jitter
