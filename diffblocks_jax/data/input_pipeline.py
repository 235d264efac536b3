"""Input pipeline: whole splits as uint8 NumPy on the host, augmentation jitted and vectorised on the device.

The datasets fit in device memory (CIFAR-100 is 150 MB as uint8), so the host loads each split once and the
training step gathers, augments and normalises its batch on the device: the accelerator never waits on Python.

Sources (`config.data.source`): 'tfds' (any TFDS image-classification dataset), 'digits' (scikit-learn's
bundled 8x8 digits, offline), 'npz' (x_train/y_train/x_test/y_test, and optionally num_classes to state the
count) and 'folder' (train/<class>/* with val/<class>/* or Tiny-ImageNet's val/images + val_annotations.txt).
Every problem raises `DataError`, whose message names the bad input and what to do about it.
"""

from __future__ import annotations

import os
import pathlib

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from diffblocks_jax.data import crops, npz, tfds_preparation
from diffblocks_jax.data.dataset import DataError, Dataset
from diffblocks_jax.tasks import registry
_NPZ_KEYS = ('x_train', 'y_train', 'x_test', 'y_test')
_TFDS_CHUNK = 1024  # Examples per batched read from a TFDS data source.


def load_dataset(data_config, *, process_index: int = 0, process_count: int = 1):
  """Loads both splits; each process keeps its contiguous 1/process_count of TRAIN (test stays whole).

  Images give a `Dataset`; the text sources a `text.TextDataset` (token windows).

  Shards are equal-sized (the last `N % process_count` examples are dropped) so that every process runs the
  same number of steps per epoch; unequal counts would deadlock the collectives of a multi-host run.
  """
  family = registry.SOURCES.get(data_config.source)
  if family is None:
    raise DataError(f'config.data.source={data_config.source!r} is not one of {tuple(registry.SOURCES)}')
  if family == 'text':
    from diffblocks_jax.data import text  # pylint: disable=g-import-not-at-top
    return text.load_text(data_config, process_index=process_index, process_count=process_count)
  if data_config.source == 'folder' and data_config.on_corrupt not in ('error', 'skip'):
    raise DataError(f"config.data.on_corrupt={data_config.on_corrupt!r} is not one of ('error', 'skip')")
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index={process_index} is outside [0, process_count={process_count})')
  shard = (process_index, process_count)
  loader = {'tfds': _load_tfds, 'digits': _load_digits, 'npz': _load_npz, 'folder': _load_folder}
  data = loader[data_config.source](data_config, shard)
  _check_normalisation(data_config, data.channels)
  logging.debug('Loaded %s: train %s (process %d of %d), test %s, %d classes.', data.name,
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
    tfds_preparation.prepare(builder, data_config)
  splits = _tfds_splits(builder, data_config)
  tfds_preparation.check_splits(builder, splits, data_config.name)
  label_key, name = data_config.label_key, data_config.name
  try:
    train_source, test_source = builder.as_data_source(split=splits)
  except NotImplementedError:  # Prepared as tfrecord: no random access, read it through TensorFlow.
    train, test = (_read_tfds_tensorflow(tfds, builder, split, label_key) for split in splits)
    return Dataset(*_sharded(*train, shard), *test, num_classes, name)
  train = _read_source(train_source, *_shard_bounds(len(train_source), shard), label_key)
  test = _read_source(test_source, 0, len(test_source), label_key)
  return Dataset(*train, *test, num_classes, name)


def _tfds_splits(builder, data_config) -> list[str]:
  """[train, test]; with `data.validation_fraction`, the train split's first share becomes the test split
  (a slice: TFDS shuffles CIFAR's train split once, so its head is a fair sample) and the rest trains."""
  train, fraction = data_config.train_split, data_config.validation_fraction
  if not fraction:
    return [train, data_config.test_split]
  if '[' in train:
    raise DataError(f'config.data.validation_fraction={fraction} carves its own slice of '
                    f'config.data.train_split={train!r}; give a whole split')
  if builder.info.splits and train in builder.info.splits:
    k = max(1, round(fraction * builder.info.splits[train].num_examples))
    return [f'{train}[{k}:]', f'{train}[:{k}]']
  percent = max(1, round(100 * fraction))  # Split sizes unknown (mock data): whole percents.
  return [f'{train}[{percent}%:]', f'{train}[:{percent}%]']


def _tfds_builder(tfds, data_config):
  """The builder and its number of classes, with the features checked before anything is read."""
  name, label_key = data_config.name, data_config.label_key
  builder = tfds_preparation.open_builder(tfds, data_config)
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
      np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=data_config.split_seed)
  if data_config.validation_fraction:  # The 360 test images stay unread from here on.
    train_idx, test_idx = validation_split(labels[train_idx], data_config, indices=train_idx)
  train = _sharded(images[train_idx], labels[train_idx], shard)
  name = 'digits (validation)' if data_config.validation_fraction else 'digits'
  return Dataset(*train, images[test_idx], labels[test_idx], 10, name)


def validation_split(labels: np.ndarray, data_config, *, indices: np.ndarray | None = None):
  """(train, validation) positions of a training split: a stratified share `data.validation_fraction`,
  seeded by `data.split_seed`, so that settings are chosen without the test split. `indices` maps them."""
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  fraction = float(data_config.validation_fraction)
  if not 0 < fraction < 1:
    raise DataError(f'config.data.validation_fraction={fraction} must lie in (0, 1) to carve a validation split')
  counts = np.bincount(labels)
  stratify = labels if counts[counts > 0].min() >= 2 else None  # A class of one example cannot be split.
  try:
    train, validation = model_selection.train_test_split(
        np.arange(len(labels)), test_size=fraction, stratify=stratify,
        random_state=data_config.split_seed)
  except ValueError as e:
    raise DataError(f'config.data.validation_fraction={fraction} cannot split {len(labels)} training '
                    f'examples: {e}') from e
  if indices is not None:
    train, validation = indices[train], indices[validation]
  return np.sort(train), np.sort(validation)


# ----------------------------------------------------------------------------------------------------- npz

def _load_npz(data_config, shard) -> Dataset:
  path = data_config.path
  if not path or not os.path.isfile(path):
    raise DataError(f'config.data.path={path!r} is not a file; give a .npz with keys {_NPZ_KEYS}')
  where = f'config.data.path={path!r}'
  stored = npz.read(path, error=DataError, what=where)
  missing = [key for key in _NPZ_KEYS if key not in stored]
  if missing:
    raise DataError(f'{where} lacks {missing} (it has {sorted(stored)}); it needs {_NPZ_KEYS}')
  arrays = {key: _npz_array(stored[key], key, path) for key in _NPZ_KEYS}
  if data_config.validation_fraction:  # Evaluate on a share of train; x_test/y_test go unused.
    train_idx, val_idx = validation_split(arrays['y_train'], data_config)
    x, y = arrays['x_train'], arrays['y_train']
    arrays.update(x_train=x[train_idx], y_train=y[train_idx], x_test=x[val_idx], y_test=y[val_idx])
  for split in ('train', 'test'):
    x, y = arrays[f'x_{split}'], arrays[f'y_{split}']
    if not len(x):
      raise DataError(f'{where}: x_{split} has no images; the {split} split needs examples')
    if len(x) != len(y):
      raise DataError(f'{path}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels')
  num_classes = _npz_num_classes(stored.get('num_classes'), arrays['y_train'], arrays['y_test'], path)
  train = _sharded(arrays['x_train'], arrays['y_train'], shard)
  return Dataset(*train, arrays['x_test'], arrays['y_test'], num_classes, pathlib.Path(path).stem)


def _npz_num_classes(declared, train_labels: np.ndarray, test_labels: np.ndarray, path: str) -> int:
  """The file's `num_classes` if it has one, else 1 + the largest training label; every class must have a
  training example, and every label, test labels included, must be a class.

  A stray label (a 10 among 0..9, 1-based labels) would otherwise add a class that is never trained.
  """
  if declared is not None:
    if declared.ndim or not np.issubdtype(declared.dtype, np.integer) or declared < 1:
      raise DataError(f'{path}: num_classes is {declared.dtype} {declared.shape} = {declared}; it must be one '
                      'positive integer, e.g. np.savez(..., num_classes=10)')
    num_classes, source = int(declared), f'num_classes={int(declared)}'
  else:
    num_classes, source = int(train_labels.max()) + 1, 'y_train (no num_classes key: 1 + its largest label)'
    logging.info('%s: %d classes, from the largest training label (store num_classes to state the count).',
                 path, num_classes)
  for split, labels in (('train', train_labels), ('test', test_labels)):
    if labels.size and labels.max() >= num_classes:
      stray = sorted(set(labels[labels >= num_classes].tolist()))
      raise DataError(f'{path}: y_{split} has label(s) {stray[:10]}, outside the {num_classes} classes 0..'
                      f'{num_classes - 1} that {source} gives; fix the labels (1-based? subtract 1)')
  absent = np.flatnonzero(np.bincount(train_labels, minlength=num_classes) == 0)
  if absent.size:
    raise DataError(f'{path}: y_train has no example of class(es) {absent[:10].tolist()}'
                    f'{" ..." if absent.size > 10 else ""} of the {num_classes} classes that {source} gives; '
                    'every class needs training examples (labels 0..C-1; 1-based labels? subtract 1)')
  return num_classes


def _npz_array(a: np.ndarray, key: str, path: str) -> np.ndarray:
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
  if data_config.random_resized_crop:
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
