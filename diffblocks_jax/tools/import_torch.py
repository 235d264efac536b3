"""Imports a checkpoint of the authors' PyTorch release (SPEC §9) as a checkpoint of this project.

  python -m diffblocks_jax.tools.import_torch --input=last.ckpt --config=configs/cifar100_dblock.py \
      --workdir=workdirs/imported

Reads a Lightning `.ckpt` (needs torch) or a `.safetensors` / `.npz` state dict (no torch), checks every
key against the parameter tree the config builds, and only then writes step 0 (fresh optimizer state)
under `WORKDIR/checkpoints`. Image size, channels and classes come from the state dict's shapes.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffblocks_jax import models
from diffblocks_jax.core import blocks, steps

PREFIX = 'model.'  # The LightningModule holds the network as `self.model`.
IGNORED = frozenset({'sigmas'})  # The noise-level buffer: recomputed from the config (SPEC §4).
POS, PATCH_W = 'vit.embeddings.position_embeddings', 'vit.embeddings.patch_embeddings.projection.weight'
CLASSIFIER_W, CLASSIFIER_B = 'classifier.weight', 'classifier.bias'
LABELS = 'vit.embeddings.label_embeddings.weight'

# Our module path (inside a layer, or outside the layers) → the release's module name.
_LAYER_MODULES = {
    ('attn', 'query'): 'attention.attention.query', ('attn', 'key'): 'attention.attention.key',
    ('attn', 'value'): 'attention.attention.value', ('attn', 'out'): 'attention.output.dense',
    ('mlp', 'fc1'): 'intermediate.dense', ('mlp', 'fc2'): 'output.dense',
    ('norm1',): 'layernorm_before', ('norm2',): 'layernorm_after', ('modulation',): 'adaLN_modulation.linear',
}
_OUTER_MODULES = {
    ('patch', 'proj'): 'vit.embeddings.patch_embeddings.projection', ('norm',): 'vit.layernorm',
    ('time_fc1',): 'vit.time_embedder.mlp.0', ('time_fc2',): 'vit.time_embedder.mlp.2',
    ('modulation',): 'adaLN_modulation.linear', ('head',): 'classifier',
}
_OUTER_ARRAYS = {'pos_embed': POS, 'cls_token': 'vit.embeddings.cls_token', 'label_embed': LABELS}
_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}


class CheckpointImportError(ValueError):
  """The file cannot become a checkpoint for this config; the message names every offending key."""


def load_state_dict(path: str, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """The raw state dict of a `.ckpt`/`.pt`/`.pth` (torch), `.safetensors` or `.npz` file, keys as stored."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--input={path}: no such file')
  suffix = os.path.splitext(path)[1].lower()
  if suffix == '.npz':
    return _load_npz(path)
  if suffix == '.safetensors':
    try:
      from safetensors.numpy import load_file
    except ImportError as e:
      raise CheckpointImportError(f'{path}: reading .safetensors needs `pip install safetensors`') from e
    return dict(load_file(path))
  if suffix in ('.ckpt', '.pt', '.pth'):
    return _load_torch(path, trust_pickle)
  raise CheckpointImportError(f'{path}: unknown format {suffix!r}; expected .ckpt, .pt, .pth, .safetensors '
                              'or .npz')


def _load_npz(path: str) -> dict[str, np.ndarray]:
  """Plain arrays only: an .npz must not run code. (The 'npz' data source reads its files the same way, in
  data/npz.py; this tool may not import the data layer.)"""
  if os.path.getsize(path) == 0:
    raise CheckpointImportError(f'--input={path} is empty (0 bytes): an interrupted copy or save? Copy it again')
  with open(path, 'rb') as f:
    head = f.read(4)
  if head not in (b'PK\x03\x04', b'PK\x05\x06'):  # A zip's signatures; NumPy would call anything else pickled.
    raise CheckpointImportError(f'--input={path} is not a .npz (a zip of .npy arrays as np.savez writes): it '
                                f'starts with {head!r}')
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {}
      for key in f.files:
        try:
          arrays[key] = f[key]
        except ValueError as e:
          if 'allow_pickle' not in str(e):  # Not NumPy's refusal of an object array: damage, reported below.
            raise
          raise CheckpointImportError(
              f'--input={path}: {key!r} holds pickled Python objects, which are refused (unpickling can run '
              'code); save the state dict as plain arrays: np.savez(path, **{k: v.float().numpy() ...})') from e
      return arrays
  except CheckpointImportError:
    raise
  except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as e:  # Truncated, or not a zip.
    raise CheckpointImportError(f'--input={path} is not a readable .npz ({type(e).__name__}: {e}); it must be a '
                                'zip of .npy arrays as np.savez writes; copy or convert it again') from e


def _load_torch(path: str, trust_pickle: bool) -> dict[str, np.ndarray]:
  try:
    import torch  # Optional (the `torch` extra): only Lightning checkpoints need it.
  except ImportError as e:
    raise CheckpointImportError(
        f'{path} is a PyTorch checkpoint and reading it needs torch (`pip install torch`). Or convert it '
        'once where torch is installed and import the result:\n  python -c "import torch, numpy as np; '
        f"sd = torch.load('{path}', map_location='cpu', weights_only=False)['state_dict']; "
        f"np.savez('{os.path.splitext(path)[0]}.npz', **{{k: v.float().numpy() for k, v in sd.items()}})\"") from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=not trust_pickle)
  except Exception as e:  # torch raises an UnpicklingError subclass that varies across versions.
    if trust_pickle:
      raise
    raise CheckpointImportError(
        f'{path} holds Python objects besides tensors (e.g. Lightning hyper-parameters); unpickling them can '
        'run code. Pass --trust_pickle if you trust the file.') from e
  state_dict = obj.get('state_dict', obj) if isinstance(obj, dict) else obj
  return {k: v.detach().float().cpu().numpy() for k, v in state_dict.items() if torch.is_tensor(v)}


def _normalize(state_dict: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
  """Keys without the `model.` prefix and without ignored buffers; also the original names, duplicates."""
  arrays, original, duplicates = {}, {}, []
  for key, value in state_dict.items():
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    if name in IGNORED:
      continue
    if name in arrays:
      duplicates.append(f'{original[name]} and {key} are the same parameter')
    arrays[name], original[name] = np.asarray(value), key
  return arrays, original, duplicates


def _infer_dims(sd, config, expect: dict[str, int | None]) -> tuple[dict[str, int], list[str]]:
  """Image size, channels and classes as the shapes say, unless asked for explicitly.

  An explicit value that disagrees is used as is: the keys carrying it are then reported mis-shaped, with
  both shapes. A dimension no key carries (all missing or malformed) gets a placeholder: they are reported.
  """
  patch, found, errors = config.model.patch_size, {}, []
  if PATCH_W in sd and sd[PATCH_W].ndim == 4:
    found['channels'] = sd[PATCH_W].shape[1]
    patch = sd[PATCH_W].shape[-1]  # The checkpoint's own: a config mismatch is reported on PATCH_W.
  if POS in sd and sd[POS].ndim == 3:
    side = math.isqrt(max(sd[POS].shape[1] - 1, 0))
    if side * side != sd[POS].shape[1] - 1:
      errors.append(f'{PREFIX}{POS} has shape {sd[POS].shape}: {sd[POS].shape[1] - 1} patches is not a square')
    found['image_size'] = side * patch
  for key in (CLASSIFIER_W, CLASSIFIER_B, LABELS):
    if key in sd and sd[key].ndim >= 1:
      found['num_classes'] = sd[key].shape[0]
      break
  dims = {name: expect.get(name) or found.get(name) or 1 for name in ('image_size', 'channels', 'num_classes')}
  return dims, errors


def _target(config, dims: dict[str, int]):
  """Shapes and structure of `models.split`'s pure param dict for this config, without allocating it."""
  model = nnx.eval_shape(lambda: models.build(config.model, **dims))
  return models.split(model)[1]


def _release_key(path: tuple, layer_offsets: list[int]) -> str:
  """The release's key (without `model.`) of one of our parameters, given as a path of dict keys."""
  if path[0] == 'blocks':  # DiffusionBlocks: block b's layer j is the release's layer offset_b + j.
    block, rest = path[1], path[2:]
    if rest[0] == 'layers':
      return f'vit.encoder.layer.{layer_offsets[block] + rest[1]}.' + _module_key(rest[2:], _LAYER_MODULES)
    return _release_key(rest[1:], layer_offsets)  # An independent block's copy of the shared parts.
  if path[0] == 'shared':
    return _release_key(path[1:], layer_offsets)
  if path[0] == 'layers':  # Baseline.
    return f'vit.encoder.layer.{path[1]}.' + _module_key(path[2:], _LAYER_MODULES)
  if len(path) == 1 and path[0] in _OUTER_ARRAYS:
    return _OUTER_ARRAYS[path[0]]
  return _module_key(path, _OUTER_MODULES)


def _module_key(path: tuple, table: dict) -> str:
  if tuple(path[:-1]) not in table or path[-1] not in _LEAVES:
    raise KeyError(f'no release key is known for our parameter {path}')  # The model grew a parameter.
  return f'{table[tuple(path[:-1])]}.{_LEAVES[path[-1]]}'


def _release_shape(shape: tuple, leaf: str) -> tuple:
  """PyTorch layout of one of our shapes: Linear (out, in); Conv (out, in, kh, kw)."""
  if leaf == 'kernel' and len(shape) == 2:
    return shape[::-1]
  if leaf == 'kernel' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def _to_flax(array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == 'kernel' and array.ndim == 2:
    return array.T
  if leaf == 'kernel' and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)  # (out, in, kh, kw) → (kh, kw, in, out).
  return array


def _names(path) -> tuple:
  return tuple(p.key for p in path)


def convert(state_dict: dict[str, np.ndarray], config, *, image_size: int | None = None,
            channels: int | None = None, num_classes: int | None = None, source: str = 'state dict'):
  """The release's state dict as our params (a pure dict exactly like `models.split`'s, float32).

  Raises CheckpointImportError naming every missing, unexpected and mis-shaped key at once.
  """
  if config.model.kind == 'dblock' and config.model.label_token != 'replace':
    raise CheckpointImportError("the release's label token replaces CLS: set config.model.label_token='replace'")
  if config.model.get('weight_tied'):
    raise CheckpointImportError("the release's blocks are untied: set config.model.weight_tied=False")
  sd, original, errors = _normalize(state_dict)
  dims, dim_errors = _infer_dims(sd, config, dict(image_size=image_size, channels=channels,
                                                  num_classes=num_classes))
  target = _target(config, dims)
  stacked = 'blocks' in target and blocks.is_stacked(target['blocks'])
  target = blocks.unstack(target)  # The release's layers map block by block; restacked at the end.
  offsets = [0]
  if config.model.kind == 'dblock':
    counts = models.partition_layers(config.model.num_layers, config.model.num_blocks,
                                     config.model.layers_per_block)
    offsets = np.cumsum([0] + counts[:-1]).tolist()  # The release's layer i is in block i // (L/B).
  expected = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    names = _names(path)
    expected[_release_key(names, offsets)] = _release_shape(leaf.shape, names[-1])
  missing = [f'{PREFIX}{k} {v}' for k, v in expected.items() if k not in sd]
  unexpected = [f'{original[k]} {sd[k].shape}' for k in sd if k not in expected]
  misshaped = [f'{original[k]}: checkpoint {sd[k].shape}, expected {v}' for k, v in expected.items()
               if k in sd and sd[k].shape != v]
  errors += dim_errors
  # A NaN or inf weight would import fine and poison every forward pass: refuse it by key.
  errors += [f'non-finite: {original[k]} has {n} NaN/inf of {sd[k].size} values'
             for k in expected if k in sd and (n := int(np.size(sd[k]) - np.isfinite(sd[k]).sum()))]
  if missing or unexpected or misshaped or errors:
    raise CheckpointImportError(_report(source, config, missing, unexpected, misshaped, errors, sd))

  def fill(path, leaf):
    names = _names(path)
    return jnp.asarray(_to_flax(sd[_release_key(names, offsets)], names[-1]), jnp.float32)

  params = jax.tree_util.tree_map_with_path(fill, target)
  return blocks.restack(params) if stacked else params


def _report(source, config, missing, unexpected, misshaped, errors, sd) -> str:
  m = config.model
  lines = [f'cannot import {source} for config.model.kind={m.kind!r} (num_layers={m.num_layers}, '
           f'hidden_size={m.hidden_size}, mlp_dim={m.mlp_dim}, patch_size={m.patch_size}): '
           f'{len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped key(s)']
  if m.kind == 'vit' and 'vit.time_embedder.mlp.0.weight' in sd:
    lines.append('hint: this is a DiffusionBlocks checkpoint; set --config.model.kind=dblock')
  if m.kind == 'dblock' and 'vit.embeddings.cls_token' in sd:
    lines.append('hint: this is a baseline ViT checkpoint; set --config.model.kind=vit')
  lines += errors
  lines += [f'missing: {k}' for k in missing] + [f'unexpected: {k}' for k in unexpected]
  lines += [f'mis-shaped: {k}' for k in misshaped]
  return '\n  '.join(lines)


def import_checkpoint(input_path: str, config, workdir: str, *, trust_pickle: bool = False,
                      image_size: int | None = None, channels: int | None = None,
                      num_classes: int | None = None) -> int:
  """Converts `input_path` and saves it as step 0 of `workdir`; returns the step written."""
  state_dict = load_state_dict(input_path, trust_pickle=trust_pickle)
  params = convert(state_dict, config, image_size=image_size, channels=channels, num_classes=num_classes,
                   source=input_path)
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  from diffblocks_jax.training import checkpointing  # Lazy: `convert` works without the saving machinery.
  state = steps.init_state(params, config.seed)
  # The data shapes the import was built for: a run resuming it must use a dataset of these shapes.
  dims = _infer_dims(_normalize(state_dict)[0], config, {})[0]
  metadata = {'imported_from': os.path.abspath(input_path), **dims}
  ckpt = checkpointing.Checkpointer(directory, keep=config.train.keep_checkpoints)
  try:
    # Finished steps only: a later one would win on resume and silently hide the import. The unfinished
    # (*.orbax-checkpoint-tmp) folder of a killed import is not one; Orbax replaces it with this save.
    if ckpt.all_steps():
      raise CheckpointImportError(f'{directory} already holds checkpoints (steps {ckpt.all_steps()}); import '
                                  'into an empty --workdir')
    ckpt.save(0, state, metadata=metadata, force=True)
    ckpt.wait()
  finally:
    ckpt.close()
  return int(state.step)


def _cli() -> None:
  """Flags are defined only when run as a script: `main.py` owns --config/--workdir in its process."""
  from absl import app, flags
  from ml_collections import config_flags

  from diffblocks_jax import config as config_lib

  config_flag = config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  input_flag = flags.DEFINE_string('input', None, 'Release checkpoint: .ckpt (needs torch), .safetensors, .npz.')
  workdir_flag = flags.DEFINE_string('workdir', None, 'Empty directory; the import is saved as its step 0.')
  trust_flag = flags.DEFINE_bool('trust_pickle', False, 'Unpickle non-tensor objects of a .ckpt (runs code).')
  dim_flags = {name: flags.DEFINE_integer(name, 0, f'Expected {name} (0 = whatever the file holds).')
               for name in ('image_size', 'channels', 'num_classes')}
  flags.mark_flags_as_required(['config', 'input', 'workdir'])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    config_lib.validate(config_flag.value)
    step = import_checkpoint(input_flag.value, config_flag.value, workdir_flag.value,
                             trust_pickle=trust_flag.value, **{k: f.value or None for k, f in dim_flags.items()})
    print(f'Imported {input_flag.value} as step {step} of {os.path.join(workdir_flag.value, "checkpoints")}')

  app.run(main)


if __name__ == '__main__':
  _cli()
