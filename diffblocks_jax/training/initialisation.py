"""Where a new run's parameters come from: `config.train.init_from`.

'' is a random initialisation (the model's own). Otherwise the whole model's parameters are read on the host,
before the workdir is touched, and checked leaf by leaf against the model the config builds, so a source that
does not fit is one line naming the leaf (the CLI prints it, exit 2) and nothing is written:

- a WORKDIR of this project: the latest checkpoint of a run of the same kind (every parameter as it is), or of
  the end-to-end counterpart of this block-wise kind (`registry.counterpart`: an `ar` run into `ar_dblock`),
  converted by `models.pretrained.from_end_to_end`;
- 'hf:PATH': a Hugging Face folder (config.json + *.safetensors), read by `models.pretrained.load_hf`.

The optimizer state starts afresh either way; a resumed run reads its own checkpoint and never this source.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from diffblocks_jax import config as config_lib
from diffblocks_jax import models
from diffblocks_jax.models import pretrained
from diffblocks_jax.tasks import registry

PyTree = Any


def _error(config, message: str) -> config_lib.ConfigError:
  return config_lib.ConfigError(f'config.train.init_from={config.train.init_from!r}: {message}')


def abstract_params(config, data) -> PyTree:
  """The whole model's parameters as shapes (every block, whatever rows a block job trains)."""
  model = nnx.eval_shape(lambda: models.build(config.model, sigma_data=config.diffusion.sigma_data,
                                              **data.model_dims))
  return models.split(model)[1]


def _from_workdir(config, data, workdir: str, abstract: PyTree) -> PyTree:
  # Imported here: experiment.py imports this module to start a run.
  from diffblocks_jax.training import experiment

  source = config_lib.load_workdir(workdir)
  kind, counterpart = config.model.kind, registry.counterpart(config.model.kind)
  # A block-wise run may start from its end-to-end counterpart (converted); an end-to-end run from its own kind.
  allowed = (kind, counterpart) if registry.kind(kind).blockwise and counterpart else (kind,)
  if source.model.kind not in allowed:
    raise _error(config, f'{workdir} is a {source.model.kind!r} run; a {kind!r} run starts from a run of kind '
                 f'{" or ".join(map(repr, allowed))}')
  if source.train.blocks:
    raise _error(config, f'{workdir} is a block job (it holds blocks {tuple(source.train.blocks)} only): merge '
                 'the jobs first (--mode=merge) and start from the merged workdir')
  try:
    _, state = experiment.load_trained(source, workdir)
  except FileNotFoundError as e:
    raise _error(config, str(e)) from None
  params = jax.tree.map(np.asarray, jax.device_get(state.params))
  if source.model.kind == kind:
    return params
  try:
    return pretrained.from_end_to_end(params, source.model, config.model, abstract)
  except ValueError as e:
    raise _error(config, str(e)) from None


def _from_hf(config, folder: str, abstract: PyTree) -> PyTree:
  try:
    return pretrained.load_hf(os.path.expanduser(folder), config.model, abstract)
  except ValueError as e:
    raise _error(config, str(e)) from None


def _check(config, params: PyTree, abstract: PyTree) -> None:
  """The source's tree against the model's: the same leaves, shapes and dtypes, every value finite."""
  got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  want = dict(jax.tree_util.tree_flatten_with_path(abstract)[0])
  name = lambda path: '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
  missing, unexpected = sorted(map(name, want.keys() - got.keys())), sorted(map(name, got.keys() - want.keys()))
  if missing or unexpected:
    listed = lambda what, names: f'{what} {len(names)} ({", ".join(names[:3])}{", ..." if len(names) > 3 else ""})'
    parts = [listed('missing', missing)] * bool(missing) + [listed('unexpected', unexpected)] * bool(unexpected)
    raise _error(config, f'its parameters do not match the model (config.model): {"; ".join(parts)}')
  for path, spec in want.items():
    value = got[path]
    if tuple(value.shape) != tuple(spec.shape):
      raise _error(config, f'parameter {name(path)} has shape {tuple(value.shape)}; the model (config.model) has '
                   f'{tuple(spec.shape)}')
    if not np.all(np.isfinite(np.asarray(value, np.float32))):
      raise _error(config, f'parameter {name(path)} holds NaN or infinite values')


def check_source(config) -> None:
  """What can be checked of `config.train.init_from` without reading it: called before the data loads."""
  source = config.train.init_from
  if not source or '://' in source:
    return
  folder = os.path.expanduser(source.removeprefix('hf:'))
  hf = source.startswith('hf:')
  if not os.path.isdir(folder):
    what = 'a Hugging Face folder (config.json + *.safetensors)' if hf else "a run's workdir (or hf:PATH)"
    raise _error(config, f'{folder} does not exist (or is not a folder): name {what}')
  if not os.path.exists(os.path.join(folder, 'config.json')):
    raise _error(config, f'{folder} has no config.json: name ' + (
        'a folder saved by save_pretrained' if hf else "a trained run's workdir, or hf:PATH for a Hugging Face folder"))


def initial_params(config, data) -> PyTree | None:
  """The whole model's parameters (host arrays, cast to the model's dtypes) named by `config.train.init_from`,
  or None for a random initialisation."""
  source = config.train.init_from
  if not source:
    return None
  abstract = abstract_params(config, data)
  if source.startswith('hf:'):
    params = _from_hf(config, source.removeprefix('hf:'), abstract)
  else:
    params = _from_workdir(config, data, os.path.expanduser(source), abstract)
  _check(config, params, abstract)
  return jax.tree.map(lambda p, spec: np.asarray(p, spec.dtype), params, abstract)
