"""Device mesh and shardings: parameters replicated, batches split on the 'data' axis."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(config, devices=None) -> Mesh:
  """A 1-D mesh ('data',) over `config.mesh.data` devices (-1 = all)."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices) if config.mesh.data == -1 else config.mesh.data
  return Mesh(np.asarray(devices[:n]), ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over 'data'."""
  return NamedSharding(mesh, P('data'))
