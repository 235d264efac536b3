"""Shared fixtures for the core tests: tiny configs and models that run in well under a second on CPU.

Fixtures here are factories (they return functions) so a test can build several variants:
  tiny_config(kind='dblock', **overrides) -> ConfigDict   a small config from config.get_base_config()
  tiny_model(config, seed=0) -> (model, graphdef, params) an initialised model on TINY_DIMS inputs
  tiny_batch(n, seed=0) -> (images float32 NHWC, labels int32)
  jitter_params(params, seed=0, scale=0.05) -> params       every leaf + N(0, scale): the zero-initialised
                                                            head/modulation no longer block the gradients
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from diffblocks_jax import config as config_lib
from diffblocks_jax import models

# How long a subprocess may run before a test calls it hung: a guard against deadlocks, not a speed limit, so
# generous that a slow or shared machine never trips it (tests assert no timings).
HANG_GUARD_S = 1800

# 8x8 RGB images, patch 4 -> 4 patches (+1 label/CLS token); 5 classes.
TINY_DIMS = dict(image_size=8, channels=3, num_classes=5)


def make_tiny_config(kind: str = 'dblock', **overrides):
  """A small config: hidden 24, 2 heads, 3 layers (one per block for B=3), MLP 32, no augmentation.

  `overrides` are dotted field names with '__' for '.', e.g. `model__num_blocks=1`.
  """
  c = config_lib.get_base_config()
  c.model.kind = kind
  c.model.hidden_size = 24
  c.model.num_heads = 2
  c.model.num_layers = 3
  c.model.num_blocks = 3
  c.model.mlp_dim = 32
  c.model.patch_size = 4
  c.data.source = 'digits'
  c.data.pad_crop = 0
  c.data.flip = False
  c.train.batch_size = 8
  c.train.num_epochs = 1
  c.train.steps_per_call = 1
  c.eval.batch_size = 4
  for name, value in overrides.items():
    *path, leaf = name.split('__')
    node = c
    for part in path:
      node = node[part]
    if leaf not in node:
      raise KeyError(f'tiny_config: unknown field {name!r}')
    node[leaf] = value
  return c


_MODEL_CACHE = {}


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


def judged_by(config):
  """What `generation.load_classifier` and `language.load_scorer` ask of an experiment, for `config` alone: its
  config, the judge loader and placement (no data, no model built)."""
  import types  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.training import experiment  # pylint: disable=g-import-not-at-top
  return types.SimpleNamespace(config=config, on_device=lambda tree: tree,
                               load_judge=lambda field, **checks: experiment.load_judge(config, field, **checks))


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
