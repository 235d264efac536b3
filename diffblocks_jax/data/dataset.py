"""The in-memory dataset every source produces, and the error every data problem raises."""

from __future__ import annotations

import dataclasses

import numpy as np


class DataError(ValueError):
  """A data problem; the message names the bad input and says what to do."""


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays make field-wise ==/hash meaningless.
class Dataset:
  train_images: np.ndarray  # uint8 (N, H, W, C)
  train_labels: np.ndarray  # int32 (N,)
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  name: str

  def __post_init__(self):
    for split in ('train', 'test'):
      images, labels = getattr(self, f'{split}_images'), getattr(self, f'{split}_labels')
      if not len(images):  # Caught here, at load time, rather than by the first step or evaluation.
        raise DataError(f'{self.name}: the {split} split has no examples; training needs a non-empty train '
                        'split and evaluation a non-empty test split')
      if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f'{self.name}: {split}_images must be uint8 (N, H, W, C), got {images.dtype} '
                        f'{images.shape}')
      if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f'{self.name}: {split}_labels must be integers of shape ({len(images)},), got '
                        f'{labels.dtype} {labels.shape}')
      if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
        raise DataError(f'{self.name}: {split}_labels span [{labels.min()}, {labels.max()}], outside '
                        f'[0, {self.num_classes})')
    if self.train_images.shape[1:] != self.test_images.shape[1:]:
      raise DataError(f'{self.name}: train images are {self.train_images.shape[1:]} but test images are '
                      f'{self.test_images.shape[1:]}')

  @property
  def image_size(self) -> int:
    height, width = self.train_images.shape[1:3]
    if height != width:
      raise DataError(f'{self.name}: images are {height}x{width}; the ViT needs square images (resize them)')
    return height

  @property
  def channels(self) -> int:
    return self.train_images.shape[-1]

  # What the loop and the model builder ask of any dataset (images here, text in data/text.py).
  @property
  def num_train(self) -> int:
    return len(self.train_images)

  @property
  def model_dims(self) -> dict[str, int]:
    """The keyword arguments `models.build` takes from the data."""
    return dict(image_size=self.image_size, channels=self.channels, num_classes=self.num_classes)

  def train_arrays(self) -> tuple[np.ndarray, ...]:
    """The training split as row-aligned arrays: what a step's batch is gathered from."""
    return self.train_images, self.train_labels

  def summary(self) -> str:
    """One line for the start of a run."""
    h, w, c = self.train_images.shape[1:]
    return (f'{self.name}: {self.num_train:,} training images, {len(self.test_images):,} test, {h}x{w}x{c}, '
            f'{self.num_classes} classes')


def padded_batches(rows: np.ndarray, batch_size: int):
  """(batch, real) over `rows` in batches of one shape: the last batch is padded with copies of its last row
  (`real` rows are the data; drop the rest of the output), so a jitted function compiles once and nothing is
  dropped or scored twice."""
  for start in range(0, len(rows), batch_size):
    batch = rows[start:start + batch_size]
    real = len(batch)
    if real < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
    yield batch, real
