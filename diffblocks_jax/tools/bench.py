"""Throughput and memory of the baseline against DiffusionBlocks, on synthetic data (SPEC §10).

  python -m diffblocks_jax.tools.bench [--suite=release|tiny] [--json=FILE] [--windows=N --steps_per_window=K]
  python -m diffblocks_jax.tools.bench --config=configs/cifar100_dblock.py [--config.model.compute_dtype=bfloat16]
      [--image_size=32 --channels=3 --num_classes=100] [--randaugment] [--isolate]

Rows per setting (a config's model.kind is set per row): the baseline's training img/s, also with each layer
rematerialised (`baseline_remat`: config.model.remat, or 'nothing_saveable' where the config sets none); the
DiffusionBlocks' training img/s with the block drawn every step (`dblock_mix`, the real step: a traced row of the
stacked blocks), with the block stacks offloaded to host memory (`dblock_offload`), weight-tied (`weight_tied`:
one block's parameters and Adam state serve all B slices, config.model.weight_tied) and with each block forced
(`dblock_block<b>`); evaluation img/s (baseline forward, the N=B-step sampler); and the compile time of the
DiffusionBlocks training program at the setting's depth cut into B = 2, 3, 6 blocks (`compile_B<n>`,
compiled, not run). Every row reports the train state's bytes on the device and in host memory.
Training times the real `make_train_chunk` (gather, augmentation, block draw and update in one scan on the
device) on random uint8 images already on the device: one warm-up window, then the median of synchronised
windows. Memory: XLA's compiled analysis of the timed program (temporaries are those of one step: a scan
reuses them; the state is donated, so it is both argument and alias; the uint8 images are an argument) --
`step_memory` gives one bare step -- and the runtime peak where the backend reports one (None on CPU).
Runs on one device. The runtime peak is a process-wide high-water mark that cannot be reset: without
`--isolate` a row's figure includes every earlier row; `--isolate` runs each row in its own process.
`--randaugment` adds the baseline and mixed rows with RandAugment on: their img/s against the plain rows is
its cost.
Image generation (a config whose model.kind is 'dit' or 'dit_dblock', e.g. `--suite=dit` or
`--config=configs/digits_dit.py --image_size=8 --channels=1 --num_classes=10`): training rows of both models
and `sample_baseline` / `sample_dblock`, images per second of the config's sampler (50 Euler steps with
guidance by default), where each DiffusionBlocks step runs one block.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from diffblocks_jax import config as config_lib
from diffblocks_jax.training import experiment, sharding, train
from diffblocks_jax.data import input_pipeline
from diffblocks_jax.tasks import classification, generation
from diffblocks_jax.tools import memory
from diffblocks_jax.tools.memory import memory_fields, tree_bytes

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Benchmark this config instead of a suite.',
                                          lock_config=True)
_SUITE = flags.DEFINE_enum('suite', 'release', ['release', 'tiny', 'dit'], 'Built-in settings (without --config).')
_JSON = flags.DEFINE_string('json', None, 'Write the records here (a JSON list).')
_WINDOWS = flags.DEFINE_integer('windows', None, 'Timed windows (median taken); default by suite.')
_STEPS = flags.DEFINE_integer('steps_per_window', None, 'Steps (or eval batches) per window; default by suite.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 32, 'Synthetic image size for --config.')
_CHANNELS = flags.DEFINE_integer('channels', 3, 'Synthetic image channels for --config.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 100, 'Synthetic classes for --config.')
_RANDAUGMENT = flags.DEFINE_bool('randaugment', False, 'Add baseline and mix rows with RandAugment on.')
_ISOLATE = flags.DEFINE_bool('isolate', False, 'One process per row: exact runtime peaks on GPU/TPU.')
_ONLY = flags.DEFINE_string('only', None, 'Internal (--isolate): run one row, SETTING_INDEX:VARIANT.')

MIB = 2.0**20


@dataclasses.dataclass
class Setting:
  name: str
  config: Any  # ml_collections.ConfigDict; model.kind and data.randaugment are set per row.
  image_size: int
  channels: int
  num_classes: int
  note: str = ''


def suite_config(dtype: str, batch: int = 128, **model) -> Any:
  """The base config (SPEC §2 CIFAR model; the data is synthetic, of CIFAR's shape) with a compute dtype, batch
  and model overrides."""
  c = config_lib.get_base_config()
  c.model.kind = 'dblock'  # Each row sets its own (variant_config).
  c.data.name = 'cifar100'
  c.model.compute_dtype = dtype
  c.model.update(model)
  c.train.batch_size = batch
  c.mesh.data = 1  # One device: the figures are per accelerator.
  return c


def release_suite() -> list[Setting]:
  """SPEC §10's two settings, each in float32 and bfloat16, batch 128."""
  out = []
  for dtype in ('float32', 'bfloat16'):
    out.append(Setting(f'cifar100_{dtype}', suite_config(dtype), 32, 3, 100, 'SPEC §2 CIFAR config, B=3'))
  for dtype in ('float32', 'bfloat16'):
    out.append(Setting(f'vit768_64px_{dtype}', suite_config(dtype, hidden_size=768, num_heads=12), 64, 3, 200,
                       'SPEC §2/§10 64 px, hidden 768 setting at B=3, batch 128, as the release was timed '
                       '(the paper trains Tiny-ImageNet at B=2, batch 256)'))
  return out


def tiny_suite() -> list[Setting]:
  """CI-sized (seconds per row on a CPU): one float32 setting, B=2, every kind of row.

  Compiling dominates on a CPU, so the suite has one setting; bfloat16 runs with --config and
  --config.model.compute_dtype=bfloat16.
  """
  config = suite_config('float32', batch=8, hidden_size=24, num_heads=2, num_layers=2, mlp_dim=32, num_blocks=2)
  return [Setting('tiny_float32', config, 8, 3, 10, 'CI-sized')]


def dit_suite() -> list[Setting]:
  """Image generation: DiT-S/2 on CIFAR-10-shaped data as configs/cifar10_dit.py (batch 128, float32), B=3."""
  c = suite_config('float32', hidden_size=384, num_layers=12, num_heads=6, patch_size=2)
  c.model.kind = 'dit'
  c.diffusion.class_dropout_prob, c.eval.num_inference_steps, c.eval.cfg_scale = 0.1, 50, 2.0
  c.eval.batch_size = 128
  return [Setting('cifar10_dit_s2_float32', c, 32, 3, 10, 'paper Table 2 CIFAR-10 model, batch 128, B=3')]


def is_generation(setting: Setting) -> bool:
  return config_lib.task_name(setting.config) == 'generation'


REMAT_POLICY = 'nothing_saveable'  # The `baseline_remat` row's policy where the config sets none.
COMPILE_SWEEP = (2, 3, 6)  # Numbers of blocks whose step's compile time is reported at the setting's depth.


def variants(setting: Setting, randaugment: bool = False) -> list[str]:
  if is_generation(setting):
    return ['baseline', 'baseline_remat', 'dblock_mix', 'sample_baseline', 'sample_dblock']
  config = variant_config(setting.config, kind='dblock')
  num_blocks = config_lib.num_blocks(config)
  stacked = len(set(config.model.layers_per_block)) <= 1
  sweep = [f'compile_B{n}' for n in COMPILE_SWEEP if config.model.num_layers % n == 0]
  tied = stacked and not config.model.independent_blocks and not config.parallel_blocks  # What can be weight-tied.
  out = ['baseline', 'baseline_remat', 'dblock_mix', *(['dblock_offload'] if stacked else []),
         *(['weight_tied'] if tied else []),
         *(f'dblock_block{b}' for b in range(num_blocks)), 'eval_baseline', 'eval_dblock', *sweep]
  return out + (['baseline+randaugment', 'dblock_mix+randaugment'] if randaugment else [])


def variant_config(config, *, kind: str, randaugment: bool = False):
  """A copy of a setting's config for one row: the model kind ('vit'/'dblock', or for generation settings
  their 'dit'/'dit_dblock'), RandAugment on if asked (or already)."""
  c = config.copy_and_resolve_references()
  if config_lib.task_name(config) == 'generation':
    kind = {'vit': 'dit', 'dblock': 'dit_dblock'}.get(kind, kind)
  c.model.kind, c.data.randaugment = kind, c.data.randaugment or randaugment
  return c


def synthetic_data(setting: Setting, seed: int = 0) -> input_pipeline.Dataset:
  """Random (not constant) uint8 images: four training batches, one evaluation batch."""
  rng = np.random.default_rng(seed)
  shape = (setting.image_size, setting.image_size, setting.channels)
  images = lambda n: rng.integers(0, 256, (n, *shape), dtype=np.uint8)
  labels = lambda n: rng.integers(0, setting.num_classes, n, dtype=np.int32)
  n_train, n_test = 4 * setting.config.train.batch_size, setting.config.eval.batch_size
  return input_pipeline.Dataset(images(n_train), labels(n_train), images(n_test), labels(n_test),
                                setting.num_classes, f'synthetic_{setting.name}')


def step_memory(exp: experiment.Experiment, block: int | None = None,
                compiler_options: dict | None = None) -> dict[str, int | None]:
  """Compiled memory of one training step (state donated, batch already augmented); nothing runs."""
  return memory_fields(memory.compile_step(exp, block=block, compiler_options=compiler_options))


def window_times(run_window: Callable[[], Any], windows: int) -> list[float]:
  """Seconds per window after one warm-up window; each window ends synchronised."""
  jax.block_until_ready(run_window())
  times = []
  for _ in range(windows):
    start = time.perf_counter()
    jax.block_until_ready(run_window())
    times.append(time.perf_counter() - start)
  return times


def _time_train(exp: experiment.Experiment, block: int | None, windows: int, num_steps: int, options,
                states: dict[str, Any]):
  # Rows of one model kind pass the (donated) state on: one initialisation per kind, not per row. A state in
  # other memory (offloaded blocks) is a kind of its own.
  kind = (exp.config.model.kind + ('_offload' if exp.config.train.offload_idle_blocks else '')
          + ('_tied' if exp.config.model.weight_tied else ''))
  state = states.pop(kind) if kind in states else exp.init_state()
  arrays = tuple(jax.device_put(a) for a in exp.data.train_arrays())
  start = time.perf_counter()
  compiled = train.make_train_chunk(exp, block=block).lower(state, arrays, num_steps).compile(options)
  compile_s = time.perf_counter() - start

  def run_window():
    nonlocal state
    state, metrics = compiled(state, arrays)
    return state, metrics

  times = window_times(run_window, windows)
  states[kind] = state
  return times, compile_s, exp.config.train.batch_size, memory_fields(compiled)


def _compile_only(exp: experiment.Experiment, num_steps: int, options):
  """Compile time of the training chunk on abstract inputs (nothing runs): the program's cost in B."""
  arrays = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in exp.data.train_arrays())
  start = time.perf_counter()
  compiled = train.make_train_chunk(exp).lower(exp.abstract_state, arrays, num_steps).compile(options)
  return [float('nan')], time.perf_counter() - start, exp.config.train.batch_size, memory_fields(compiled)


def state_bytes(exp: experiment.Experiment) -> dict[str, int]:
  """Bytes of the train state by where it lives (`tree_bytes`)."""
  return tree_bytes(exp.abstract_state)


def _time_eval(exp: experiment.Experiment, windows: int, num_steps: int, options, states: dict[str, Any]):
  """Evaluation img/s: the baseline's forward or the N=B-step classification sampler on test images."""
  predict = classification.make_predict_fn(exp.graphdef, exp.config)
  data_config = exp.config.data
  fn = jax.jit(lambda p, x, k: predict(p, input_pipeline.normalize(x, data_config), k))
  return _time_inference(exp, fn, exp.data.test_images, windows, num_steps, options, states)


def _time_sample(exp: experiment.Experiment, windows: int, num_steps: int, options, states: dict[str, Any]):
  """Sampling img/s: the config's image sampler (default 50 steps, guidance) on a batch of test labels."""
  fn = jax.jit(generation.make_sample_fn(exp.graphdef, exp.config, exp.data))
  return _time_inference(exp, fn, exp.data.test_labels, windows, num_steps, options, states)


def _time_inference(exp: experiment.Experiment, fn, inputs: np.ndarray, windows: int, num_steps: int, options,
                    states: dict[str, Any]):
  """`num_steps` calls of jitted fn(params, inputs, key) per window, with the kind's trained state if any."""
  kind = exp.config.model.kind
  params = (states[kind] if kind in states else exp.init_state()).params
  inputs = jax.device_put(inputs)
  key = jax.random.key(0)
  start = time.perf_counter()
  compiled = fn.lower(params, inputs, key).compile(options)
  compile_s = time.perf_counter() - start
  run_window = lambda: [compiled(params, inputs, jax.random.fold_in(key, i)) for i in range(num_steps)]
  return window_times(run_window, windows), compile_s, len(inputs), memory_fields(compiled)


def _runtime_peak() -> int | None:
  stats = jax.local_devices()[0].memory_stats()  # None on CPU.
  return None if not stats or 'peak_bytes_in_use' not in stats else int(stats['peak_bytes_in_use'])


def run_variant(setting: Setting, variant: str, data: input_pipeline.Dataset, *, windows: int,
                steps_per_window: int, isolated: bool = False, compiler_options: dict | None = None,
                states: dict[str, Any] | None = None) -> dict[str, Any]:
  """One row: 'baseline', 'baseline_remat', 'dblock_mix', 'dblock_block<b>', 'eval_<kind>', optionally
  '+randaugment'.

  `compiler_options` (XLA debug options) exist for tests: LLVM settings speed up CPU compiles without
  changing buffer assignment, so the memory figures stay exact while the timings lose meaning.
  `states` (model kind -> TrainState) carries states between the rows of one setting.
  """
  states = {} if states is None else states
  name, randaugment = variant.removesuffix('+randaugment'), variant.endswith('+randaugment')
  kind = 'vit' if 'baseline' in name else 'dblock'
  block = int(name.removeprefix('dblock_block')) if name.startswith('dblock_block') else None
  config = variant_config(setting.config, kind=kind, randaugment=randaugment)
  config.train.offload_idle_blocks = name == 'dblock_offload'
  config.model.weight_tied = name == 'weight_tied'  # One row of block parameters for all B slices.
  if name.startswith('baseline'):  # The baseline row without rematerialisation, `baseline_remat` with it.
    config.model.remat = (config.model.remat or REMAT_POLICY) if name == 'baseline_remat' else ''
  if name.startswith('compile_B'):  # Same depth, another number of blocks.
    config.model.num_blocks, config.model.layers_per_block = int(name.removeprefix('compile_B')), ()
  mesh = sharding.make_mesh(config, devices=jax.local_devices()[:1])
  exp = experiment.experiment_from_data(config, data, mesh=mesh)
  if name.startswith('sample'):
    times, compile_s, batch, memory = _time_sample(exp, windows, steps_per_window, compiler_options, states)
  elif name.startswith('eval'):
    times, compile_s, batch, memory = _time_eval(exp, windows, steps_per_window, compiler_options, states)
  elif name.startswith('compile_B'):
    times, compile_s, batch, memory = _compile_only(exp, steps_per_window, compiler_options)
  else:
    times, compile_s, batch, memory = _time_train(exp, block, windows, steps_per_window, compiler_options,
                                                  states)
  seconds = statistics.median(times) / steps_per_window
  m = config.model
  return dict(
      config=setting.name, note=setting.note, variant=variant, phase='eval' if name.startswith(('eval', 'sample')) else 'train',
      model_kind=config.model.kind, block='mix' if name in ('dblock_mix', 'dblock_offload', 'weight_tied') else block,
      offload_idle_blocks=bool(config.train.offload_idle_blocks), remat=m.remat, dtype=m.compute_dtype, batch=batch,
      image_size=setting.image_size, channels=setting.channels, num_classes=setting.num_classes,
      hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
      patch_size=m.patch_size, num_blocks=exp.num_blocks, randaugment=bool(config.data.randaugment),
      num_params=sum(int(np.prod(a.shape)) for a in jax.tree.leaves(exp.abstract_state.params)),
      ms_per_step=1e3 * seconds, img_per_s=batch / seconds, window_s=times, windows=windows,
      steps_per_window=steps_per_window, compile_s=compile_s, **memory, **state_bytes(exp),
      runtime_peak_bytes=_runtime_peak(),
      runtime_peak_isolated=isolated, device_kind=jax.local_devices()[0].device_kind,
      backend=jax.default_backend(), jax_version=jax.__version__)


def run(settings: list[Setting], *, windows: int, steps_per_window: int,
        randaugment: bool = False, compiler_options: dict | None = None) -> list[dict[str, Any]]:
  """Every row of every setting in this process (runtime peaks are then cumulative)."""
  records = []
  for setting in settings:
    data, states = synthetic_data(setting), {}
    for variant in variants(setting, randaugment):
      records.append(run_variant(setting, variant, data, windows=windows, steps_per_window=steps_per_window,
                                 compiler_options=compiler_options, states=states))
  return records


def _run_isolated(settings: list[Setting], randaugment: bool) -> list[dict[str, Any]]:
  """Each row in a fresh process, so its runtime peak is its own. Never touches a device itself."""
  forwarded = [a for a in sys.argv[1:] if not a.startswith(('--json', '--isolate', '--noisolate', '--only'))]
  records = []
  for i, setting in enumerate(settings):
    for variant in variants(setting, randaugment):
      with tempfile.NamedTemporaryFile(suffix='.json') as f:
        subprocess.run([sys.executable, '-m', 'diffblocks_jax.tools.bench', *forwarded, f'--only={i}:{variant}',
                        f'--json={f.name}'], check=True)
        records += json.loads(pathlib.Path(f.name).read_text())
  return records


def format_table(records: list[dict[str, Any]]) -> str:
  mib = lambda b: '-' if b is None else f'{b / MIB:.1f}'
  num = lambda x, width, decimals: f'{"-":>{width}}' if x != x else f'{x:>{width}.{decimals}f}'  # NaN: not run.
  width = max([len('setting'), *(len(r['config']) for r in records)])
  lines = [f'{"setting":<{width}} {"row":<24} {"params":>12} {"ms/step":>9} {"img/s":>10} {"temp MiB":>9} '
           f'{"peak MiB":>9} {"state dev MiB":>13} {"state host MiB":>14} {"compile s":>9}']
  for r in records:
    lines.append(f'{r["config"]:<{width}} {r["variant"]:<24} {r["num_params"]:>12,} {num(r["ms_per_step"], 9, 2)} '
                 f'{num(r["img_per_s"], 10, 1)} {mib(r["temp_bytes"]):>9} {mib(r["runtime_peak_bytes"]):>9} '
                 f'{mib(r["state_device_bytes"]):>13} {mib(r["state_host_bytes"]):>14} {r["compile_s"]:>9.1f}')
  return '\n'.join(lines)


def _settings() -> tuple[list[Setting], int, int]:
  """The settings to run and the default (windows, steps per window) for them."""
  if _CONFIG.value is not None:
    name = config_flags.get_config_filename(flags.FLAGS['config'])
    config = _CONFIG.value
    config.mesh.data = 1
    return [Setting(name, config, _IMAGE_SIZE.value, _CHANNELS.value, _NUM_CLASSES.value, '--config')], 5, 20
  return {'release': (release_suite(), 5, 20), 'tiny': (tiny_suite(), 2, 2), 'dit': (dit_suite(), 3, 5)}[_SUITE.value]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  settings, windows, num_steps = _settings()
  windows, num_steps = _WINDOWS.value or windows, _STEPS.value or num_steps
  if _ONLY.value:
    index, variant = _ONLY.value.split(':', 1)
    setting = settings[int(index)]
    records = [run_variant(setting, variant, synthetic_data(setting), windows=windows,
                           steps_per_window=num_steps, isolated=True)]
  elif _ISOLATE.value:
    records = _run_isolated(settings, _RANDAUGMENT.value)
  else:
    records = run(settings, windows=windows, steps_per_window=num_steps, randaugment=_RANDAUGMENT.value)
  if not _ONLY.value:
    print(format_table(records))
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(records, f, indent=1)


if __name__ == '__main__':
  app.run(main)
