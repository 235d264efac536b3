"""The benchmark in CI-sized form, and the memory claim of DiffusionBlocks from XLA's compiled analysis.

No timing is asserted: CPU timings say nothing about an accelerator. Compiling dominates on a CPU, so the
runs here lower the LLVM optimisation level; that changes generated code, not buffer assignment, so the
memory figures are the ones a default compile gives.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import jax
import pytest

from diffblocks_jax.training import sharding, experiment
from diffblocks_jax.tools import bench, memory
from helpers import HANG_GUARD_S, subprocess_env

FAST_COMPILE = memory.FAST_COMPILE  # The planner's cheaper CPU compilation (one definition).

RECORD_FIELDS = {
    'config', 'note', 'variant', 'phase', 'model_kind', 'block', 'dtype', 'batch', 'image_size', 'channels',
    'num_classes', 'hidden_size', 'num_layers', 'num_heads', 'mlp_dim', 'patch_size', 'num_blocks',
    'randaugment', 'num_params', 'ms_per_step', 'img_per_s', 'window_s', 'windows', 'steps_per_window',
    'compile_s', 'temp_bytes', 'argument_bytes', 'output_bytes', 'alias_bytes', 'generated_code_bytes',
    'runtime_peak_bytes', 'runtime_peak_isolated', 'device_kind', 'backend', 'jax_version',
    'offload_idle_blocks', 'state_device_bytes', 'state_host_bytes', 'remat',
}
TINY_ROWS = ['baseline', 'baseline_remat', 'dblock_mix', 'dblock_offload', 'weight_tied', 'dblock_block0',
             'dblock_block1', 'eval_baseline', 'eval_dblock', 'compile_B2']  # The tiny setting has 2 layers: B = 3 and 6 do not divide them.


def check_records(records: list[dict]) -> None:
  assert [r['variant'] for r in records] == TINY_ROWS
  for r in records:
    assert set(r) == RECORD_FIELDS, set(r) ^ RECORD_FIELDS
    assert r['compile_s'] > 0
    if r['variant'].startswith('compile_B'):  # Compiled, not run.
      assert math.isnan(r['img_per_s']) and r['num_blocks'] == int(r['variant'][-1])
      continue
    assert math.isfinite(r['img_per_s']) and r['img_per_s'] > 0  # Ran and was timed; no speed asserted.
    assert len(r['window_s']) == r['windows']
    assert r['temp_bytes'] > 0 and r['argument_bytes'] > 0 and r['output_bytes'] > 0
    assert r['jax_version'] == jax.__version__ and r['dtype'] == 'float32'
    if r['backend'] == 'cpu':
      assert r['runtime_peak_bytes'] is None
  train_rows = [r for r in records if r['phase'] == 'train' and not r['variant'].startswith('compile')]
  assert [r['block'] for r in train_rows] == [None, None, 'mix', 'mix', 'mix', 0, 1]
  assert all(r['alias_bytes'] > 0 for r in train_rows)  # The state is donated.
  rows = {r['variant']: r for r in records}
  mix, offload = rows['dblock_mix'], rows['dblock_offload']
  # Weight-tied: one block's parameters and Adam state for both slices (B = 2), so half the block stacks.
  tied = rows['weight_tied']
  assert tied['num_params'] < mix['num_params'] and tied['state_device_bytes'] < mix['state_device_bytes']
  # Offloaded: the block stacks (parameters and Adam moments) move to host memory; the rest stays.
  assert mix['state_host_bytes'] == 0 and offload['state_host_bytes'] > 0
  assert offload['state_device_bytes'] + offload['state_host_bytes'] == mix['state_device_bytes']
  assert offload['state_device_bytes'] < 0.5 * mix['state_device_bytes']
  # The drawn-block step costs what a fixed-block step costs in temporaries (no idle block copied).
  assert mix['temp_bytes'] <= 1.1 * rows['dblock_block0']['temp_bytes'], (mix['temp_bytes'],
                                                                          rows['dblock_block0']['temp_bytes'])


@pytest.mark.slow
@pytest.mark.long  # The notebooks test runs the same command by default (its JSON feeds evaluate.ipynb).
def test_tiny_suite_command_line(tmp_path):
  out = tmp_path / 'bench.json'
  env = subprocess_env()
  result = subprocess.run(
      [sys.executable, '-m', 'diffblocks_jax.tools.bench', '--suite=tiny', f'--json={out}', '--windows=1',
       '--steps_per_window=1'], env=env, capture_output=True, text=True, timeout=HANG_GUARD_S, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert all(row in result.stdout for row in TINY_ROWS)  # The printed table has every row.
  check_records(json.loads(out.read_text()))


def _step_temp(kind: str, num_blocks: int = 1) -> int:
  """Compiled temporary bytes of one training step of a model whose activations dominate its state."""
  config = bench.suite_config('float32', batch=64, hidden_size=32, num_heads=2, num_layers=6, mlp_dim=128,
                         patch_size=2, num_blocks=num_blocks)  # 16x16 images: 64 tokens + 1.
  setting = bench.Setting('memory', config, 16, 3, 10)
  config = bench.variant_config(config, kind=kind)
  exp = experiment.experiment_from_data(config, bench.synthetic_data(setting),
                                        mesh=sharding.make_mesh(config, jax.local_devices()[:1]))
  return bench.step_memory(exp, compiler_options=FAST_COMPILE)['temp_bytes']


@pytest.mark.slow  # Compiles several training steps.
@pytest.mark.long  # 63 s; by default tests/test_memory.py checks the planner's rows against independent counts.
@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='figures checked on the CPU compiler')
def test_block_step_needs_a_fraction_of_the_baseline_temp_memory():
  baseline = _step_temp('vit')
  dblock = {b: _step_temp('dblock', b) for b in (2, 3, 6)}
  # The real (switch) step: activations and gradients exist for one block of L/B layers (SPEC §1).
  assert dblock[3] <= 0.5 * baseline, (dblock, baseline)
  assert baseline > dblock[2] > dblock[3] > dblock[6], (dblock, baseline)


@pytest.mark.slow
@pytest.mark.long  # Compiles five steps; the classification rows are checked by default.
def test_generation_rows_train_and_sample_both_models():
  """A tiny DiT setting: training rows of both models and the 50-step sampler's rows (no speed asserted)."""
  config = bench.suite_config('float32', batch=8, hidden_size=16, num_heads=2, num_layers=3, num_blocks=3)
  config.model.kind, config.eval.batch_size = 'dit', 4
  config.data.mean, config.data.std = (0.5,), (0.5,)
  setting = bench.Setting('tiny_dit', config, 8, 1, 10, 'CI-sized')
  assert bench.variants(setting) == ['baseline', 'baseline_remat', 'dblock_mix', 'sample_baseline',
                                     'sample_dblock']
  data, states = bench.synthetic_data(setting), {}
  rows = {v: bench.run_variant(setting, v, data, windows=1, steps_per_window=1, compiler_options=FAST_COMPILE,
                               states=states) for v in bench.variants(setting)}
  assert [rows[v]['model_kind'] for v in rows] == ['dit', 'dit', 'dit_dblock', 'dit', 'dit_dblock']
  assert (rows['baseline']['remat'], rows['baseline_remat']['remat']) == ('', bench.REMAT_POLICY)
  assert rows['sample_dblock']['phase'] == 'eval' and rows['sample_dblock']['batch'] == 4
  assert rows['baseline']['num_params'] == rows['dblock_mix']['num_params']  # Shared outer parts: same model.
  for r in rows.values():
    assert set(r) == RECORD_FIELDS and math.isfinite(r['img_per_s']) and r['img_per_s'] > 0
