"""Multi-host start-up: `jax.distributed.initialize()` when asked for or launched by SLURM.

Must run before anything touches a device (main.py calls it first). JAX then sees every process's devices
as one global set: each process loads only its shard of the training split (input_pipeline), the training
split and batches become global arrays (sharding.py), every process runs the same jitted steps, all write
their part of each checkpoint, and only process 0 logs and writes metrics.

Under SLURM, JAX gives each process only the GPU at SLURM_LOCALID (one process per GPU); with one process per
node, JAX_LOCAL_DEVICE_IDS must list the node's GPUs (launch/slurm_multinode.sh sets it). CPU processes
(tests, `launch/local_multiprocess.sh`) talk through gloo, JAX's default CPU collectives.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def under_slurm() -> bool:
  """Launched by `srun` with more than one task: JAX's cluster detection fills in the rest."""
  return int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_PROCID' in os.environ


def initialize_kwargs(config) -> dict:
  """Arguments for `jax.distributed.initialize`: the config's explicit values; the rest auto-detected."""
  d = config.distributed
  kwargs = {}
  if d.coordinator_address:
    kwargs['coordinator_address'] = d.coordinator_address
    if d.coordinator_address.rsplit(':', 1)[0] in ('127.0.0.1', 'localhost'):
      # Only local processes can reach a loopback coordinator: bind there, not on every interface.
      kwargs['coordinator_bind_address'] = d.coordinator_address
  if d.num_processes > 0:
    kwargs['num_processes'] = d.num_processes
  if d.process_id >= 0:
    kwargs['process_id'] = d.process_id
  return kwargs


def maybe_initialize(config) -> bool:
  """Joins the JAX cluster before any device is touched; returns whether this process is part of one."""
  if jax.distributed.is_initialized():  # A notebook or test that already joined.
    return True
  if not (config.distributed.enabled or under_slurm()):
    return False
  kwargs = initialize_kwargs(config)
  logging.info('jax.distributed.initialize(%s)', ', '.join(f'{k}={v!r}' for k, v in kwargs.items()))
  jax.distributed.initialize(**kwargs)
  logging.info('Process %d of %d; %d local / %d global devices.', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True
