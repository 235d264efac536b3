"""Device meshes and placement: parameters replicated, batches and the training split sharded on 'data'.

Data parallel: a 1-D mesh ('data',). Block-parallel (`config.parallel_blocks`): a 2-D mesh ('block', 'data'),
row b being the devices of block b's group; the block-stacked parameters and Adam state are sharded on
'block' (`state_shardings`), so group b holds block b alone, and each block's batch is sharded on 'data'. Devices are ordered process-major on every mesh, so the devices
of one process are contiguous on 'data' and each process's rows of a sharded array form one block.

The training split lives on the devices as one global uint8 array whose rows are the processes' shards one
after another (each padded to a multiple of that process's devices on the mesh), sharded on 'data': a device
holds rows/devices of it, and no process ever needs another's data. A step draws global row indices and
`gather_rows` assembles the batch: each device gathers the rows it holds (zeros elsewhere) and one
reduce-scatter of the batch (not of the split) leaves every device its slice, already sharded on 'data'.
The batches are thus the same for any number of processes and devices.
"""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffblocks_jax import config as config_lib


class MeshError(config_lib.ConfigError):
  """The devices cannot be arranged as the config asks; the message names the field."""


def _by_process(devices) -> list[list[jax.Device]]:
  """Devices grouped by process (in process order), each group sorted by id."""
  groups = collections.defaultdict(list)
  for d in devices:
    groups[d.process_index].append(d)
  return [sorted(groups[p], key=lambda d: d.id) for p in sorted(groups)]


def make_mesh(config, devices=None) -> Mesh:
  """('data',) over `config.mesh.data` devices (-1 = all), or ('block', 'data') for block-parallel training.

  Every process contributes the same number of devices (a process without devices on the mesh could not
  contribute its data shard).
  """
  per_process = _by_process(jax.devices() if devices is None else devices)
  local = min(len(ds) for ds in per_process)
  if config.parallel_blocks:
    return block_mesh(per_process, len(config_lib.trained_blocks(config)))  # A block job: its blocks only.
  n = local * len(per_process) if config.mesh.data == -1 else config.mesh.data
  if n % len(per_process) or n // len(per_process) > local or n < 1:
    raise MeshError(f'config.mesh.data={config.mesh.data} cannot be split evenly over the {len(per_process)} '
                    f'processes ({local} devices each)')
  return Mesh(np.asarray([d for ds in per_process for d in ds[:n // len(per_process)]]), ('data',))


def block_mesh(per_process: list[list[jax.Device]], num_blocks: int) -> Mesh:
  """('block', 'data'): each process gives every block an equal share of its devices, so every group spans
  all processes (and so sees all the data) and moving blocks between groups stays within processes."""
  local = min(len(ds) for ds in per_process)
  per_group = local // num_blocks
  if per_group < 1:
    raise MeshError(f'config.parallel_blocks=True needs at least {num_blocks} devices per process, one per block '
                    f'it trains; this process has {local}')
  rows = [[d for ds in per_process for d in ds[b * per_group:(b + 1) * per_group]] for b in range(num_blocks)]
  return Mesh(np.asarray(rows), ('block', 'data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """A training batch: split on 'data'; block-parallel, (B, batch, ...) with block b's batch on group b."""
  return NamedSharding(mesh, P('block', 'data') if 'block' in mesh.axis_names else P('data'))


def eval_batch_sharding(mesh: Mesh) -> NamedSharding:
  """An evaluation batch: its leading dimension split over every device of the mesh."""
  return NamedSharding(mesh, P(mesh.axis_names))


def split_sharding(mesh: Mesh) -> NamedSharding:
  """The training split: rows on 'data' (block-parallel: every group holds the whole split)."""
  return NamedSharding(mesh, P('data'))


# ------------------------------------------------------------------------------------- the training split

def local_devices_on(mesh: Mesh) -> int:
  """This process's devices along 'data' (on a ('block', 'data') mesh: in one group; they all hold the split)."""
  local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  return local // (mesh.size // mesh.shape['data'])


def state_shardings(mesh: Mesh, abstract_state: Any, *, offload: bool = False) -> Any:
  """Shardings of a train state: replicated, except the block-stacked parts ('blocks' of params and Adam state).

  Those are sharded on 'block' on a ('block', 'data') mesh (group b holds block b), and with `offload` they
  live in host memory ('pinned_host'); the step brings one row at a time onto the device (core/blocks.py).
  """
  everywhere = replicated(mesh)
  if 'block' in mesh.axis_names:
    stacked = NamedSharding(mesh, P('block'))
  elif offload:
    stacked = everywhere.with_memory_kind('pinned_host')
  else:
    return jax.tree.map(lambda _: everywhere, abstract_state)
  place = lambda tree: dict(jax.tree.map(lambda _: everywhere, tree),
                            blocks=jax.tree.map(lambda _: stacked, tree['blocks']))
  return abstract_state.replace(step=everywhere, rng=everywhere, params=place(abstract_state.params),
                                opt_state=place(abstract_state.opt_state))


def on_device(tree: Any) -> Any:
  """`tree` with every array held in host memory copied to device memory (same devices and sharding)."""
  def fetch(x):
    kind = getattr(x.sharding, 'memory_kind', None)
    return x if kind in (None, 'device') else jax.device_put(x, x.sharding.with_memory_kind('device'))
  return jax.tree.map(fetch, tree)


def padded_rows(mesh: Mesh, num_local: int) -> int:
  """Rows each process places on the mesh: its shard, padded to a multiple of its devices there."""
  per_device = -(-num_local // local_devices_on(mesh))
  return per_device * local_devices_on(mesh)


def put_rows(mesh: Mesh, local: np.ndarray) -> jax.Array:
  """This process's rows (its equal shard of a split) as one global array sharded on 'data' (see above).

  Padding rows are zeros and never drawn: `global_rows` maps example indices around them.
  """
  pad = padded_rows(mesh, len(local)) - len(local)
  if pad:
    local = np.concatenate([local, np.zeros((pad,) + local.shape[1:], local.dtype)])
  return jax.make_array_from_process_local_data(split_sharding(mesh), local)


def global_rows(index: jax.Array, num_local: int, num_padded: int) -> jax.Array:
  """Row of example `index` (in the concatenation of the equal process shards) in the padded layout."""
  return (index // num_local) * num_padded + index % num_local


def gather_rows(mesh: Mesh, arrays: tuple[jax.Array, ...], rows: jax.Array) -> tuple[jax.Array, ...]:
  """arrays[rows] for `arrays` row-sharded on 'data' and replicated `rows`; results sharded on 'data'.

  Inside a jitted function. Costs one reduce-scatter of the gathered batch: XLA's own partitioning of
  such a gather may instead all-gather the whole split, which is why it is spelled out here. On a
  ('block', 'data') mesh `rows` is (B, batch), one batch per block, and the results are (B, batch, ...)
  sharded ('block', 'data'): each group gathers its own block's batch from its copy of the split.
  """
  per_block = 'block' in mesh.axis_names

  def local_gather(*args):
    *shards, rows = args
    per_device = shards[0].shape[0]
    local = rows - jax.lax.axis_index('data') * per_device
    here = (local >= 0) & (local < per_device)
    local = jnp.clip(local, 0, per_device - 1)
    out = []
    for x in shards:
      mask = here.reshape(here.shape + (1,) * (x.ndim - 1))
      # Exactly one device holds each row, so the sum over devices is that row, bit for bit.
      picked = jnp.where(mask, x[local], jnp.zeros((), x.dtype))
      out.append(jax.lax.psum_scatter(picked, 'data', scatter_dimension=rows.ndim - 1, tiled=True))
    return tuple(out)

  specs = tuple(P('data') for _ in arrays)
  out_spec = P('block', 'data') if per_block else P('data')
  return jax.shard_map(local_gather, mesh=mesh, in_specs=specs + (P('block') if per_block else P(),),
                       out_specs=tuple(out_spec for _ in arrays))(*arrays, rows)


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
  """Bytes each (addressable) device holds of a pytree of arrays, counted from the arrays' shards."""
  total = collections.Counter()
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      total[shard.device] += shard.data.nbytes
  return dict(total)
