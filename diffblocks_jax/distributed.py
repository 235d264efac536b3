"""Multi-host start-up: `jax.distributed.initialize()` when asked for or launched by SLURM."""

from __future__ import annotations

import os

import jax
from absl import logging


def maybe_initialize(config) -> bool:
  """Joins the JAX cluster before any device is touched; returns whether it did."""
  d = config.distributed
  under_slurm = int(os.environ.get('SLURM_NTASKS', '1')) > 1
  if not (d.enabled or under_slurm):
    return False
  kwargs = {}
  if d.coordinator_address:
    kwargs['coordinator_address'] = d.coordinator_address
  if d.num_processes > 0:
    kwargs['num_processes'] = d.num_processes
  if d.process_id >= 0:
    kwargs['process_id'] = d.process_id
  jax.distributed.initialize(**kwargs)
  logging.info('Process %d of %d; %d local / %d global devices.', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True
