"""What a person follows during a run: progress lines with ETA, `metrics.jsonl`, TensorBoard events.

Only process 0 writes; other processes get a writer that does nothing.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import tempfile
import time

from absl import logging
import jax
import numpy as np

from diffblocks_jax import config as config_lib
from diffblocks_jax.tasks import registry


# Library tracebacks kept off the console (a full disk makes Orbax log one per array it could not write) go to
# this file in the system's temporary folder; the one-line error that ends the run names it.
DETAILS_PATH = os.path.join(tempfile.gettempdir(), f'diffblocks_jax-{os.getpid()}.log')
_details = {'written': False}


def write_details(text: str) -> None:
  """Appends `text` to DETAILS_PATH; a failure to write is ignored (that disk may be full too)."""
  try:
    with open(DETAILS_PATH, 'a', encoding='utf-8') as f:
      f.write(text if text.endswith('\n') else text + '\n')
    _details['written'] = True
  except OSError:
    pass


def details_written() -> bool:
  return _details['written']


class HeldStderr:
  """While held, what is printed on stderr (by any thread: Orbax's writer threads print their tracebacks there)
  is kept; `release` passes it on to the console, or, after a failure the one-line error already names, to
  DETAILS_PATH."""

  def __init__(self):
    self._kept: list[str] = []
    self._stderr = sys.stderr
    sys.stderr = self

  def write(self, text: str) -> int:
    self._kept.append(text)
    return len(text)

  def flush(self) -> None:
    pass

  def release(self, *, to_details: bool) -> None:
    if sys.stderr is self:
      sys.stderr = self._stderr
    text, self._kept = ''.join(self._kept), []
    if text and to_details:
      write_details(text)
    elif text:
      sys.stderr.write(text)


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
    if exp.config.model.weight_tied:  # One block's parameters serve all B slices.
      per_block = f' (one block of {stacked:,} for all {exp.num_blocks} slices, weight-tied; {total - stacked:,} shared)'
    else:
      per_block = f' ({stacked // len(exp.blocks):,} per block, {total - stacked:,} shared)'
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


METRICS_FILE = 'metrics.jsonl'


class MetricWriter:
  """Appends one JSON object per line to WORKDIR/metrics.jsonl and mirrors scalars to TensorBoard.

  Each record is one `write` of a whole line to a file opened for appending, so a kill leaves at most a torn
  last line (which `read_metrics` skips and `repair_metrics` cuts before a resumed run appends)."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._path = os.path.join(workdir, METRICS_FILE)
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    except ImportError:  # Metrics still land in metrics.jsonl.
      logging.warning('tensorboardX is not installed: no TensorBoard events are written.')

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    line = (json.dumps(record) + '\n').encode()
    fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      written = os.write(fd, line)
    finally:
      os.close(fd)
    if written != len(line):  # A full disk can take part of a line: the record is not whole.
      raise OSError(errno.ENOSPC, f'only {written} of {len(line)} bytes of a record were written', self._path)
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, float(v), int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      try:
        self._tb.close()
      except OSError:  # A full disk: the run's own error says so.
        pass


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
  """Records of WORKDIR/metrics.jsonl (for the loop, notebooks and tests). A line that is not a whole record
  (the torn tail of a killed write, or damage) is skipped and reported with its file and line number."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  records, _ = _parse_metrics(path)
  return records


def _parse_metrics(path: str) -> tuple[list[dict], list[int]]:
  """(records, numbers of the lines skipped)."""
  records, skipped = [], []
  with open(path, 'rb') as f:
    lines = f.read().split(b'\n')
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, dict) or not isinstance(record.get('step'), int):
        raise ValueError('not a record with an integer step')
    except ValueError:
      torn = number == len(lines)  # No newline after it: a write that did not finish.
      logging.warning('%s:%d: skipped %s (%d bytes): %r', path, number,
                      'a torn last line, left by a run stopped while writing it' if torn else 'a damaged line',
                      len(line), line[:80])
      skipped.append(number)
      continue
    records.append(record)
  return records, skipped


def repair_metrics(workdir: str) -> str | None:
  """Cuts a torn last line (no newline after it) off WORKDIR/metrics.jsonl before a resumed run appends to it;
  what was cut is kept beside it (returned path), so nothing is lost."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return None
  with open(path, 'rb') as f:
    data = f.read()
  if not data or data.endswith(b'\n'):
    return None
  keep = data.rfind(b'\n') + 1
  aside = os.path.join(workdir, f'metrics.torn-{time.strftime("%Y%m%d-%H%M%S")}.jsonl')
  with open(aside, 'wb') as f:
    f.write(data[keep:])
  with open(path, 'r+b') as f:
    f.truncate(keep)
  logging.warning('%s ended in a torn line (%d bytes), left by a run stopped while writing it: cut, and kept in '
                  '%s.', path, len(data) - keep, aside)
  return aside


def set_aside_metrics(workdir: str, step: int) -> str | None:
  """Moves the metrics.jsonl records of steps after `step` to metrics.superseded-<time>.jsonl (returned): a run
  that resumes from `step` (or starts again, step 0) logs those steps anew, so the log never holds two records
  for one step."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return None
  with open(path, 'rb') as f:
    lines = f.read().splitlines(keepends=True)
  later = lambda line: (lambda r: isinstance(r, dict) and isinstance(r.get('step'), int) and r['step'] > step)(
      _record_or_none(line))
  moved = [line for line in lines if later(line)]
  if not moved:
    return None
  aside = os.path.join(workdir, f'metrics.superseded-{time.strftime("%Y%m%d-%H%M%S")}.jsonl')
  with open(aside, 'wb') as f:
    f.writelines(moved)
  with open(path + '.tmp', 'wb') as f:
    f.writelines(line for line in lines if not later(line))
  os.replace(path + '.tmp', path)
  logging.info('Moved the %d metrics records after step %d to %s: the resumed run logs those steps anew.',
               len(moved), step, aside)
  return aside


def _record_or_none(line: bytes):
  try:
    return json.loads(line)
  except ValueError:
    return None


def logged_steps(workdir: str) -> tuple[int, int] | None:
  """(first, last) step of the training records in metrics.jsonl; None without any."""
  steps = [r['step'] for r in read_metrics(workdir) if 'train/loss' in r]
  return (min(steps), max(steps)) if steps else None


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
                checkpoint_step: int | None = None, unit: str = 'img', then: str | None = None) -> str:
  """What a finished (or stopped) run reached and where everything is, as a few lines for the log.

  `result` is train_and_evaluate's dict ('step', 'eval/...', 'train/...'); `wall_s` the wall time of this
  session, which started (fresh or resumed) at `start_step`; with `batch_size`, its throughput. `then`: what to do
  next, instead of evaluating again (a block job: merge).
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
  covered = logged_steps(workdir)
  covers = f' (training records of steps {covered[0]}-{covered[1]})' if covered else ''
  lines.append(f'  metrics: {os.path.join(workdir, METRICS_FILE)}{covers}')
  if os.path.isdir(os.path.join(workdir, 'tensorboard')):
    board = os.path.join(workdir, 'tensorboard')
    lines.append(f'  TensorBoard: uv run --with tensorboard tensorboard --logdir {board}')
  lines.append(f'  then: {then}' if then else
               f'  evaluate again: uv run python -m diffblocks_jax.main --mode=eval --workdir={workdir}')
  return '\n'.join(lines)


# How the summary names the metrics a reader looks for first (the rest keep their metrics.jsonl names).
_METRIC_NAMES = {'eval/accuracy': 'accuracy (eval/accuracy)', 'eval/fd': 'FD (eval/fd)',
                 'eval/sample_accuracy': 'sample accuracy (eval/sample_accuracy)',
                 'eval/bpc': 'bits per character (eval/bpc)', 'eval/gen_ppl': 'sample perplexity (eval/gen_ppl)'}
