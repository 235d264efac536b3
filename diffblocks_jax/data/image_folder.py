"""The image-folder data source: train/<class>/* with val/<class>/* or Tiny-ImageNet's val layout.

`input_pipeline` loads it for `config.data.source='folder'`; Pillow is imported when the first file is decoded,
so the other sources never need it.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib

from absl import logging
import numpy as np

from diffblocks_jax.data.dataset import DataError

IMAGE_EXTENSIONS = frozenset({'.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm', '.pgm'})
_GRAY_MODES = frozenset({'1', 'L', 'LA', 'I', 'I;16', 'F'})


def load(data_config):
  """(train images, train labels, test images, test labels, class names) of a folder, all images decoded.

  root/train/<class>/[images/]* and root/val/<class>/* or Tiny-ImageNet's root/val/images + annotations.

  The training files are read in a seeded random order so that contiguous process shards mix the classes.
  Every process reads everything (then keeps its shard): skipped corrupt files must not unbalance the shards.
  """
  root = pathlib.Path(data_config.path)
  if not data_config.path or not (root / 'train').is_dir():
    raise DataError(f'config.data.path={data_config.path!r} must be a folder holding train/<class>/ images')
  classes = sorted(p.name for p in (root / 'train').iterdir() if p.is_dir() and not p.name.startswith('.'))
  if not classes:
    raise DataError(f'{root / "train"} has no class subfolders')
  files = {name: _image_files(root / 'train' / name) for name in classes}
  empty = [name for name in classes if not files[name]]
  if empty:  # Each folder is a class: an empty one would be a class that is never trained.
    raise DataError(f'{root / "train"}: class folder(s) {empty[:10]} hold no images (extensions '
                    f'{sorted(IMAGE_EXTENSIONS)}); add images or remove the folder(s)')
  train = [(path, c) for c, name in enumerate(classes) for path in files[name]]
  train = [train[i] for i in np.random.default_rng(data_config.split_seed).permutation(len(train))]
  test = _val_files(root, {name: c for c, name in enumerate(classes)})
  if not test:
    raise DataError(f'{root / "val"} holds no images; the test split needs some (val/<class>/* or val/images '
                    '+ val/val_annotations.txt)')
  train_images, train_labels, train_gray = _read_images(train, data_config.on_corrupt, None)
  lost = [name for c, name in enumerate(classes) if not np.any(train_labels == c)]
  if lost:  # Every image of these classes was unreadable and skipped.
    raise DataError(f'{root / "train"}: no readable image is left in class folder(s) {lost[:10]} '
                    '(config.data.on_corrupt=skip skipped them all); fix the images or remove the folder(s)')
  train_size = ('the training images', train_images.shape[1:3])  # Test images must match them.
  test_images, test_labels, test_gray = _read_images(test, data_config.on_corrupt, train_size)
  if train_gray and test_gray:  # Every source image was grayscale: R = G = B, keep one channel.
    train_images, test_images = train_images[..., :1].copy(), test_images[..., :1].copy()
  return train_images, train_labels, test_images, test_labels, classes


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
  folder = folder / 'images' if (folder / 'images').is_dir() else folder  # Tiny-ImageNet: train/<wnid>/images.
  files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith('.'))
  other = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
  if other:
    logging.warning('Ignoring %d files without an image extension in %s, e.g. %s', len(other), folder, other[0])
  return [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]


def _val_files(root: pathlib.Path, class_index: dict[str, int]) -> list[tuple[pathlib.Path, int]]:
  annotations = root / 'val' / 'val_annotations.txt'
  if annotations.is_file():  # Tiny-ImageNet: "<file>\t<wnid>\t<box>" per line.
    pairs = [line.split('\t')[:2] for line in annotations.read_text().splitlines() if line.strip()]
    files = [(root / 'val' / 'images' / file, name) for file, name in pairs]
  elif (root / 'val').is_dir():
    folders = sorted(p for p in (root / 'val').iterdir() if p.is_dir() and not p.name.startswith('.'))
    files = [(path, d.name) for d in folders for path in _image_files(d)]
  else:
    raise DataError(f'{root} has no val/ folder (val/<class>/* or val/images + val/val_annotations.txt)')
  for path, name in files:
    if name not in class_index:
      raise DataError(f'{path} belongs to class {name!r}, which has no folder in {root / "train"}')
  return [(path, class_index[name]) for path, name in files]


def _decode(path: pathlib.Path):
  """(RGB uint8 array, was grayscale, None) or (None, None, the error)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top  (only the folder source needs Pillow)
  try:
    with Image.open(path) as image:
      image.load()  # Decode now: truncated files fail here, not later.
      return np.asarray(image.convert('RGB')), image.mode in _GRAY_MODES, None
  except (OSError, SyntaxError, ValueError) as e:  # Pillow's ways of saying "not a readable image".
    return None, None, e


def _read_images(files, on_corrupt: str, reference) -> tuple[np.ndarray, np.ndarray, bool]:
  """Decodes in threads (Pillow releases the GIL) into one array; every image must share one size."""
  out, labels, kept, all_gray = None, np.empty(len(files), np.int32), 0, True
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
    for (path, label), (image, gray, error) in zip(files, pool.map(_decode, [p for p, _ in files])):
      if error is not None:
        if on_corrupt == 'error':
          raise DataError(f'Cannot read image {path}: {error}. Fix or delete it, or set '
                          '--config.data.on_corrupt=skip')
        logging.warning('Skipping unreadable image %s: %s', path, error)
        continue
      if reference is None:  # The first readable image sets the size.
        reference = (str(path), image.shape[:2])
      if image.shape[:2] != tuple(reference[1]):
        raise DataError(f'{path} is {image.shape[1]}x{image.shape[0]} (WxH) but {reference[0]} is '
                        f'{reference[1][1]}x{reference[1][0]}; all images must share one size (resize them)')
      if out is None:
        out = np.empty((len(files), *image.shape), np.uint8)
      out[kept], labels[kept], all_gray, kept = image, label, all_gray and gray, kept + 1
  if kept < len(files):
    logging.warning('Skipped %d of %d unreadable images (config.data.on_corrupt=skip).', len(files) - kept,
                    len(files))
  if out is None:
    raise DataError(f'No readable images among {len(files)} files (e.g. {files[0][0] if files else "none"})')
  return out[:kept], labels[:kept], all_gray
