"""A layer stack cut into B blocks: the public wrapper that makes any NNX transformer a DiffusionBlocks model.

  model = DiffusionBlocks(make_layer, layer_counts=[2, 2, 2], make_outer=make_outer, rngs=nnx.Rngs(0))
  model.denoise(*inputs, block=b)  ==  outer(block_b_layers, *inputs)

`make_layer(rngs)` builds one layer; `make_outer(rngs)` builds everything outside the layers (embeddings,
time conditioning, head) as a module whose `__call__(layers, *inputs, key=None)` runs a block's layers
between its own parts. The outer parts are shared by all blocks or, with `independent=True`, copied into
each block (same initial draw), so that a block is self-contained (block-parallel training needs that).

Blocks of equal depth are **stacked**: every block parameter carries a leading axis of size B, and a block
is a row of it. A traced block index selects a row with a dynamic slice, so a training step on block b
needs no `lax.switch`, holds one block body whatever B is, and never copies the idle rows. Uneven depths
keep a list of blocks, and the step switches over them.

Weight-tied (`weight_tied=True`, `model.weight_tied`): one block's parameters serve all B noise slices, a stack
of ONE row. B still cuts the noise levels (the partition, the default sampler); which row serves slice b is
`row_of(b, rows)`, the one place that decides it, asked by the step (core/steps.py) and by `block`.

Pure parameter tree (`nnx.split` → `nnx.to_pure_dict`):
  stacked, shared outer   {'shared': {...}, 'blocks': {'layers': {j: {... (B, ...)}}}}
  stacked, independent    {'blocks': {'layers': {...}, 'shared': {...}}}       (every leaf (B, ...))
  uneven                  {'shared': {...}?, 'blocks': {b: {'layers': {...}, 'shared': {...}?}}}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

PyTree = Any


def run_layers(layers: Sequence[nnx.Module], x, *args, remat: str = '', **kwargs):
  """`x` through `layers` in order: every model runs its layers here. `remat` (config.model.remat: '' or a name
  in `jax.checkpoint_policies`) puts each layer under `jax.checkpoint` with that policy, so the backward pass
  keeps each layer's input and what the policy saves, and recomputes the rest (one layer's worth at a time)."""
  if not remat:
    for layer in layers:
      x = layer(x, *args, **kwargs)
    return x
  policy = getattr(jax.checkpoint_policies, remat)
  for layer in layers:
    graphdef, state = nnx.split(layer)
    # The other arguments (condition, dropout keys, mask) are closed over: jax.checkpoint differentiates
    # through closed-over values as through arguments.
    run = lambda state, x, graphdef=graphdef: nnx.merge(graphdef, state)(x, *args, **kwargs)
    x = jax.checkpoint(run, policy=policy)(state, x)
  return x


class Block(nnx.Module):
  """A contiguous run of layers, with its own copy of the outer parts when blocks are independent; `remat`
  as `run_layers` takes it."""

  def __init__(self, layers: Sequence[nnx.Module], shared: nnx.Module | None = None, remat: str = ''):
    self.layers = nnx.List(list(layers))
    self.shared = shared
    self.remat = remat

  def __call__(self, x, *args, **kwargs):
    return run_layers(self.layers, x, *args, remat=self.remat, **kwargs)


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
  """One module of the same structure whose every variable is the modules' variables stacked on axis 0."""
  graphdef, _ = nnx.split(modules[0])
  return nnx.merge(graphdef, stack_trees([nnx.split(m)[1] for m in modules]))


class DiffusionBlocks(nnx.Module):
  """B blocks of a layer stack; block b denoises the target over the b-th slice of noise levels. `remat`:
  rematerialise each layer with that `jax.checkpoint_policies` name (`run_layers`; '' = off)."""

  def __init__(self, make_layer: Callable[[nnx.Rngs], nnx.Module], layer_counts: Sequence[int], *,
               make_outer: Callable[[nnx.Rngs], nnx.Module], independent: bool = False, rngs: nnx.Rngs,
               stack: bool | None = None, remat: str = '', weight_tied: bool = False):
    counts = [int(n) for n in layer_counts]
    if not counts or min(counts) < 1:
      raise ValueError(f'layer_counts={tuple(counts)} must be one or more positive layer counts')
    equal = len(set(counts)) == 1
    if weight_tied and (not equal or independent):
      raise ValueError(f'weight_tied=True needs blocks of equal depth (got layer_counts={tuple(counts)}) and shared '
                       f'outer parts (got independent={independent})')
    self.layer_counts = counts
    self.weight_tied = bool(weight_tied)
    if stack and not equal:
      raise ValueError(f'layer_counts={tuple(counts)}: only blocks of equal depth can be stacked')
    self.stacked = equal if stack is None else stack  # stack=False: a list even for equal depths (tests).
    # Draw order (outer parts, then each block's layers in turn) is what it was before stacking: the same
    # seed gives the same initial parameters.
    if independent:
      self.shared = None
      shared_key = rngs.params()  # Every copy starts from the same draw: one embedding space at init.
      copies = [make_outer(nnx.Rngs(params=shared_key)) for _ in counts]
    else:
      self.shared = make_outer(rngs)
      copies = [None] * len(counts)
    rows = counts[:1] if weight_tied else counts  # Weight-tied: one row of block parameters for all B slices.
    blocks = [Block([make_layer(rngs) for _ in range(n)], shared=s, remat=remat) for n, s in zip(rows, copies)]
    self.blocks = stack_modules(blocks) if self.stacked else nnx.List(blocks)

  @property
  def num_blocks(self) -> int:
    """B: the noise slices (and the default number of sampler steps)."""
    return len(self.layer_counts)

  @property
  def num_rows(self) -> int:
    """Rows of block parameters: B, or 1 when weight-tied."""
    return 1 if self.weight_tied else self.num_blocks

  def block(self, b) -> Block:
    """The block serving slice b (a Python int, or for stacked blocks a traced int32 scalar): row `row_of(b)`."""
    b = row_of(b, self.num_rows)
    if not self.stacked:
      return self.blocks[b]
    graphdef, state = nnx.split(self.blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[b], state))

  def outer(self, block: Block) -> nnx.Module:
    """The outer parts that `block` runs between: the shared ones, or its own copy."""
    return self.shared if self.shared is not None else block.shared

  def denoise(self, *inputs, block, key: jax.Array | None = None):
    """The model's output when block `block` denoises: outer parts around that block's layers."""
    layers = self.block(block)
    return self.outer(layers)(layers, *inputs, key=key)


# ------------------------------------------------------------------ one block of a pure parameter tree
# A training step on block b differentiates the shared parts and row b only. For stacked blocks the row
# keeps a leading axis of 1: merged with the model's graphdef it is a one-block model whose block 0 is b,
# so the step never builds gradients (or zeros) of the whole stack.

def row_of(b, num_rows: int):
  """The row of block parameters (and Adam state) that serves noise slice b: row b, or row 0 for every slice
  when there is one row (weight-tied, `model.weight_tied`; an untied B = 1 has only slice 0). The one place that
  decides it: the step asks with the params tree's rows, the model with its own."""
  return 0 if num_rows == 1 else b


def is_stacked(blocks_tree: PyTree) -> bool:
  """A list of blocks is a dict with int keys; stacked blocks are named children or an AdamState of stacks."""
  return not (isinstance(blocks_tree, dict) and any(isinstance(k, int) for k in blocks_tree))


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where the block stacks live. `host`: in host memory (`train.offload_idle_blocks`), so that the device
  holds one block's parameters and Adam state at a time; every row read is fetched to the device and every
  row written is stored back first (XLA wants both operands of an update in one memory space)."""
  host: bool = False

  def fetch(self, x: jax.Array) -> jax.Array:
    return jax.device_put(x, jax.memory.Space.Device) if self.host else x

  def store(self, x: jax.Array) -> jax.Array:
    return jax.device_put(x, jax.memory.Space.Host) if self.host else x

  def row(self, x: jax.Array, b) -> jax.Array:
    """Row b of a stack, keeping a leading axis of 1, on the device."""
    return self.fetch(jax.lax.dynamic_slice_in_dim(x, b, 1))

  def write(self, x: jax.Array, row: jax.Array, b) -> jax.Array:
    """The stack with row b replaced, in place."""
    return jax.lax.dynamic_update_slice_in_dim(x, self.store(row), b, 0)


ON_DEVICE = Placement()


def take(tree: PyTree, b, placement: Placement = ON_DEVICE) -> PyTree:
  """{'shared'?, 'block'}: the parts of a params (or optimizer-state) tree that a step on block b trains."""
  blocks = tree['blocks']
  if is_stacked(blocks):
    row = jax.tree.map(lambda x: placement.row(x, b), blocks)
  else:
    row = blocks[b]
  out = {'block': row}
  if 'shared' in tree:
    out['shared'] = tree['shared']
  return out


def put(tree: PyTree, part: PyTree, b, placement: Placement = ON_DEVICE) -> PyTree:
  """`tree` with the parts from `take(tree, b)` replaced by `part`: stacked rows written in place."""
  blocks = tree['blocks']
  if is_stacked(blocks):
    blocks = jax.tree.map(lambda x, r: placement.write(x, r, b), blocks, part['block'])
  else:
    blocks = {**blocks, b: part['block']}  # The other blocks pass through by reference.
  out = dict(tree, blocks=blocks)
  if 'shared' in part:
    out['shared'] = part['shared']
  return out


def model_params(params: PyTree, part: PyTree, b) -> tuple[PyTree, Any]:
  """(params to merge, block index to call) for a model whose trained parts are `part = take(params, b)`.

  Stacked: the one-block view, called as block 0. A list of blocks: every block, `part` put back.
  """
  if is_stacked(params['blocks']):
    view = {'blocks': part['block']}
    if 'shared' in part:
      view['shared'] = part['shared']
    return view, 0
  return put(params, part, b), b


def num_blocks_of(params: PyTree) -> int:
  blocks = params['blocks']
  if is_stacked(blocks):
    return jax.tree.leaves(blocks)[0].shape[0]
  return len(blocks)


def block_tree(params: PyTree, b: int) -> PyTree:
  """Block b's own parameters (no block axis), from either layout: for reading, importing and tests."""
  blocks = params['blocks']
  if is_stacked(blocks):
    return jax.tree.map(lambda x: x[b], blocks)
  return blocks[b]


def stack_trees(trees: list[PyTree]) -> PyTree:
  """The stacked layout's `params['blocks']` from B per-block trees of equal structure."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(params: PyTree) -> PyTree:
  """`params` with stacked blocks as a dict {b: block b's tree} (arrays or ShapeDtypeStructs); else as is."""
  if 'blocks' not in params or not is_stacked(params['blocks']):
    return params
  row = lambda x, b: jax.ShapeDtypeStruct(x.shape[1:], x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x[b]
  return dict(params, blocks={b: jax.tree.map(lambda x: row(x, b), params['blocks'])
                              for b in range(num_blocks_of(params))})


def restack(params: PyTree) -> PyTree:
  """The inverse of `unstack` for arrays."""
  return dict(params, blocks=stack_trees([params['blocks'][b] for b in sorted(params['blocks'])]))
