"""Every model kind and data source, listed once: the one extension point (docs/architecture.md, "Adding a task").

A kind names its task (what is diffused and how it is scored: a module of `diffblocks_jax/tasks/`), its network
(a class of `diffblocks_jax/models/`), the data family it reads and whether it is block-wise. `config.validate`,
`models.build`, the training loop and `--mode=eval|sample` look kinds up here; nothing else lists them.

This module imports nothing from the package: everything may read it (the config's validation first of all).
Task and model modules are imported by name when a run needs them.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from types import ModuleType

# The data families, and the dimensions of the data that a family's model constructors take.
DATA_DIMS = {'image': ('image_size', 'channels', 'num_classes'), 'text': ('vocab_size', 'seq_len')}
# config.data.source -> the family it yields (loaders: data/input_pipeline.py, data/text.py).
SOURCES = {'tfds': 'image', 'digits': 'image', 'npz': 'image', 'folder': 'image', 'text': 'text', 'pydoc': 'text'}
# Sources that can carve a validation share out of train (config.data.validation_fraction).
VALIDATION_SOURCES = ('digits', 'npz', 'tfds', 'text', 'pydoc')


def _time_embedding_width(m) -> str | None:
  # The DiffusionBlocks ViT's time embedding is hidden // 6 wide (the release's layout).
  if m.hidden_size < 6:
    return f'config.model.hidden_size={m.hidden_size} must be >= 6 (time embedding width hidden // 6)'
  return None


def _sincos_positions(m) -> str | None:
  if m.hidden_size % 4:
    return (f"config.model.hidden_size={m.hidden_size} must be divisible by 4 (the DiT's 2-D sine-cosine "
            'positions)')
  return None


def _rotary_pairs(m) -> str | None:
  if (m.hidden_size // m.num_heads) % 2:
    return (f'config.model.hidden_size / config.model.num_heads = {m.hidden_size // m.num_heads} must be even '
            '(rotary positions rotate pairs of channels)')
  return None


# config.model.recurrent (recurrent depth, models/recurrent.py): a sub-dict the config adds; what each kind reads.
RECURRENT_FIELDS = {
    'rd': ('prelude_layers', 'coda_layers', 'mean_depth', 'backprop_depth', 'min_depth', 'depth_distribution',
           'depth_sigma'),
    'rd_dblock': ('prelude_layers', 'coda_layers'),
}
DEPTH_DISTRIBUTIONS = ('lognormal_poisson', 'poisson', 'fixed')  # config.model.recurrent.depth_distribution.


def _recurrent_fields(m) -> str | None:
  r = m.get('recurrent')
  need = RECURRENT_FIELDS[m.kind]
  missing = [name for name in need if r is None or name not in r]
  if missing:
    return (f'config.model.recurrent.{missing[0]} is missing: model.kind={m.kind!r} needs config.model.recurrent '
            f'with {", ".join(need)} (configs/text_rd.py sets them)')
  for name in ('prelude_layers', 'coda_layers'):
    if isinstance(r[name], bool) or not isinstance(r[name], int) or r[name] < 0:
      return f'config.model.recurrent.{name}={r[name]!r} must be an integer >= 0'
  return None


def _recurrent_depth(m) -> str | None:
  """'rd': the depth draw can never give 0 unrolls, and truncation keeps k <= the mean depth."""
  if (error := _recurrent_fields(m)) is not None:
    return error
  r = m.recurrent
  if r.depth_distribution not in DEPTH_DISTRIBUTIONS:
    return f'config.model.recurrent.depth_distribution={r.depth_distribution!r} is not one of {DEPTH_DISTRIBUTIONS}'
  if isinstance(r.min_depth, bool) or not isinstance(r.min_depth, int) or r.min_depth < 1:
    return (f'config.model.recurrent.min_depth={r.min_depth!r} must be an integer >= 1: the depth distribution '
            'must not draw 0 unrolls')
  if r.depth_distribution == 'fixed':
    if r.mean_depth != int(r.mean_depth) or r.mean_depth < r.min_depth:
      return (f"config.model.recurrent.mean_depth={r.mean_depth!r} must be an integer >= min_depth={r.min_depth} "
              "with depth_distribution='fixed' (every step unrolls it)")
  elif not r.mean_depth > r.min_depth:
    return (f'config.model.recurrent.mean_depth={r.mean_depth!r} must exceed min_depth={r.min_depth} with '
            f'depth_distribution={r.depth_distribution!r} (r = min_depth + Poisson(mean_depth - min_depth))')
  if r.depth_distribution == 'lognormal_poisson' and not r.depth_sigma > 0:
    return f"config.model.recurrent.depth_sigma={r.depth_sigma!r} must be > 0 with 'lognormal_poisson'"
  k = r.backprop_depth
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    return f'config.model.recurrent.backprop_depth={k!r} must be an integer >= 1 (unrolls with gradients)'
  if k > r.mean_depth:
    return (f'config.model.recurrent.backprop_depth={k} must be <= config.model.recurrent.mean_depth='
            f'{r.mean_depth} (truncated backpropagation through the last k of the unrolls)')
  return None


def _weight_tied_recurrence(m) -> str | None:
  """'rd_dblock': the recurrent block is one block of weights."""
  if not m.weight_tied:
    return ("config.model.weight_tied=False: model.kind='rd_dblock' runs ONE recurrent block at every noise level; "
            'set config.model.weight_tied=True')
  return None


@dataclasses.dataclass(frozen=True)
class Kind:
  """One `config.model.kind`."""
  task: str  # Module of diffblocks_jax/tasks/ (the task protocol: tasks/__init__.py).
  model: str  # 'module:Class' of diffblocks_jax/models/, built by models.build.
  data: str  # A key of DATA_DIMS: the family of data sources it reads.
  blockwise: bool  # DiffusionBlocks (B blocks, each trained alone) rather than its end-to-end baseline.
  # config.diffusion.noise_plan values it accepts: 'matched' sets P_mean for a diffused *embedding* (labels,
  # tokens), whose first sampler step at σ_max must lie in the training log-normal's bulk.
  noise_plans: tuple[str, ...] = ('release',)
  solvers: tuple[str, ...] = ('euler', 'heun')  # config.eval.solver values.
  # Rules on config.model beyond the ranges config.py checks: each returns an error message or None. They see
  # hidden_size and num_heads already in range.
  model_rules: tuple[Callable[..., str | None], ...] = ()


KINDS = {
    # Classification: the class label's embedding is diffused; the image conditions.
    'vit': Kind('classification', 'vit:ViT', 'image', blockwise=False),
    'dblock': Kind('classification', 'dblock:DiffusionBlocksViT', 'image', blockwise=True,
                   noise_plans=('release', 'matched'), model_rules=(_time_embedding_width,)),
    # The same task on a convolutional stack (paper Table 6: NoProp's CNN), FiLM-conditioned on (z_t, σ).
    'cnn': Kind('classification', 'cnn:CNN', 'image', blockwise=False),
    'cnn_dblock': Kind('classification', 'cnn:DiffusionBlocksCNN', 'image', blockwise=True,
                       noise_plans=('release', 'matched')),
    # Class-conditional image generation: the image is diffused (EDM).
    'dit': Kind('generation', 'dit:DiT', 'image', blockwise=False, model_rules=(_sincos_positions,)),
    'dit_dblock': Kind('generation', 'dit:DiffusionBlocksDiT', 'image', blockwise=True,
                       model_rules=(_sincos_positions,)),
    # Language, masked diffusion: tokens are masked with probability t.
    'mdm': Kind('masked_lm', 'text:MaskedDiT', 'text', blockwise=False, model_rules=(_rotary_pairs,)),
    'mdm_dblock': Kind('masked_lm', 'text:DiffusionBlocksMaskedDiT', 'text', blockwise=True,
                       model_rules=(_rotary_pairs,)),
    # Language, autoregressive: the next token's embedding is diffused (the Block Diffusion mask).
    'ar': Kind('autoregressive', 'text:ARLM', 'text', blockwise=False, model_rules=(_rotary_pairs,)),
    'ar_dblock': Kind('autoregressive', 'text:DiffusionBlocksAR', 'text', blockwise=True,
                      noise_plans=('release', 'matched'), solvers=('euler', 'heun', 'ancestral'),
                      model_rules=(_rotary_pairs,)),
    # Language, recurrent depth (paper Table 5): a Huginn-style looped LM, and its DiffusionBlocks form with the
    # recurrent block weight-tied (models/recurrent.py; fields in config.model.recurrent).
    'rd': Kind('autoregressive', 'recurrent:RecurrentDepthLM', 'text', blockwise=False,
               model_rules=(_rotary_pairs, _recurrent_depth)),
    'rd_dblock': Kind('autoregressive', 'recurrent:RecurrentDiffusionBlocksAR', 'text', blockwise=True,
                      noise_plans=('release', 'matched'), solvers=('euler', 'heun', 'ancestral'),
                      model_rules=(_rotary_pairs, _recurrent_fields, _weight_tied_recurrence)),
}


def kind(name: str) -> Kind:
  """The registry entry of `config.model.kind`; an unknown name is a ValueError listing the kinds."""
  if name not in KINDS:
    raise ValueError(f'config.model.kind={name!r} is not one of {tuple(KINDS)}')
  return KINDS[name]


def kinds_where(predicate: Callable[[Kind], bool]) -> tuple[str, ...]:
  """Names of the kinds whose entry satisfies `predicate` (for messages that list them)."""
  return tuple(name for name, k in KINDS.items() if predicate(k))


def counterpart(name: str) -> str | None:
  """The kind of the same task and data whose `blockwise` differs ('vit' for 'dblock', 'dblock' for 'vit'),
  preferring the one built from the same model module ('cnn' for 'cnn_dblock'); None if there is none."""
  this = kind(name)
  others = [n for n, k in KINDS.items() if k.task == this.task and k.data == this.data
            and k.blockwise != this.blockwise]
  module = this.model.partition(':')[0]
  same_module = [n for n in others if KINDS[n].model.partition(':')[0] == module]
  return (same_module or others or [None])[0]


def task_module(name: str) -> ModuleType:
  """The task module of kind `name` (diffblocks_jax.tasks.<task>)."""
  return task_module_named(kind(name).task)


def task_module_named(task: str) -> ModuleType:
  """The module diffblocks_jax.tasks.<task>."""
  return importlib.import_module(f'diffblocks_jax.tasks.{task}')


def model_class(name: str) -> type:
  """The network class of kind `name`."""
  module, _, cls = kind(name).model.partition(':')
  return getattr(importlib.import_module(f'diffblocks_jax.models.{module}'), cls)
