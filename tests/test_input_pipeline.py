"""Input pipeline: every source on small local data, the errors' messages, sharding and on-device augmentation."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffblocks_jax.data import input_pipeline as ip
from diffblocks_jax.data.dataset import DataError
from helpers import HANG_GUARD_S, ROOT, tiny_config


def _data_config(**fields):
  """The data section of a tiny CIFAR-100 config (from TFDS, which TFDS's mock data serves here), `fields` set."""
  return tiny_config(data='cifar', **{f'data__{k}': v for k, v in fields.items()}).data


# ------------------------------------------------------------------------------------------------------ tfds

def test_tfds_mock_reads_through_data_source_without_tensorflow():
  # A subprocess, so that TensorFlow imported by another test cannot hide an import here.
  code = """
import sys
import tensorflow_datasets as tfds
from diffblocks_jax import config
from diffblocks_jax.data import input_pipeline
d = config.get_base_config().data
d.name = 'cifar100'
with tfds.testing.mock_data(num_examples=12):
  data = input_pipeline.load_dataset(d, process_index=1, process_count=2)
assert data.train_images.shape == (6, 32, 32, 3), data.train_images.shape  # Half of 12.
assert data.train_images.dtype.name == 'uint8'
assert data.test_images.shape == (12, 32, 32, 3), data.test_images.shape
assert data.num_classes == 100 and data.image_size == 32 and data.channels == 3
for labels in (data.train_labels, data.test_labels):
  assert labels.dtype.name == 'int32' and labels.min() >= 0 and labels.max() < 100
assert 'tensorflow' not in sys.modules, 'the data_source path imported TensorFlow'
"""
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert result.returncode == 0, result.stderr[-3000:]


_PREPARED_CODE = """
import sys
import numpy as np
import tensorflow_datasets as tfds
from diffblocks_jax import config
from diffblocks_jax.data import input_pipeline

class FakeImages(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version('1.0.0')
  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(6, 6, 3)), 'label': tfds.features.ClassLabel(num_classes=7)}))
  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(50, 0), 'test': self._generate_examples(9, 1)}
  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      yield i, {'image': rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), 'label': i % 7}

d = config.get_base_config().data
d.name = 'fake_images'
loaded = []
for fmt in ('array_record', 'tfrecord'):
  d.tfds_data_dir = f'{sys.argv[1]}/{fmt}'
  tfds.builder('fake_images', data_dir=d.tfds_data_dir).download_and_prepare(file_format=fmt)
  full = input_pipeline.load_dataset(d)
  assert full.train_images.shape == (50, 6, 6, 3) and full.test_images.shape == (9, 6, 6, 3), fmt
  assert full.num_classes == 7 and full.train_labels.dtype == np.int32, fmt
  shards = [input_pipeline.load_dataset(d, process_index=i, process_count=3) for i in range(3)]
  np.testing.assert_array_equal(np.concatenate([s.train_images for s in shards]), full.train_images[:48])
  loaded.append(full)
np.testing.assert_array_equal(loaded[0].train_images, loaded[1].train_images)  # Same data from both readers.
np.testing.assert_array_equal(loaded[0].test_labels, loaded[1].test_labels)
d.train_split = 'trainz'
try:
  input_pipeline.load_dataset(d)
  raise AssertionError('an unknown split was accepted')
except input_pipeline.DataError as e:
  assert 'config.data.train_split' in str(e), e
d.train_split, d.test_split = 'train', 'test[:0]'
try:
  input_pipeline.load_dataset(d)
  raise AssertionError('an empty test split was accepted')
except input_pipeline.DataError as e:
  assert "config.data.test_split='test[:0]'" in str(e) and 'no examples' in str(e), e
"""


@pytest.mark.slow
def test_tfds_prepared_array_record_and_tfrecord(tmp_path):
  # Real prepared files: batched array_record reads, and the TensorFlow fallback for tfrecord.
  result = subprocess.run([sys.executable, '-c', _PREPARED_CODE, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)
  assert result.returncode == 0, result.stderr[-3000:]


def test_tfds_missing_data_without_download_says_what_to_do(tmp_path):
  d = _data_config(tfds_data_dir=str(tmp_path))
  d.tfds_download = False  # Never touch the network in a test.
  with pytest.raises(DataError) as e:
    ip.load_dataset(d)
  message = str(e.value)
  assert 'tfds_data_dir' in message and 'download_and_prepare' in message and str(tmp_path) in message
  assert "file_format='array_record'" in message and 'digits_dblock.py' in message


def test_tfds_failed_download_is_a_data_error(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds
  from diffblocks_jax.data import tfds_preparation
  def offline(self, **kwargs):
    raise ConnectionError('no route to host')
  monkeypatch.setattr(tfds_preparation, 'unreachable_hosts', lambda urls, **kwargs: [])  # The host "answers".
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', offline)
  with pytest.raises(DataError, match='no route to host') as e:
    ip.load_dataset(_data_config(tfds_data_dir=str(tmp_path)))
  assert 'tfds_data_dir' in str(e.value)


def test_tfds_unknown_name_and_label_key():
  with pytest.raises(DataError, match='config.data.name'):
    ip.load_dataset(_data_config(name='no_such_dataset_xyz'))
  with pytest.raises(DataError, match="config.data.label_key='fine'"):
    ip.load_dataset(_data_config(label_key='fine'))


# ---------------------------------------------------------------------------------------------------- digits

def test_digits_shapes_split_and_determinism():
  a, b = ip.load_dataset(tiny_config().data), ip.load_dataset(tiny_config().data)
  assert a.train_images.shape[1:] == (8, 8, 1) and a.train_images.dtype == np.uint8
  assert len(a.train_labels) + len(a.test_labels) == 1797 and len(a.test_labels) == 360
  assert a.num_classes == 10 and a.image_size == 8 and a.channels == 1
  assert a.train_images.max() == 255 and a.train_images.min() == 0
  np.testing.assert_array_equal(a.train_images, b.train_images)
  np.testing.assert_array_equal(a.test_labels, b.test_labels)
  assert set(np.bincount(a.test_labels)) <= {35, 36, 37}  # Stratified: ~36 per class.


def test_process_shards_are_disjoint_equal_and_cover_the_split():
  full = ip.load_dataset(tiny_config().data)
  shards = [ip.load_dataset(tiny_config().data, process_index=i, process_count=2) for i in range(2)]
  n = len(full.train_labels) // 2
  assert all(len(s.train_labels) == n for s in shards)
  np.testing.assert_array_equal(np.concatenate([s.train_images for s in shards]), full.train_images[:2 * n])
  np.testing.assert_array_equal(np.concatenate([s.train_labels for s in shards]), full.train_labels[:2 * n])
  for s in shards:  # The test split stays whole.
    np.testing.assert_array_equal(s.test_images, full.test_images)


def test_loader_errors_name_the_field():
  with pytest.raises(DataError, match=r"config.data.source='csv'.*'tfds', 'digits', 'npz', 'folder'"):
    ip.load_dataset(_data_config(source='csv'))
  with pytest.raises(DataError, match='config.data.mean'):
    ip.load_dataset(_data_config(source='digits', mean=(0.5071, 0.4867, 0.4408)))  # CIFAR's on 1-channel digits.


# ------------------------------------------------------------------------------------------------------- npz

def _npz_arrays():
  rng = np.random.default_rng(0)
  return dict(x_train=rng.integers(0, 256, (10, 6, 6), dtype=np.uint8), y_train=np.arange(10) % 4,
              x_test=rng.integers(0, 256, (4, 6, 6), dtype=np.uint8), y_test=np.arange(4))


def _npz_config(path):
  """The npz source reading `path`, with one-channel statistics."""
  return _data_config(source='npz', path=str(path), mean=(0.5,), std=(0.25,))


def test_npz_good_file(tmp_path):
  np.savez(tmp_path / 'd.npz', **_npz_arrays())
  data = ip.load_dataset(_npz_config(tmp_path / 'd.npz'))
  assert data.train_images.shape == (10, 6, 6, 1) and data.test_images.shape == (4, 6, 6, 1)
  assert data.num_classes == 4 and data.train_labels.dtype == np.int32


@pytest.mark.parametrize('key,bad', [
    ('x_train', None), ('y_test', None),
    ('x_train', np.zeros((10, 6, 6), np.float32)), ('x_test', np.zeros((4, 6), np.uint8)),
    ('y_train', np.zeros(10, np.float32)), ('y_test', -np.ones(4, np.int64)), ('y_train', np.zeros(9, int)),
])
def test_npz_bad_key_is_named(tmp_path, key, bad):
  arrays = _npz_arrays()
  if bad is None:
    del arrays[key]
  else:
    arrays[key] = bad
  np.savez(tmp_path / 'd.npz', **arrays)
  with pytest.raises(DataError, match=key):
    ip.load_dataset(_npz_config(tmp_path / 'd.npz'))


def test_npz_unreadable_files_are_named(tmp_path):
  np.savez(tmp_path / 'good.npz', **_npz_arrays())
  blob = (tmp_path / 'good.npz').read_bytes()
  cases = {'empty': (b'', 'empty (0 bytes)'), 'truncated': (blob[:len(blob) // 2], 'truncated or damaged'),
           'text': (b'x_train,y_train\n1,2\n', 'not a .npz')}
  for name, (data, says) in cases.items():
    path = tmp_path / f'{name}.npz'
    path.write_bytes(data)
    with pytest.raises(DataError) as e:
      ip.load_dataset(_npz_config(path))
    assert f'config.data.path={str(path)!r}' in str(e.value) and says in str(e.value), (name, str(e.value))
    assert 'pickle' not in str(e.value), (name, str(e.value))  # NumPy calls any non-zip file "pickled".
  arrays = _npz_arrays()
  arrays['y_test'] = np.array([{'label': 1}] * 4, dtype=object)
  np.savez(tmp_path / 'objects.npz', **arrays)
  with pytest.raises(DataError, match=r"array 'y_test' holds pickled Python objects"):
    ip.load_dataset(_npz_config(tmp_path / 'objects.npz'))


def _ten_class_arrays(**changes):
  rng = np.random.default_rng(0)
  arrays = dict(x_train=rng.integers(0, 256, (20, 4, 4), dtype=np.uint8), y_train=np.arange(20) % 10,
                x_test=rng.integers(0, 256, (5, 4, 4), dtype=np.uint8), y_test=np.arange(5))
  arrays.update(changes)
  return arrays


@pytest.mark.parametrize('changes,says', [
    # A 10 among 0..9 in the test split alone: an 11th class no training example teaches.
    (dict(y_test=np.array([0, 1, 2, 3, 10])), r'y_test has label\(s\) \[10\], outside the 10 classes 0..9'),
    # Stated: 10 classes; a 10 in the training split.
    (dict(num_classes=np.array(10), y_train=np.r_[np.arange(19) % 10, 10]),
     r'y_train has label\(s\) \[10\], outside the 10 classes 0..9 that num_classes=10'),
    (dict(num_classes=np.array(10), y_test=np.array([0, 1, 2, 3, 10])), r'y_test has label\(s\) \[10\]'),
    # 1-based labels: class 0 has no example.
    (dict(y_train=np.arange(20) % 10 + 1), r'y_train has no example of class\(es\) \[0\]'),
    (dict(num_classes=np.array(12)), r'no example of class\(es\) \[10, 11\]'),
    (dict(num_classes=np.array([10, 10])), 'num_classes is int64 \\(2,\\)'),
    (dict(x_test=np.zeros((0, 4, 4), np.uint8), y_test=np.zeros(0, np.int64)), 'x_test has no images'),
])
def test_npz_labels_must_be_the_classes(tmp_path, changes, says):
  np.savez(tmp_path / 'd.npz', **_ten_class_arrays(**changes))
  with pytest.raises(DataError, match=says):
    ip.load_dataset(_npz_config(tmp_path / 'd.npz'))


def test_npz_num_classes_key_states_the_count(tmp_path):
  np.savez(tmp_path / 'd.npz', **_ten_class_arrays(num_classes=np.array(10)))
  assert ip.load_dataset(_npz_config(tmp_path / 'd.npz')).num_classes == 10


def test_dataset_refuses_an_empty_split():
  images, labels = np.zeros((4, 2, 2, 1), np.uint8), np.zeros(4, np.int32)
  with pytest.raises(DataError, match='the test split has no examples'):
    ip.Dataset(images, labels, images[:0], labels[:0], 2, 'tiny')
  with pytest.raises(DataError, match='the train split has no examples'):
    ip.Dataset(images[:0], labels[:0], images, labels, 2, 'tiny')


# ---------------------------------------------------------------------------------------------------- folder

def _write_png(path: pathlib.Path, value: int, mode: str = 'RGB', size=(5, 5)):
  from PIL import Image
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new(mode, size, value if mode == 'L' else (value, 255 - value, 7)).save(path)


def _folder(root: pathlib.Path, tiny: bool, mode: str = 'RGB') -> pathlib.Path:
  for c, name in enumerate(('cat', 'dog')):
    for i in range(3):
      _write_png(root / 'train' / name / ('images' if tiny else '') / f'{i}.png', 10 * c + i, mode)
    if tiny:
      (root / 'train' / name / f'{name}_boxes.txt').write_text('ignored')
  if tiny:
    _write_png(root / 'val' / 'images' / 'val_0.png', 100, mode)
    _write_png(root / 'val' / 'images' / 'val_1.png', 101, mode)
    (root / 'val' / 'val_annotations.txt').write_text('val_0.png\tdog\t0\t0\t4\t4\nval_1.png\tcat\t1\t1\t3\t3\n')
  else:
    _write_png(root / 'val' / 'cat' / 'a.png', 100, mode)
    _write_png(root / 'val' / 'dog' / 'b.png', 101, mode)
  return root


@pytest.mark.parametrize('tiny', [False, True])
def test_folder_layouts(tmp_path, tiny):
  data = ip.load_dataset(_data_config(source='folder', path=str(_folder(tmp_path, tiny))))
  assert data.train_images.shape == (6, 5, 5, 3) and data.test_images.shape == (2, 5, 5, 3)
  assert data.num_classes == 2
  assert sorted(data.train_labels) == [0, 0, 0, 1, 1, 1]
  # Each image's label matches its class folder: the red channel is 10 * class + index.
  np.testing.assert_array_equal(data.train_images[:, 0, 0, 0] // 10, data.train_labels)
  expected_test = {100: 1, 101: 0} if tiny else {100: 0, 101: 1}
  assert {int(v): int(l) for v, l in zip(data.test_images[:, 0, 0, 0], data.test_labels)} == expected_test


def test_folder_grayscale_keeps_one_channel(tmp_path):
  data = ip.load_dataset(_data_config(source='folder', path=str(_folder(tmp_path, False, 'L')), mean=(0.5,),
                                      std=(0.5,)))
  assert data.channels == 1 and data.test_images[:, 0, 0, 0].tolist() in ([100, 101], [101, 100])


def test_folder_corrupt_file_skip_and_error(tmp_path, caplog):
  root = _folder(tmp_path, False)
  bad = root / 'train' / 'dog' / 'broken.png'
  bad.write_bytes(b'\x89PNG\r\n\x1a\n not really')
  with pytest.raises(DataError, match=str(bad)):
    ip.load_dataset(_data_config(source='folder', path=str(root), on_corrupt='error'))
  with caplog.at_level('WARNING'):
    data = ip.load_dataset(_data_config(source='folder', path=str(root), on_corrupt='skip'))
  assert len(data.train_labels) == 6
  assert str(bad) in caplog.text


def test_folder_empty_class_folder_is_refused(tmp_path):
  root = _folder(tmp_path, False)
  (root / 'train' / 'emu').mkdir()
  (root / 'train' / 'emu' / 'notes.txt').write_text('no images here')
  with pytest.raises(DataError, match=r"class folder\(s\) \['emu'\] hold no images"):
    ip.load_dataset(_data_config(source='folder', path=str(root)))


def test_folder_class_with_only_unreadable_images_is_refused(tmp_path):
  root = _folder(tmp_path, False)
  for image in (root / 'train' / 'dog').iterdir():
    image.write_bytes(b'\x89PNG\r\n\x1a\n not really')
  with pytest.raises(DataError, match=r"no readable image is left in class folder\(s\) \['dog'\]"):
    ip.load_dataset(_data_config(source='folder', path=str(root), on_corrupt='skip'))


def test_folder_without_validation_images_is_refused(tmp_path):
  root = _folder(tmp_path, False)
  for image in (root / 'val').rglob('*.png'):
    image.unlink()
  with pytest.raises(DataError, match=r'val holds no images'):
    ip.load_dataset(_data_config(source='folder', path=str(root)))


def test_folder_odd_size_names_the_file(tmp_path):
  root = _folder(tmp_path, False)
  _write_png(root / 'val' / 'dog' / 'big.png', 3, size=(6, 5))
  with pytest.raises(DataError, match='big.png'):
    ip.load_dataset(_data_config(source='folder', path=str(root)))


# ----------------------------------------------------------------------------------------------- augmentation

def _images(n=16, size=8, channels=3):
  return jnp.asarray(np.random.default_rng(0).integers(0, 256, (n, size, size, channels), dtype=np.uint8))


def test_normalize_is_exact_and_augment_without_ops_only_normalizes():
  d = _data_config(pad_crop=0, flip=False, randaugment=False)
  x = _images()
  expected = (np.asarray(x, np.float32) / 255.0 - np.asarray(d.mean, np.float32)) / np.asarray(d.std, np.float32)
  np.testing.assert_allclose(ip.normalize(x, d), expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(ip.augment(jax.random.key(0), x, d), ip.normalize(x, d))
  gray = _data_config(mean=(0.3,), std=(0.4,))
  np.testing.assert_allclose(ip.normalize(x[..., :1], gray), (np.asarray(x[..., :1]) / 255 - 0.3) / 0.4,
                             rtol=1e-5, atol=1e-5)


def test_augment_shape_determinism_and_jit():
  d = _data_config(pad_crop=2, flip=True)
  x = _images()
  fn = jax.jit(lambda key, images: ip.augment(key, images, d))
  a, b = fn(jax.random.key(1), x), fn(jax.random.key(1), x)
  assert a.shape == x.shape and a.dtype == jnp.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, fn(jax.random.key(2), x))
  np.testing.assert_allclose(a, ip.augment(jax.random.key(1), x, d), atol=1e-6)  # jit == eager (up to fusion)


def test_flip_and_crop_change_images_as_specified():
  x = _images(n=64)
  unnormalize = lambda y, d: np.round((np.asarray(y) * np.asarray(d.std) + np.asarray(d.mean)) * 255)
  flip = _data_config(pad_crop=0, flip=True)
  y = unnormalize(ip.augment(jax.random.key(0), x, flip), flip)
  flipped = np.all(y == np.asarray(x)[:, :, ::-1], axis=(1, 2, 3))
  kept = np.all(y == np.asarray(x), axis=(1, 2, 3))
  assert np.all(flipped | kept) and 16 < flipped.sum() < 48  # Each image is either mirrored or not, p = 0.5.
  crop = _data_config(pad_crop=2, flip=False)
  y = unnormalize(ip.augment(jax.random.key(0), x, crop), crop)
  padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
  shifted = 0
  for image, source in zip(y, padded):  # Every output is one 8x8 window of the zero-padded image.
    windows = [(i, j) for i in range(5) for j in range(5) if np.array_equal(image, source[i:i + 8, j:j + 8])]
    assert windows, 'a crop is not a window of the padded image'
    shifted += (2, 2) not in windows
  assert shifted > 32


def test_augment_calls_randaugment(monkeypatch):
  from diffblocks_jax.data import randaugment
  calls = []
  def fake(key, images, *, num_ops, magnitude):
    calls.append((num_ops, magnitude))
    return 255 - images
  monkeypatch.setattr(randaugment, 'randaugment', fake)
  d = _data_config(pad_crop=0, flip=False, randaugment=True, randaugment_num_ops=3, randaugment_magnitude=5)
  x = _images()
  np.testing.assert_array_equal(ip.augment(jax.random.key(0), x, d), ip.normalize(255 - x, d))
  assert calls == [(3, 5)]
