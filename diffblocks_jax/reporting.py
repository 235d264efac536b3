"""What a person follows during a run: progress lines with ETA, `metrics.jsonl`, TensorBoard events.

Only process 0 writes; other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
import zlib

from absl import logging
import numpy as np


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


class MetricWriter:
  """Appends one JSON object per line to WORKDIR/metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._path = os.path.join(workdir, 'metrics.jsonl')
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    except ImportError:  # Metrics still land in metrics.jsonl.
      logging.warning('tensorboardX is not installed: no TensorBoard events are written.')

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self._path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, float(v), int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def summarise(metrics: dict[str, np.ndarray], num_blocks: int) -> dict[str, float]:
  """Window means; per-block losses over the steps that trained each block."""
  out = {f'train/{k}': float(np.mean(v)) for k, v in metrics.items() if k not in ('block', 'lr')}
  out['train/lr'] = float(metrics['lr'][-1])
  if num_blocks > 1:
    for b in range(num_blocks):
      chosen = metrics['block'] == b
      if chosen.any():
        out[f'train/loss_block{b}'] = float(np.mean(metrics['loss'][chosen]))
  return out


def read_metrics(workdir: str) -> list[dict]:
  """Records of WORKDIR/metrics.jsonl (for notebooks and tests)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """Throughput and ETA from wall time between reports (excluding the first, compile-heavy chunk)."""

  def __init__(self, total_steps: int, batch_size: int, steps_per_epoch: int):
    self.total, self.batch_size, self.steps_per_epoch = total_steps, batch_size, steps_per_epoch
    self._t0 = self._step0 = None

  def line(self, step: int, metrics: dict) -> str:
    now = time.perf_counter()
    if self._t0 is None:
      self._t0, self._step0 = now, step
      rate = float('nan')
    else:
      rate = (step - self._step0) / max(now - self._t0, 1e-9)
    eta = (self.total - step) / rate if rate == rate and rate > 0 else float('nan')
    shown = ' '.join(f'{k.split("/")[-1]} {v:.4g}' for k, v in metrics.items()
                     if k.startswith('train/loss'))
    img_s = f'{rate * self.batch_size:,.0f}' if rate == rate else '?'
    return (f'step {step}/{self.total} (epoch {step / self.steps_per_epoch:.2f}) {shown} | '
            f'{img_s} img/s | ETA {format_duration(eta)}')


def write_png(path: str, image: np.ndarray) -> None:
  """An (H, W) or (H, W, 1|3) uint8 array as a PNG (written here: no imaging library needed)."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3)):
    raise ValueError(f'write_png needs uint8 (H, W) or (H, W, 1|3), got {image.dtype} {image.shape}')
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  h, w = image.shape[:2]
  color_type = 0 if image.ndim == 2 else 2  # Greyscale or RGB, 8 bits.
  rows = b''.join(b'\x00' + image[r].tobytes() for r in range(h))  # Filter type 0 on every row.
  chunk = lambda tag, data: (struct.pack('>I', len(data)) + tag + data +
                             struct.pack('>I', zlib.crc32(tag + data) & 0xffffffff))
  png = (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, color_type, 0, 0, 0)) +
         chunk(b'IDAT', zlib.compress(rows, 9)) + chunk(b'IEND', b''))
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(png)
  os.replace(tmp, path)  # A reader never sees half a picture.
