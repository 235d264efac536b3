"""What a person follows during a run: progress lines with ETA, `metrics.jsonl`, TensorBoard events.

Only process 0 writes; other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import time

from absl import logging
import jax
import numpy as np

from diffblocks_jax import config as config_lib
from diffblocks_jax.tasks import registry


def run_line(config, workdir: str) -> str:
  """The first line of a run: the kind, the seed and where the full config is (it goes to WORKDIR/config.json
  and the debug log, not the console)."""
  kind = registry.kind(config.model.kind)
  blocks = f'DiffusionBlocks, B={config_lib.num_blocks(config)}' if kind.blockwise else 'end to end'
  return (f'Run: model.kind={config.model.kind!r} ({kind.task}, {blocks}), seed {config.seed}; the full config is '
          f'in {os.path.join(workdir, "config.json")}')


def experiment_lines(exp) -> list[str]:
  """The data, the model's size and the devices, once the experiment is built."""
  params = exp.abstract_state.params
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  per_block = ''
  if exp.blockwise and isinstance(params, dict) and 'blocks' in params:
    stacked = sum(math.prod(x.shape) for x in jax.tree.leaves(params['blocks']))
    per_block = f' ({stacked // exp.num_blocks:,} per block, {total - stacked:,} shared)'
  devices = jax.devices()
  return [f'Data: {exp.data.summary()}',
          f'Model: {total:,} parameters{per_block}; {len(devices)} {devices[0].platform} device'
          f'{"s" if len(devices) > 1 else ""}, batch {exp.config.train.batch_size}']


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
  """Progress lines: step and epoch out of their totals, the training loss, throughput and ETA.

  Throughput counts from `start(step)`: call it right after the first compiled call returns (its compilation
  is done, its steps are running), with the step that call started from, so that the first line already has
  img/s and an ETA without the compile time in them. Without `start`, the first line starts the clock (and
  shows '?'). Wall time between lines includes evaluations and checkpoints, so the ETA does too.
  """

  def __init__(self, total_steps: int, batch_size: int, steps_per_epoch: int, unit: str = 'img'):
    self.total, self.batch_size, self.steps_per_epoch, self.unit = total_steps, batch_size, steps_per_epoch, unit
    self._t0 = self._step0 = None

  def start(self, step: int) -> None:
    self._t0, self._step0 = time.perf_counter(), step

  def steps_per_second(self, step: int) -> float:
    """Steps per second since `start` (NaN before it, or before any step has run since)."""
    if self._t0 is None or step <= self._step0:
      return float('nan')
    return (step - self._step0) / max(time.perf_counter() - self._t0, 1e-9)

  def line(self, step: int, metrics: dict) -> str:
    if self._t0 is None:
      self.start(step)
    rate = self.steps_per_second(step)
    eta = (self.total - step) / rate if rate > 0 else float('nan')  # NaN > 0 is False.
    shown = ' '.join(f'{k.split("/")[-1]} {v:.4g}' for k, v in metrics.items()
                     if k.startswith('train/loss'))
    img_s = f'{rate * self.batch_size:,.0f}' if math.isfinite(rate) else '?'
    epochs = f'{_number(step / self.steps_per_epoch)}/{_number(self.total / self.steps_per_epoch)}'
    head = ' '.join(filter(None, [f'step {step}/{self.total} (epoch {epochs})', shown]))
    return f'{head} | {img_s} {self.unit}/s | ETA {format_duration(eta)}'


def _number(x: float) -> str:
  """10 -> '10', 2.5 -> '2.5', 1/3 -> '0.33': epochs as a person writes them."""
  return f'{x:.2f}'.rstrip('0').rstrip('.')


def end_summary(result: dict, *, workdir: str, total_steps: int, wall_s: float, start_step: int = 0,
                batch_size: int | None = None, checkpoint_dir: str | None = None,
                checkpoint_step: int | None = None, unit: str = 'img') -> str:
  """What a finished (or stopped) run reached and where everything is, as a few lines for the log.

  `result` is train_and_evaluate's dict ('step', 'eval/...', 'train/...'); `wall_s` the wall time of this
  session, which started (fresh or resumed) at `start_step`; with `batch_size`, its throughput.
  """
  step = int(result.get('step', 0))
  head = f'Finished {step}/{total_steps} steps' if step >= total_steps else f'Stopped at step {step}/{total_steps}'
  speed = f' ({(step - start_step) / wall_s * batch_size:,.0f} {unit}/s)' if batch_size and wall_s > 0 else ''
  lines = [f'{head}; this session took {format_duration(wall_s)}{speed}.']
  evals = {k: v for k, v in result.items() if k.startswith('eval/')}
  if evals:
    lines.append('  test: ' + ', '.join(f'{_METRIC_NAMES.get(k, k)} {v:.4g}' for k, v in sorted(evals.items())))
  else:
    lines.append('  test: no evaluation in this session')
  if 'train/loss' in result:
    lines.append(f'  train: loss {result["train/loss"]:.4g} (the last logging window)')
  workdir = os.path.abspath(workdir)
  if checkpoint_dir:
    latest = f' (latest step {checkpoint_step})' if checkpoint_step is not None else ''
    lines.append(f'  checkpoints: {os.path.abspath(checkpoint_dir)}{latest}')
  lines.append(f'  metrics: {os.path.join(workdir, "metrics.jsonl")}')
  if os.path.isdir(os.path.join(workdir, 'tensorboard')):
    board = os.path.join(workdir, 'tensorboard')
    lines.append(f'  TensorBoard: uv run --with tensorboard tensorboard --logdir {board}')
  lines.append(f'  evaluate again: uv run python -m diffblocks_jax.main --mode=eval --workdir={workdir}')
  return '\n'.join(lines)


# How the summary names the metrics a reader looks for first (the rest keep their metrics.jsonl names).
_METRIC_NAMES = {'eval/accuracy': 'accuracy (eval/accuracy)', 'eval/fd': 'FD (eval/fd)',
                 'eval/sample_accuracy': 'sample accuracy (eval/sample_accuracy)',
                 'eval/bpc': 'bits per character (eval/bpc)', 'eval/gen_ppl': 'sample perplexity (eval/gen_ppl)'}
