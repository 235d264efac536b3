"""Fingerprints of a training state's leaves, for the checkpoint manifest (checkpointing.py): two
position-weighted sums of each array's bits, computed on the device, equal on any sharding and device count, so
that garbled bytes a restore would not notice are caught.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def words(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words (one per element; two for 8-byte types)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if x.dtype.itemsize == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # Adds a trailing axis of 2.
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{8 * x.dtype.itemsize}')).astype(jnp.uint32)


def fingerprint(x: jax.Array) -> jax.Array:
  """Two position-weighted sums mod 2**32 of the words. The weights are odd, so changing any one word
  changes both sums. Integer sums are exact in any order: the same on every sharding and device count.
  The flat index comes from iotas, not a reshape, so sharded inputs are reduced in place."""
  w = words(jnp.asarray(x))
  idx, stride = jnp.zeros(w.shape, jnp.uint32), 1
  for axis in reversed(range(w.ndim)):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= w.shape[axis]
  a = jnp.sum(w * (2 * idx + 1), dtype=jnp.uint32)
  b = jnp.sum(w * (idx * jnp.uint32(0x9E3779B9) | 1), dtype=jnp.uint32)
  return jnp.stack([a, b])


@jax.jit
def fingerprints_on_device(leaves: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Every leaf's fingerprint in one program. Block-sharded leaves need collectives, and many small programs
  with collectives in flight at once can starve XLA's CPU thread pool into a deadlock; one program cannot."""
  return {k: fingerprint(v) for k, v in leaves.items()}


fingerprint_on_device = jax.jit(fingerprint)


def in_host_memory(x) -> bool:
  return getattr(getattr(x, 'sharding', None), 'memory_kind', None) not in (None, 'device')


def fingerprints(leaves: dict[str, Any]) -> dict[str, jax.Array]:
  """Fingerprints of device leaves in one program; leaves held in host memory (offloaded blocks) one at a time,
  each copied to the device for its own program, so the device never holds more than one of them."""
  on_host = {k for k, v in leaves.items() if in_host_memory(v)}
  out = fingerprints_on_device({k: v for k, v in leaves.items() if k not in on_host})
  for k in sorted(on_host):
    out[k] = fingerprint_on_device(jax.device_put(leaves[k], leaves[k].sharding.with_memory_kind('device')))
  return out


def fetch(x: jax.Array) -> list[int]:
  # Multi-process: the (replicated) result is not fully addressable, but every process holds a copy.
  x = x if x.is_fully_addressable else x.addressable_data(0)
  return [int(v) for v in np.asarray(x)]


def leaves_by_path(tree: PyTree) -> dict[str, Any]:
  """'params/blocks/0/w' -> leaf, for a state dict (string keys only)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(str(k.key) for k in path): leaf for path, leaf in flat}


def manifest(tree: PyTree) -> dict[str, Any]:
  leaves = leaves_by_path(tree)
  prints = fingerprints(leaves)
  return {'leaves': {k: {'shape': list(np.shape(v)), 'dtype': str(v.dtype), 'fingerprint': fetch(prints[k])}
                     for k, v in leaves.items()}}
