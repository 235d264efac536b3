"""Memory planner: what one training step needs on one device, end to end against DiffusionBlocks, with and
without rematerialisation, before renting a GPU.

  python -m diffblocks_jax.tools.memory --config=configs/cifar100_dblock.py [--device_memory=80GiB]
      [--json=FILE] [--image_size=.. --channels=.. --num_classes=.. | --vocab_size=..] [--measure]

The training step is compiled ahead of time from abstract shapes (`jax.eval_shape`; nothing is allocated, so a
1B-parameter config plans on a CPU) and XLA's compiled memory analysis of it is read. Rows (`ROWS`): end to end;
end to end + remat (each layer under `jax.checkpoint`, 'nothing_saveable'); DiffusionBlocks (the config's B);
DiffusionBlocks + remat; DiffusionBlocks + offload (train.offload_idle_blocks: the block stacks in host memory);
one block job (a run that trains one block while the others are not on the device, planned as the block step of
a one-block model: the outer parts plus the deepest block's layers, B = 1). The remat rows are estimated from
compiled steps (`plan_remat`: XLA's CPU compiler does not keep remat's saving). Per row: parameters and optimizer
state on the device, activations/temporaries (XLA's temporary buffers of the step), the batch, the total
(arguments + outputs − donated aliases + temporaries), its ratio to end to end, and which device memories it fits.

Per device, with the whole of config.train.batch_size on that device: for D data-parallel devices pass
--config.train.batch_size=<global batch / D>. The figures are XLA's buffer assignment for the backend that
compiles (on a CPU, XLA's CPU compiler, which fuses less than the GPU's), not a runtime measurement.
`--measure` also runs each compiled row here and prints its measured peak against the plan (small configs only);
docs/memory.md has the figures.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from diffblocks_jax import config as config_lib
from diffblocks_jax.data import dataset, input_pipeline, text, tokenizer
from diffblocks_jax.tasks import registry
from diffblocks_jax.training import experiment, sharding, train

MEMORY_FIELDS = ('temp', 'argument', 'output', 'alias', 'generated_code')
GIB = 2**30
DEFAULT_REMAT = 'nothing_saveable'  # The policy the remat rows estimate (`plan_remat`).
FITS = ('24GB', '40GB', '80GB')  # The device memories checked when --device_memory is not given.
# CPU compiles for planning: LLVM's optimisation level changes generated code, not buffer assignment.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}

# Data dimensions of the data sets the shipped configs name: the planner loads no data set that needs a download
# (a CPU plans what it cannot store). config.data.name (TFDS) or a text file's name -> dims.
KNOWN_DIMS = {
    'cifar10': dict(image_size=32, channels=3, num_classes=10),
    'cifar100': dict(image_size=32, channels=3, num_classes=100),
    'tiny-imagenet-200': dict(image_size=64, channels=3, num_classes=200),
    'text8': dict(vocab_size=27),  # 26 letters and the space.
}
OFFLINE_SOURCES = ('digits', 'pydoc')  # Small and on this machine: loaded, so the planned dims are exact.


# ------------------------------------------------------------------------------------------- sizes

_UNITS = {'': 1, 'b': 1, 'kb': 10**3, 'mb': 10**6, 'gb': 10**9, 'tb': 10**12,
          'kib': 2**10, 'mib': 2**20, 'gib': 2**30, 'tib': 2**40}


def parse_size(text_: str) -> int:
  """Bytes of '80GiB', '40GB', '24e9', '512 MiB' (GB = 10⁹ bytes, GiB = 2³⁰); a ValueError naming the fix."""
  match = re.fullmatch(r'\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*', str(text_))
  unit = match and match.group(2).lower()
  if not match or unit not in _UNITS or float(match.group(1)) <= 0:
    raise ValueError(f'--device_memory={text_!r} is not a memory size: write a positive number with a unit, '
                     'e.g. 80GiB, 40GB, 24e9 (bytes)')
  return int(float(match.group(1)) * _UNITS[unit])


def fmt_size(num_bytes: float | None, unit: int = GIB) -> str:
  return '-' if num_bytes is None else f'{num_bytes / unit:.2f}'


# ------------------------------------------------------------------------------------------- compiled memory

def memory_fields(compiled) -> dict[str, int | None]:
  """XLA's compiled memory analysis of a program, as `<field>_bytes` (None where the backend gives none)."""
  analysis = compiled.memory_analysis()
  get = lambda k: None if analysis is None else int(getattr(analysis, f'{k}_size_in_bytes'))
  return {f'{k}_bytes': get(k) for k in MEMORY_FIELDS}


def compiled_host_arguments(compiled) -> int:
  """Host-memory argument bytes that the backend's analysis reports apart (0 where it counts them in)."""
  return int(getattr(compiled.memory_analysis(), 'host_argument_size_in_bytes', 0) or 0)


def tree_bytes(tree, prefix: str = 'state') -> dict[str, int]:
  """Bytes of a tree of (abstract) arrays by where they live, per device: the device, or host memory
  (offloaded block stacks)."""
  out = {f'{prefix}_device_bytes': 0, f'{prefix}_host_bytes': 0}
  for leaf in jax.tree.leaves(tree):
    where = 'device' if leaf.sharding.memory_kind in (None, 'device') else 'host'
    out[f'{prefix}_{where}_bytes'] += int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
  return out


def step_batch(exp: experiment.Experiment) -> tuple[Any, Any]:
  """The abstract (inputs, targets) of one training step, as the task makes them from a batch of rows (images
  augmented, token windows as int32): any task, nothing computed."""
  c = exp.config
  rows = tuple(jax.ShapeDtypeStruct((c.train.batch_size, *a.shape[1:]), jnp.int32 if a.ndim == 1 else a.dtype)
               for a in exp.data.train_arrays())
  return jax.eval_shape(lambda key, rows: exp.task.train_batch(key, rows, c.data), jax.random.key(0), rows)


def compile_step(exp: experiment.Experiment, *, block: int | None = None, compiler_options: dict | None = None):
  """The config's training step compiled on abstract shapes (state donated, batch already augmented); nothing
  is allocated or run."""
  step = train.make_train_step(exp, block=block)
  return jax.jit(step, donate_argnums=0).lower(exp.abstract_state, *step_batch(exp)).compile(compiler_options)


# ------------------------------------------------------------------------------------------- the data's shapes

def data_dims(config, **given: int | None) -> dict[str, int]:
  """The data dimensions the model is built with: `given` (flags) over the known data sets (KNOWN_DIMS); a
  ConfigError naming the flags to pass where neither knows them."""
  family = registry.kind(config.model.kind).data
  needed = [d for d in registry.DATA_DIMS[family] if d != 'seq_len']  # The text length is config.data.seq_len.
  d = config.data
  known = KNOWN_DIMS.get(d.name or d.path.rstrip('/').split('/')[-1], {})
  if family == 'text' and d.vocab == 'byte':
    known = dict(vocab_size=256)
  elif family == 'text' and d.vocab == 'tokenizer':  # Its file is small: read its size rather than ask for it.
    known = dict(vocab_size=d.vocab_size or tokenizer.Tokenizer(d.tokenizer).size)
  dims = {k: given.get(k) or known.get(k) for k in needed}
  missing = [k for k, v in dims.items() if not v]
  if missing:
    raise config_lib.ConfigError(
        f'the planner loads no data and does not know the {" and ".join(missing)} of config.data '
        f'(source {d.source!r}, name {d.name!r}, path {d.path!r}): pass {" ".join(f"--{k}=N" for k in missing)}')
  return dims


def planning_data(config, **given: int | None):
  """A dataset of the config's shapes: the data set itself for the small offline sources, else zeros of one
  training batch (nothing read from disk)."""
  if config.data.source in OFFLINE_SOURCES and not any(given.values()):
    return input_pipeline.load_dataset(config.data)
  dims, rows = data_dims(config, **given), config.train.batch_size
  if 'vocab_size' in dims:
    vocab = None if config.data.vocab == 'byte' else tuple(chr(0x100 + i) for i in range(dims['vocab_size']))
    dtype = np.uint8 if dims['vocab_size'] <= 256 else np.int32
    zeros = lambda n: np.zeros((n, config.data.seq_len), dtype)
    return text.TextDataset(zeros(rows), zeros(1), vocab, 'planning')
  shape = (dims['image_size'], dims['image_size'], dims['channels'])
  images = lambda n: np.zeros((n, *shape), np.uint8)
  labels = lambda n: np.zeros((n,), np.int32)
  return dataset.Dataset(images(rows), labels(rows), images(1), labels(1), dims['num_classes'], 'planning')


# ------------------------------------------------------------------------------------------- rows

@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  blockwise: bool
  remat: bool = False
  offload: bool = False
  one_block: bool = False


ROWS = (Row('end to end', False), Row('end to end + remat', False, remat=True),
        Row('DiffusionBlocks', True), Row('DiffusionBlocks + remat', True, remat=True),
        Row('DiffusionBlocks + offload', True, offload=True), Row('one block job', True, one_block=True))


def paired_kinds(kind: str) -> dict[bool, str]:
  """{blockwise: kind}: the config's kind and its counterpart (`registry.counterpart`: 'vit' for 'dblock', 'cnn'
  for 'cnn_dblock')."""
  this, other = registry.kind(kind), registry.counterpart(kind)
  if other is None:
    raise config_lib.ConfigError(f'config.model.kind={kind!r} has no {"end-to-end" if this.blockwise else "block-wise"}'
                                 ' counterpart in tasks/registry.py to plan against')
  return {this.blockwise: kind, not this.blockwise: other}


def _refused(kind: registry.Kind, model_config, **fields) -> bool:
  """Whether one of the kind's own rules refuses `model_config` with `fields` set."""
  m = model_config.copy_and_resolve_references()
  m.update(fields)
  return any(rule(m) for rule in kind.model_rules)


def row_config(config, row: Row):
  """The config of one row, remat off (remat rows are estimated: `plan_remat`): its kind, offload; one device;
  one block for a one-block job."""
  c = config.copy_and_resolve_references()
  c.model.kind = paired_kinds(config.model.kind)[row.blockwise]
  kind = registry.kind(c.model.kind)  # Settings of the other kind that this one refuses; no memory depends on them.
  if c.diffusion.noise_plan not in kind.noise_plans:
    c.diffusion.noise_plan = kind.noise_plans[0]
  if c.eval.solver not in kind.solvers:
    c.eval.solver = kind.solvers[0]
  if not kind.blockwise:
    c.model.weight_tied = False  # An end-to-end kind has no blocks to tie.
  elif not c.model.weight_tied and _refused(kind, c.model) and not _refused(kind, c.model, weight_tied=True):
    c.model.weight_tied = True  # A kind that is weight-tied by definition ('rd_dblock', the recurrent block).
  c.model.remat = ''
  c.train.offload_idle_blocks = row.offload
  c.mesh.data, c.parallel_blocks = 1, False
  if row.one_block:
    from diffblocks_jax import models  # pylint: disable=g-import-not-at-top
    counts = models.partition_layers(c.model.num_layers, c.model.num_blocks, c.model.layers_per_block)
    c.model.num_layers, c.model.num_blocks, c.model.layers_per_block = max(counts), 1, ()
  return c


def _experiment(c, data) -> experiment.Experiment:
  return experiment.experiment_from_data(c, data, mesh=sharding.make_mesh(c, devices=jax.local_devices()[:1]))


def plan_row(config, row: Row, data, *, compiler_options: dict | None = FAST_COMPILE) -> dict[str, Any]:
  """One row's figures (bytes per device) from the compiled step (remat rows: `plan_remat`); `skipped` names why
  a row does not apply."""
  c = row_config(config, row)
  base = dict(row=row.name, kind=c.model.kind, remat='', num_blocks=config_lib.num_blocks(c),
              num_layers=c.model.num_layers, batch=c.train.batch_size)
  if row.offload and len(set(c.model.layers_per_block)) > 1:
    return dict(base, skipped='offload needs blocks of equal depth (stacked)')
  start = time.perf_counter()
  exp = _experiment(c, data)
  compiled = compile_step(exp, compiler_options=compiler_options)
  fields = memory_fields(compiled)
  state = exp.abstract_state
  params, opt = tree_bytes(state.params, 'params'), tree_bytes(state.opt_state, 'optimizer')
  batch = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(step_batch(exp)))
  # What the device holds at the step's peak: its arguments (state, batch) and outputs, the donated state
  # counted once, and the temporaries (activations kept for the backward pass, gradients, scratch). A backend
  # that reports host-memory arguments apart has them out of argument_bytes already; the CPU counts them in.
  host = params['params_host_bytes'] + opt['optimizer_host_bytes']
  total = fields['argument_bytes'] + fields['output_bytes'] - fields['alias_bytes'] + fields['temp_bytes']
  total -= host if not compiled_host_arguments(compiled) else 0
  return dict(base, **fields, **params, **opt, batch_bytes=batch, total_bytes=total,
              host_state_bytes=host, num_params=sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state.params)),
              compile_s=time.perf_counter() - start)


def layer_input_bytes(exp: experiment.Experiment) -> int:
  """Bytes of one layer's input, read off the traced step of a config with remat on (nothing compiled): the last
  output of a rematerialised layer's backward pass is the gradient of its input, of the input's shape."""
  jaxpr = jax.make_jaxpr(train.make_train_step(exp))(exp.abstract_state, *step_batch(exp)).jaxpr

  def find(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'remat2' and eqn.params.get('differentiated'):
        return eqn.outvars[-1].aval
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        found = find(sub)
        if found is not None:
          return found
    return None

  aval = find(jaxpr)
  return int(np.prod(aval.shape)) * aval.dtype.itemsize


def plan_remat(config, row: Row, plain: dict[str, Any], data, *,
               compiler_options: dict | None = FAST_COMPILE) -> dict[str, Any]:
  """A remat row ('nothing_saveable'), estimated from compiled steps: XLA's CPU compiler schedules the
  recomputation of unrolled layers with the forward pass, so its analysis of a remat step shows no saving
  (docs/memory.md). The step of the same model one layer deep (per block) holds one layer's activations; each
  further layer adds what remat keeps of it: its input, and its parameters' gradient.

    temp(L) = temp(1 layer) + (L − 1) · (layer input + one layer's parameter bytes)

  with L the layers the step runs (all end to end, the deepest block's block-wise); the rest of the row (state,
  batch) is the plain row's."""
  if 'skipped' in plain:
    return dict(plain, row=row.name)
  c = row_config(config, row)
  from diffblocks_jax import models  # pylint: disable=g-import-not-at-top
  counts = models.partition_layers(c.model.num_layers, c.model.num_blocks, c.model.layers_per_block) \
      if row.blockwise else [c.model.num_layers]
  start = time.perf_counter()
  shallow = c.copy_and_resolve_references()
  shallow.model.num_layers, shallow.model.layers_per_block = len(counts), ()  # One layer per block.
  if row.blockwise:
    shallow.model.num_blocks = len(counts)
  exp = _experiment(shallow, data)
  temp_one = memory_fields(compile_step(exp, compiler_options=compiler_options))['temp_bytes']
  layer_params = (plain['params_device_bytes'] + plain['params_host_bytes']
                  - tree_bytes(exp.abstract_state.params, 'p')['p_device_bytes']) // max(1, c.model.num_layers - len(counts))
  shallow.model.remat = DEFAULT_REMAT
  x_in = layer_input_bytes(_experiment(shallow, data))
  depth = max(counts)
  temp = min(plain['temp_bytes'], temp_one + (depth - 1) * (x_in + layer_params))
  return dict(plain, row=row.name, remat=DEFAULT_REMAT, temp_bytes=temp,
              total_bytes=plain['total_bytes'] - plain['temp_bytes'] + temp, layer_input_bytes=x_in,
              layer_param_bytes=layer_params, temp_one_layer_bytes=temp_one, estimated=True,
              compile_s=time.perf_counter() - start)


def plan(config, *, rows=ROWS, compiler_options: dict | None = FAST_COMPILE,
         **given: int | None) -> list[dict[str, Any]]:
  """Every row for `config` (its kind and its counterpart), each with its ratio to end to end."""
  config_lib.validate(config)
  data = planning_data(config, **given)
  records, plain = [], {}
  for row in rows:
    if row.remat:
      records.append(plan_remat(config, row, plain[row.blockwise], data, compiler_options=compiler_options))
    else:
      records.append(plan_row(config, row, data, compiler_options=compiler_options))
      if not (row.offload or row.one_block):
        plain[row.blockwise] = records[-1]
  reference = next((r['total_bytes'] for r in records if r['row'] == 'end to end' and 'total_bytes' in r), None)
  for r in records:
    r['ratio'] = r['total_bytes'] / reference if reference and 'total_bytes' in r else None
  return records


def format_table(records: list[dict[str, Any]], device_memories: dict[str, int]) -> str:
  """The planner's table per device, in GiB (MiB where every total is under 1 GiB); 'fits' lists the device
  memories the total fits in; 'host' is the state kept in host memory (offload)."""
  planned = [r for r in records if 'skipped' not in r]
  unit, name = (GIB, 'GiB') if max(r['total_bytes'] for r in planned) >= GIB else (2**20, 'MiB')
  lines = [f'{"row (" + name + " per device)":<26} {"params":>8} {"optimizer":>9} {"act/temp":>9} {"batch":>7} '
           f'{"total":>8} {"x e2e":>6} {"host":>7}  fits']
  for r in records:
    if 'skipped' in r:
      lines.append(f'{r["row"]:<26} ({r["skipped"]})')
      continue
    size = lambda field: fmt_size(r[field], unit)
    fits = [label for label, limit in device_memories.items() if r['total_bytes'] <= limit]
    lines.append(f'{r["row"]:<26} {size("params_device_bytes"):>8} {size("optimizer_device_bytes"):>9} '
                 f'{size("temp_bytes"):>9} {size("batch_bytes"):>7} {size("total_bytes"):>8} {r["ratio"]:>6.2f} '
                 f'{size("host_state_bytes"):>7}  {", ".join(fits) or "none"}')
  return '\n'.join(lines)


# ------------------------------------------------------------------------------------------- measured peaks
# The planner checked against the runtime on a CPU (docs/memory.md): each row runs in its own process, whose
# allocator returns every buffer of 64 KiB or more to the system when it is freed (glibc's mmap threshold), so
# that the resident set follows the live buffers; a thread samples it while the step runs.

MEASURE_ENV = {'MALLOC_MMAP_THRESHOLD_': '65536'}
MEASURED_ERROR_PERCENT = 5.0  # |measured − planned| / planned on the digits configs: at most 2.9 % (docs/memory.md).


def resident_bytes() -> int:
  with open('/proc/self/statm', encoding='ascii') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def measure_peak(config, row: Row, data, *, steps: int = 3) -> int:
  """Bytes the process's resident set grows by, at its highest, while the row's state and batch are built and
  `steps` steps run (everything compiled, and run once to warm up, before the baseline is read)."""
  import gc  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  c = row_config(config, row)
  exp = experiment.experiment_from_data(c, data, mesh=sharding.make_mesh(c, devices=jax.local_devices()[:1]))
  step = compile_step(exp, compiler_options=FAST_COMPILE)
  shardings = jax.tree.map(lambda a: a.sharding, exp.abstract_state)
  init = jax.jit(exp._init, out_shardings=shardings).lower().compile()  # pylint: disable=protected-access
  abstract_batch = step_batch(exp)
  make_batch = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract_batch)).lower().compile()

  def run():
    state, batch = init(), make_batch()
    for _ in range(steps):
      state, metrics = step(state, *batch)
      jax.block_until_ready((state, metrics))

  run()  # Warm-up: the runtime's own first-call allocations (thread pools) are not the step's.
  gc.collect()
  baseline, peak, done = resident_bytes(), [0], threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], resident_bytes())
      time.sleep(0.0002)

  sampler = threading.Thread(target=sample)
  sampler.start()
  try:
    run()
  finally:
    done.set()
    sampler.join()
  return max(peak[0], resident_bytes()) - baseline


def measure(records: list[dict[str, Any]]) -> list[str]:
  """'measured' lines: each compiled row's peak measured in a fresh process given this command line, against the
  plan (total plus the state in host memory, which on a CPU is the same memory)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  forwarded = [a for a in sys.argv[1:] if not a.startswith(('--json', '--measure', '--nomeasure'))]
  lines = []
  for i, r in enumerate(records):
    if 'skipped' in r or r.get('estimated'):  # Remat rows are estimates this CPU's compiler cannot check.
      continue
    out = subprocess.run([sys.executable, '-m', 'diffblocks_jax.tools.memory', *forwarded, f'--measure_row={i}'],
                         env={**os.environ, **MEASURE_ENV}, capture_output=True, text=True, check=True).stdout
    measured = int(out.strip().splitlines()[-1])
    planned = r['total_bytes'] + r['host_state_bytes']
    r['measured_bytes'] = measured
    lines.append(f'measured {r["row"]:<26} planned {planned / 2**20:9.1f} MiB, measured {measured / 2**20:9.1f} MiB, '
                 f'error {100 * (measured - planned) / planned:+.1f} %')
  return lines


# ------------------------------------------------------------------------------------------- command line

def _define_flags() -> None:
  """Flags exist only when this runs as a command (bench.py imports this module next to its own flags)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'The config to plan (its kind and its counterpart).',
                                  lock_config=True)
  flags.DEFINE_string('device_memory', None, 'Device memory to check the rows against, e.g. 80GiB or 40GB '
                      f'(default: {", ".join(FITS)}).')
  flags.DEFINE_string('json', None, 'Also write the rows here (a JSON list).')
  flags.DEFINE_bool('measure', False, 'Also run each row on this machine and compare its measured peak (small '
                    'configs only: it allocates and runs).')
  flags.DEFINE_integer('measure_row', None, 'Internal (--measure): measure row I in this process, print its bytes.')
  for name in ('image_size', 'channels', 'num_classes', 'vocab_size'):
    flags.DEFINE_integer(name, None, f'The data\'s {name}, where the planner does not know it (KNOWN_DIMS).')


def fail(message: str) -> None:
  """A user's mistake: one line on stderr, exit status 2 (as the main command line's)."""
  sys.stdout.flush()
  sys.stderr.write(f'error: {message}\n')
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """`app.run`'s flags_parser: a --device_memory that is no size is refused in one line (exit 2) before the
  config is even loaded; then absl's parsing."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  for arg in argv[1:]:
    if arg.startswith('--device_memory='):
      try:
        parse_size(arg.split('=', 1)[1])
      except ValueError as e:
        fail(str(e))
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f'{e}; pass --helpshort to see the flags')
  return []


def main(argv) -> None:
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}: flags take the form --name=value')
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  config = f.config
  if config is None:
    fail('--config is required, e.g. --config=configs/cifar100_dblock.py')
  memories = ({f.device_memory: parse_size(f.device_memory)} if f.device_memory
              else {name: parse_size(name) for name in FITS})
  dims = {name: f[name].value for name in ('image_size', 'channels', 'num_classes', 'vocab_size')}
  try:
    if f.measure_row is not None:
      print(measure_peak(config, ROWS[f.measure_row], planning_data(config, **dims)))
      return
    start = time.perf_counter()
    records = plan(config, **dims)
  except (config_lib.ConfigError, dataset.DataError) as e:
    fail(str(e).replace('\n', ' '))
  first = next(r for r in records if 'total_bytes' in r)
  print(f'{config_flags.get_config_filename(f["config"])} ({config.model.kind}): {first["num_params"] / 1e6:,.1f}M '
        f'parameters end to end; per device, batch {first["batch"]} on one device; XLA\'s compiled memory '
        f'analysis ({jax.default_backend()} compiler, jax {jax.__version__}); remat rows estimated for '
        f'{DEFAULT_REMAT!r} (plan_remat)')
  print(format_table(records, memories))
  print(f'planned in {time.perf_counter() - start:.0f} s')
  if f.measure:
    print('\n'.join(measure(records)))
  if f.json:
    with open(f.json, 'w', encoding='utf-8') as out:
      json.dump(records, out, indent=1)


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main, flags_parser=parse_flags)
