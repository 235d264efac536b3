"""What the tests share: where the repository is, the hang guard, the one CLI runner, the environment of a
subprocess (with a shared persistent XLA cache when asked), and the config builders.

  ROOT                                  the repository root (pathlib.Path)
  HANG_GUARD_S                          how long a subprocess may run before a test calls it hung
  cli_command(*args) -> list[str]       `python -m diffblocks_jax.main ARGS` (for Popen)
  run_cli(*args, env=None, cwd=ROOT)    runs it to the end: a CompletedProcess with stdout and stderr as text
  LONG_TESTS                            DIFFBLOCKS_LONG_TESTS=1: the opt-in tests run (marker `long`)
  FAST_XLA_FLAGS, xla_flags(flags)     XLA's cheaper CPU compilation, on in every test process and subprocess
  subprocess_env(**extra)               os.environ on the CPU, quiet TensorFlow, no traceback override
  cached_env(cache_dir, **extra)        the same with one persistent XLA cache shared by the runs that get it
  share_compilation_cache()             one persistent XLA cache for the whole session (conftest.py calls it)
  tiny_config(kind, data, **overrides)  a small config of any model kind on the digits, CIFAR-100 or text data
  base_config(kind, **overrides)        config.get_base_config() at its full size, with a kind
  shipped_config(name, **overrides)     configs/<name> ('file.py' or 'file.py:arg') as shipped
  override(config, **overrides)         dotted fields with '__' for '.', e.g. model__num_blocks=1

Tests import it as `helpers` (pytest puts tests/ on sys.path; the scripts that run a test file as a subprocess
start there too).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]

# How long a subprocess may run before a test calls it hung: a guard against deadlocks, not a speed limit, so
# generous that a slow or shared machine never trips it (tests assert no timings).
HANG_GUARD_S = 1800

# The tiny image models' inputs: 8x8 RGB images, patch 4 -> 4 patches (+1 label/CLS token); 5 classes.
TINY_DIMS = dict(image_size=8, channels=3, num_classes=5)


# ----------------------------------------------------------------------------------------------- subprocesses

# diffblocks_jax.cli.TRACEBACK_ENV (named here so that a subprocess test need not import the CLI; test_main.py
# checks that the two agree).
TRACEBACK_ENV = 'DIFFBLOCKS_TRACEBACK'


# The opt-in long tests (marked `long`, skipped otherwise by conftest.py): trainings to a target, every kill point.
LONG_TESTS = os.environ.get('DIFFBLOCKS_LONG_TESTS') == '1'


# At the tests' sizes a CPU spends its time compiling, not computing: XLA's cheaper CPU settings roughly halve a
# tiny run (the operations are the same; runs compared bit for bit get the same flags). conftest.py puts them in the
# pytest process's XLA_FLAGS before JAX starts, and every subprocess gets them (`subprocess_env`).
FAST_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def xla_flags(flags: str = '') -> str:
  """`flags` (e.g. '--xla_force_host_platform_device_count=3') with FAST_XLA_FLAGS, once."""
  return flags if FAST_XLA_FLAGS in flags else f'{flags} {FAST_XLA_FLAGS}'.strip()


def subprocess_env(**extra: str) -> dict[str, str]:
  """os.environ for a subprocess: on the CPU, TensorFlow's C++ logs off, the CLI's own error messages (the
  variable that turns user errors into tracebacks, TRACEBACK_ENV, is not inherited); `extra` on top, its XLA_FLAGS
  with FAST_XLA_FLAGS."""
  env = {k: v for k, v in os.environ.items() if k != TRACEBACK_ENV}
  env.update(JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  env.update(extra)
  env['XLA_FLAGS'] = xla_flags(env.get('XLA_FLAGS', ''))
  return env


# What makes JAX keep every compiled program in a persistent cache, whatever its size or compile time.
_CACHE_ENV = dict(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
SESSION_CACHE_ENV = 'DIFFBLOCKS_TEST_XLA_CACHE'  # The session's cache folder, made once by the first process.


def share_compilation_cache() -> str | None:
  """One persistent XLA cache for the whole test session: the pytest processes (xdist's workers inherit the
  controller's environment) and every subprocess they start. Many tests compile the same tiny programs (the
  CLI runs of one config, the same step in several files); a hit loads the executable the first compile wrote,
  so results are the same bits. A fresh folder per session: nothing carries over between sessions. Returns the
  folder if this process made it (the one to remove it at the end), else None."""
  made = None
  if SESSION_CACHE_ENV not in os.environ:
    made = os.environ[SESSION_CACHE_ENV] = tempfile.mkdtemp(prefix='diffblocks-test-xla-')
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.environ[SESSION_CACHE_ENV])
  for name, value in _CACHE_ENV.items():
    os.environ.setdefault(name, value)
  return made


def cached_env(cache_dir, **extra: str) -> dict[str, str]:
  """subprocess_env with one persistent XLA cache in `cache_dir`: runs that share it compile once (a cache hit
  loads the same executable, so bit-for-bit comparisons between the runs still hold)."""
  return subprocess_env(JAX_COMPILATION_CACHE_DIR=str(cache_dir), **_CACHE_ENV, **extra)


def cli_command(*args) -> list[str]:
  """The command line of `python -m diffblocks_jax.main ARGS`, for a test that drives the process itself."""
  return [sys.executable, '-m', 'diffblocks_jax.main', *map(str, args)]


def run_cli(*args, env: dict[str, str] | None = None, cwd=ROOT, **kw) -> subprocess.CompletedProcess:
  """Runs `python -m diffblocks_jax.main ARGS` in `cwd` to the end (env: subprocess_env() unless given) and returns
  its exit status, stdout and stderr (text). `kw` goes to subprocess.run (timeout: the hang guard)."""
  kw.setdefault('timeout', HANG_GUARD_S)
  return subprocess.run(cli_command(*args), cwd=cwd, env=subprocess_env() if env is None else env,
                        capture_output=True, text=True, **kw)


# ----------------------------------------------------------------------------------------------- configs

def override(config, **overrides):
  """Sets dotted fields, '__' for '.' (`model__num_blocks=1`, `seed=3`); an unknown field is a KeyError."""
  for name, value in overrides.items():
    *path, leaf = name.split('__')
    node = config
    for part in path:
      node = node[part]
    if leaf not in node:
      raise KeyError(f'unknown config field {name!r}')
    node[leaf] = value
  return config


def base_config(kind: str | None = None, **overrides):
  """config.get_base_config() as it is (the full-size models, CIFAR-100-sized), with `kind` and `overrides`."""
  from diffblocks_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.get_base_config()
  if kind is not None:
    c.model.kind = kind
  return override(c, **overrides)


# Each data family's fields in a tiny config: the source, its normalisation, no augmentation.
_TINY_DATA = {
    'digits': dict(source='digits', mean=(0.305,), std=(0.375,)),  # The digits' pixel statistics (configs/common).
    'cifar': dict(source='tfds', name='cifar100'),  # With CIFAR-100's statistics (configs/common), below.
    'text': dict(source='pydoc'),
}
# The tiny models: images hidden 24, 2 heads, 3 layers (one per block for B=3), MLP 32, patch 4; text hidden 16
# (head width 8, even for rotary positions), 2 heads, 2 layers in 2 blocks, MLP 2x, no dropout.
_TINY_MODEL = {
    'image': dict(hidden_size=24, num_heads=2, num_layers=3, num_blocks=3, mlp_dim=32, patch_size=4),
    'text': dict(hidden_size=16, num_heads=2, num_layers=2, num_blocks=2, mlp_ratio=2, dropout=0.0),
}

# config.model.recurrent of the recurrent-depth kinds: 1 prelude and 1 coda layer; 'rd' unrolls its block 1 +
# Poisson(1) times (E[r] = 2), backpropagating through the last unroll.
_TINY_RECURRENT = {
    'rd': dict(prelude_layers=1, coda_layers=1, mean_depth=2.0, backprop_depth=1, min_depth=1,
               depth_distribution='poisson', depth_sigma=0.5),
    'rd_dblock': dict(prelude_layers=1, coda_layers=1),
}


def tiny_config(kind: str = 'dblock', data: str = 'digits', **overrides):
  """A small config that runs in well under a second on a CPU: a tiny model of `kind` for `data` ('digits' or
  'cifar': images, 'text': the pydoc corpus), batches of 8, one epoch, one step per compiled call, no
  augmentation. `overrides` are dotted fields with '__' for '.', e.g. `model__num_blocks=1`."""
  c = base_config(kind)
  c.model.update(_TINY_MODEL['text' if data == 'text' else 'image'])
  c.data.update(_TINY_DATA[data])
  if data == 'cifar':
    from configs import common  # pylint: disable=g-import-not-at-top
    c.data.mean, c.data.std = common.CIFAR100_MEAN, common.CIFAR100_STD
  c.data.pad_crop, c.data.flip = 0, False
  c.train.batch_size, c.train.num_epochs, c.train.steps_per_call = 8, 1, 1
  c.eval.batch_size = 4
  if kind in _TINY_RECURRENT:  # Recurrent depth (models/recurrent.py): its sub-dict, and one weight-tied block.
    c.model.recurrent = dict(_TINY_RECURRENT[kind])
    c.model.weight_tied = kind.endswith('_dblock')
  return override(c, **overrides)


def shipped_config(name: str, **overrides):
  """configs/<name> as shipped ('digits_vit.py', 'testing.py:vit', 'text_ar_dblock.py:recipe=tuned'), then
  `overrides` (dotted fields, '__' for '.')."""
  from diffblocks_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  return override(config_lib.load_file(str(ROOT / 'configs' / name)), **overrides)


def judged_by(config):
  """What `generation.load_classifier` and `language.load_scorer` ask of an experiment, for `config` alone: its
  config, the judge loader and placement (no data, no model built)."""
  from diffblocks_jax.training import experiment  # pylint: disable=g-import-not-at-top
  return types.SimpleNamespace(config=config, on_device=lambda tree: tree,
                               load_judge=lambda field, **checks: experiment.load_judge(config, field, **checks))
