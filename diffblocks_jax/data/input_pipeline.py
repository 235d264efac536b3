"""Input pipeline: whole splits as uint8 NumPy on the host, augmentation jitted and vectorised on the device.

The datasets fit in device memory (CIFAR-100 is 150 MB as uint8), so the host loads each split once and the
training step gathers, augments and normalises its batch on the device: the accelerator never waits on Python.

Sources (`config.data.source`): 'tfds' (any TFDS image-classification dataset), 'digits' (scikit-learn's
bundled 8x8 digits, offline), 'npz' (x_train/y_train/x_test/y_test) and 'folder' (train/<class>/* with
val/<class>/* or Tiny-ImageNet's val/images + val_annotations.txt). Every problem raises `DataError`, whose
message names the bad input and what to do about it.
"""

from __future__ import annotations

import os
import pathlib

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from diffblocks_jax.data import crops
from diffblocks_jax.data.dataset import DataError, Dataset

SOURCES = ('tfds', 'digits', 'npz', 'folder')
_NPZ_KEYS = ('x_train', 'y_train', 'x_test', 'y_test')
_TFDS_CHUNK = 1024  # Examples per batched read from a TFDS data source.


def load_dataset(data_config, *, process_index: int = 0, process_count: int = 1) -> Dataset:
  """Loads both splits; each process keeps its contiguous 1/process_count of TRAIN (test stays whole).

  Shards are equal-sized (the last `N % process_count` examples are dropped) so that every process runs the
  same number of steps per epoch; unequal counts would deadlock the collectives of a multi-host run.
  """
  if data_config.source not in SOURCES:
    raise DataError(f'config.data.source={data_config.source!r} is not one of {SOURCES}')
  if data_config.source == 'folder' and data_config.on_corrupt not in ('error', 'skip'):
    raise DataError(f"config.data.on_corrupt={data_config.on_corrupt!r} is not one of ('error', 'skip')")
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index={process_index} is outside [0, process_count={process_count})')
  shard = (process_index, process_count)
  loader = {'tfds': _load_tfds, 'digits': _load_digits, 'npz': _load_npz, 'folder': _load_folder}
  data = loader[data_config.source](data_config, shard)
  _check_normalisation(data_config, data.channels)
  logging.info('Loaded %s: train %s (process %d of %d), test %s, %d classes.', data.name,
               data.train_images.shape, process_index, process_count, data.test_images.shape, data.num_classes)
  return data


def _shard_bounds(n: int, shard: tuple[int, int]) -> tuple[int, int]:
  index, count = shard
  per_process = n // count
  if per_process < 1:
    raise DataError(f'{n} training examples cannot be split over {count} processes')
  if count > 1 and n % count:
    logging.warning('Dropping the last %d training examples so that %d processes get %d each.',
                    n % count, count, per_process)
  return index * per_process, (index + 1) * per_process


def _sharded(images: np.ndarray, labels: np.ndarray, shard: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  if shard[1] == 1:
    return images, labels
  start, stop = _shard_bounds(len(labels), shard)
  return images[start:stop].copy(), labels[start:stop].copy()  # Copies free the full arrays.


def _check_normalisation(data_config, channels: int) -> None:
  for field in ('mean', 'std'):
    values = tuple(data_config[field])
    if len(values) not in (1, channels):
      raise DataError(f'config.data.{field}={values} has {len(values)} entries for {channels}-channel images; '
                      f'give 1 or {channels}')
  if min(data_config.std) <= 0:
    raise DataError(f'config.data.std={tuple(data_config.std)} must be positive')


# ---------------------------------------------------------------------------------------------------- tfds

def _load_tfds(data_config, shard) -> Dataset:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy; only this source needs it)
  builder, num_classes = _tfds_builder(tfds, data_config)
  if not builder.is_prepared():
    _prepare_tfds(builder, data_config)
  splits = [data_config.train_split, data_config.test_split]
  for field, split in zip(('train_split', 'test_split'), splits):
    try:
      if builder.info.splits:  # Empty under tfds.testing.mock_data: nothing to check against.
        _ = builder.info.splits[split]  # Parses slices too ('train[:90%]').
    except (KeyError, ValueError) as e:
      raise DataError(f'config.data.{field}={split!r} is not a split of {data_config.name}: {e}') from e
  label_key, name = data_config.label_key, data_config.name
  try:
    train_source, test_source = builder.as_data_source(split=splits)
  except NotImplementedError:  # Prepared as tfrecord: no random access, read it through TensorFlow.
    train, test = (_read_tfds_tensorflow(tfds, builder, split, label_key) for split in splits)
    return Dataset(*_sharded(*train, shard), *test, num_classes, name)
  train = _read_source(train_source, *_shard_bounds(len(train_source), shard), label_key)
  test = _read_source(test_source, 0, len(test_source), label_key)
  return Dataset(*train, *test, num_classes, name)


def _tfds_builder(tfds, data_config):
  """The builder and its number of classes, with the features checked before anything is read."""
  name, label_key = data_config.name, data_config.label_key
  try:
    builder = tfds.builder(name, data_dir=data_config.tfds_data_dir or None)
  except tfds.core.DatasetNotFoundError as e:
    first_line = str(e).splitlines()[0]  # The rest lists every TFDS dataset.
    raise DataError(f'config.data.name={name!r} is not a TFDS dataset ({first_line}); see '
                    'tfds.list_builders(), or set --config.data.tfds_data_dir to where it is prepared') from e
  features = builder.info.features
  if 'image' not in features:
    raise DataError(f'config.data.name={name!r} has no image feature; its features are {sorted(features)}')
  num_classes = getattr(features[label_key], 'num_classes', None) if label_key in features else None
  if not num_classes:
    raise DataError(f'config.data.label_key={label_key!r} is not a class label of {name}; its features are '
                    f'{sorted(features)}')
  if isinstance(features['image'].shape[-1], int):  # Fail before a long read when mean/std cannot fit.
    _check_normalisation(data_config, features['image'].shape[-1])
  return builder, num_classes


def _prepare_tfds(builder, data_config) -> None:
  """Downloads and prepares the data (needs internet), or says exactly how to provide it."""
  name, where = data_config.name, builder.data_dir
  reason = 'download disabled by config.data.tfds_download=False'
  if data_config.get('tfds_download', True):
    logging.info('TFDS %s is not prepared in %s; trying download_and_prepare.', name, where)
    try:
      builder.download_and_prepare(file_format='array_record')
      return
    except Exception as e:  # pylint: disable=broad-except  (network and preparation fail in many ways)
      reason = f'download_and_prepare failed: {type(e).__name__}: {e}'
  data_dir = data_config.tfds_data_dir or '~/tensorflow_datasets'
  raise DataError(
      f'TFDS dataset {name!r} is not prepared in {where} ({reason}). Either:\n'
      f'  1. on a machine with internet, run\n'
      f'       python -c "import tensorflow_datasets as tfds; tfds.builder({name!r}, data_dir=\'{data_dir}\')'
      f'.download_and_prepare(file_format=\'array_record\')"\n'
      f'     then copy {data_dir} here and pass --config.data.tfds_data_dir=<that folder>;\n'
      f'  2. point --config.data.tfds_data_dir at a folder that already holds the prepared data; or\n'
      f'  3. try configs/digits_dblock.py, which needs no download.')


def _read_source(source, start: int, stop: int, label_key: str) -> tuple[np.ndarray, np.ndarray]:
  """Batched random-access reads of examples [start, stop) into one uint8 array."""
  images, labels = [], []
  for lo in range(start, stop, _TFDS_CHUNK):
    keys = list(range(lo, min(lo + _TFDS_CHUNK, stop)))
    try:
      examples = source.__getitems__(keys)
    except TypeError:  # tfds.testing.mock_data's data source breaks the batched read; read one by one.
      examples = [source[k] for k in keys]
    try:
      images.append(np.stack([ex['image'] for ex in examples]).astype(np.uint8, copy=False))
    except ValueError as e:
      raise DataError(f'{source}: images differ in size ({e}); only one-size datasets can be stacked') from e
    labels.append(np.asarray([ex[label_key] for ex in examples]))
  return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def _read_tfds_tensorflow(tfds, builder, split: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
  try:
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  except ImportError as e:
    raise DataError(f'{builder.data_dir} holds tfrecord files, which need TensorFlow to read: install '
                    f"tensorflow-cpu, or re-prepare the data with file_format='array_record'") from e
  return data['image'].astype(np.uint8, copy=False), data[label_key].astype(np.int32)


# -------------------------------------------------------------------------------------------------- digits

def _load_digits(data_config, shard) -> Dataset:
  """scikit-learn's 1,797 bundled 8x8 digits; a stratified, seeded 80/20 split (360 test images)."""
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
  _check_normalisation(data_config, 1)
  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # 0..16 -> 0..255
  labels = digits.target.astype(np.int32)
  train_idx, test_idx = model_selection.train_test_split(
      np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=data_config.get('split_seed', 0))
  train = _sharded(images[train_idx], labels[train_idx], shard)
  return Dataset(*train, images[test_idx], labels[test_idx], 10, 'digits')


# ----------------------------------------------------------------------------------------------------- npz

def _load_npz(data_config, shard) -> Dataset:
  path = data_config.path
  if not path or not os.path.isfile(path):
    raise DataError(f'config.data.path={path!r} is not a file; give a .npz with keys {_NPZ_KEYS}')
  try:
    with np.load(path, allow_pickle=False) as f:
      missing = [key for key in _NPZ_KEYS if key not in f.files]
      if missing:
        raise DataError(f'{path} lacks {missing} (it has {sorted(f.files)}); it needs {_NPZ_KEYS}')
      arrays = {key: _npz_array(f, key, path) for key in _NPZ_KEYS}
  except DataError:
    raise
  except (OSError, ValueError) as e:  # Not a zip, truncated, or object arrays (pickles are refused).
    raise DataError(f'config.data.path={path!r} is not a readable .npz: {e}') from e
  for split in ('train', 'test'):
    x, y = arrays[f'x_{split}'], arrays[f'y_{split}']
    if len(x) != len(y):
      raise DataError(f'{path}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels')
  num_classes = int(max(arrays['y_train'].max(initial=0), arrays['y_test'].max(initial=0))) + 1
  train = _sharded(arrays['x_train'], arrays['y_train'], shard)
  return Dataset(*train, arrays['x_test'], arrays['y_test'], num_classes, pathlib.Path(path).stem)


def _npz_array(f, key: str, path: str) -> np.ndarray:
  a = f[key]
  if key.startswith('x'):
    if a.dtype != np.uint8 or a.ndim not in (3, 4):
      raise DataError(f'{path}: {key} is {a.dtype} {a.shape}; it must be uint8 (N, H, W) or (N, H, W, C) '
                      'with values 0..255 (e.g. (x * 255).round().astype(np.uint8))')
    return a[..., None] if a.ndim == 3 else a
  if not np.issubdtype(a.dtype, np.integer) or a.ndim != 1:
    raise DataError(f'{path}: {key} is {a.dtype} {a.shape}; it must be integer class indices of shape (N,)')
  if a.size and a.min() < 0:
    raise DataError(f'{path}: {key} has negative labels (min {a.min()}); classes are 0..num_classes-1')
  return a.astype(np.int32)


# -------------------------------------------------------------------------------------------------- folder

def _load_folder(data_config, shard) -> Dataset:
  from diffblocks_jax.data import image_folder  # pylint: disable=g-import-not-at-top  (Pillow: folder source only)
  train_images, train_labels, test_images, test_labels, classes = image_folder.load(data_config)
  train_images, train_labels = _sharded(train_images, train_labels, shard)
  return Dataset(train_images, train_labels, test_images, test_labels, len(classes),
                 pathlib.Path(data_config.path).name)


# ------------------------------------------------------------------------------------------- augmentation

def augment(key: jax.Array, images_uint8: jax.Array, data_config) -> jax.Array:
  """Random crop (zero padding, or resized as torchvision's RandomResizedCrop), horizontal flip, optional
  RandAugment, then normalisation; jittable. Each image draws its own crop, flip and RandAugment ops.

  Returns float32 NHWC. The order is the release's: crop, flip, RandAugment, normalise.
  """
  crop_key, flip_key, randaugment_key = jax.random.split(key, 3)
  images = images_uint8
  if data_config.get('random_resized_crop', False):
    images = crops.random_resized_crop(crop_key, images, tuple(data_config.resized_crop_scale),
                                       tuple(data_config.resized_crop_ratio))
  elif data_config.pad_crop:
    images = crops.random_pad_crop(crop_key, images, data_config.pad_crop)
  if data_config.flip:
    flip = jax.random.bernoulli(flip_key, 0.5, (images.shape[0], 1, 1, 1))
    images = jnp.where(flip, images[:, :, ::-1], images)
  if data_config.randaugment:
    from diffblocks_jax.data import randaugment  # pylint: disable=g-import-not-at-top
    images = randaugment.randaugment(randaugment_key, images, num_ops=data_config.randaugment_num_ops,
                                     magnitude=data_config.randaugment_magnitude)
  return normalize(images, data_config)


def normalize(images_uint8: jax.Array, data_config) -> jax.Array:
  """uint8 -> float32 in [0, 1] -> (x - mean) / std per channel (a single entry serves every channel)."""
  channels = images_uint8.shape[-1]
  _check_normalisation(data_config, channels)
  mean = jnp.broadcast_to(jnp.asarray(data_config.mean, jnp.float32), (channels,))
  std = jnp.broadcast_to(jnp.asarray(data_config.std, jnp.float32), (channels,))
  return (images_uint8.astype(jnp.float32) / 255.0 - mean) / std
