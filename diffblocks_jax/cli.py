"""The command line's side of main.py: flags parsed with short answers to mistakes, user errors in one message,
quiet libraries.

  app.run(main, flags_parser=cli.parse_flags)   # a mistyped flag, field or config file: one message, exit 2
  with cli.exit_on_user_error(): ...            # ConfigError, DataError, ...: one message, exit 2

A user's mistake (a config field, a path, a busy workdir) gets its message and exit status 2, not a traceback
that buries it; DIFFBLOCKS_TRACEBACK=1 shows the traceback anyway. Bugs keep their tracebacks.
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import logging as std_logging
import os
import re
import sys
import traceback
from typing import NoReturn

from absl import flags
from absl import logging
import ml_collections

from diffblocks_jax.training import checkpointing, locking, paths, reporting
from diffblocks_jax import config as config_lib
from diffblocks_jax.data import dataset

EXIT_USAGE = 2
# A missing workdir/config.json or checkpoint is a FileNotFoundError naming the path (config.load_workdir,
# experiment.load_trained); MeshError is a ConfigError.
USER_ERRORS = (config_lib.ConfigError, dataset.DataError, checkpointing.CheckpointError, locking.WorkdirBusyError,
               paths.WorkdirWriteError, FileNotFoundError)
TRACEBACK_ENV = 'DIFFBLOCKS_TRACEBACK'
# Libraries whose INFO lines drown the run's own (a digits run: ~800 of Orbax's among 1,036). Their warnings
# and errors still show.
QUIET_LIBRARIES = ('orbax', 'jax', 'tensorflow', 'tensorflow_datasets', 'etils', 'asyncio')


def fail(message: str) -> NoReturn:
  """Prints `error: message` on stderr and exits with status 2 (a usage error). Library tracebacks kept off
  the console (`quiet_library_logs`) are named, if any were written."""
  sys.stdout.flush()
  if reporting.details_written():
    message += f' (the libraries\' tracebacks: {reporting.DETAILS_PATH})'
  sys.stderr.write(f'error: {message}\n')
  sys.stderr.flush()
  # The error stays the last line: what fails while the interpreter exits (TensorBoard's writer flushing to the
  # same full disk in its atexit hook) goes to the details file.
  sys.unraisablehook = lambda u: reporting.write_details(
      f'{u.err_msg or "Exception ignored in"}: {u.object!r}\n'
      + ''.join(traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))
  sys.exit(EXIT_USAGE)


class _DetailsLog(std_logging.Handler):
  """Library errors with tracebacks go to reporting.DETAILS_PATH, not the console, where the one-line error names
  the failure."""

  def __init__(self):
    super().__init__(std_logging.DEBUG)
    self.setFormatter(std_logging.Formatter('%(asctime)s %(pathname)s:%(lineno)d %(levelname)s %(message)s'))

  def emit(self, record: std_logging.LogRecord) -> None:
    reporting.write_details(self.format(record))


_DETAILS = _DetailsLog()


@contextlib.contextmanager
def exit_on_user_error():
  """USER_ERRORS raised in the body end the program with their message and status 2."""
  try:
    yield
  except USER_ERRORS as e:
    if os.environ.get(TRACEBACK_ENV) == '1':
      raise
    fail(str(e))


def quiet_library_logs(quiet: bool = True, handler: std_logging.Handler | None = None) -> None:
  """Drops INFO (and debug) lines logged from QUIET_LIBRARIES' files at `handler` (default: absl's, where
  every line goes); TensorFlow's C++ logs keep warnings and up."""
  if not quiet:
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # Read when TensorFlow loads (TFDS sources only).
  folders = tuple(f'{os.sep}{name}{os.sep}' for name in QUIET_LIBRARIES)

  def keep(record: std_logging.LogRecord) -> bool:
    # absl's logger names no module, so the library is told by the file that logged the line.
    library = any(f in record.pathname for f in folders)
    if library and record.levelno >= std_logging.ERROR and record.exc_info:
      _DETAILS.handle(record)
      return False
    return record.levelno >= std_logging.WARNING or not library

  (handler or logging.get_absl_handler()).addFilter(keep)


# ----------------------------------------------------------------------------------------------- flags parsing

def parse_flags(argv: list[str]) -> list[str]:
  """`app.run`'s flags_parser: absl's parsing, with every mistake answered in one message and exit status 2.

  Before absl parses, the config is located and each `--config.<field>=` override checked against it, so an
  unknown field is named with the closest existing ones. Without `--config`, any mode reads WORKDIR/config.json
  (overrides apply on top of it): eval and sample score the run, train resumes it.
  """
  argv = list(argv)
  path, mode, workdir = (_flag_value(argv, name) for name in ('config', 'mode', 'workdir'))
  mode = mode or 'train'
  asks_help = any(re.fullmatch(r'--?(help\w*|h|\?)', a) for a in argv[1:])
  if workdir and not asks_help:
    check_workdir(workdir, writes=mode in ('train', 'merge'))
  if mode != 'merge' and _flag_value(argv, 'from') is not None and not asks_help:
    fail(f'--from names the block jobs to merge: it needs --mode=merge, not --mode={mode}')
  if mode == 'merge' and path is not None and not asks_help:
    fail('--mode=merge takes its config from the --from workdirs (block jobs of one config): drop --config')
  if path is None and mode != 'merge' and not asks_help:
    saved = os.path.join(workdir, 'config.json') if workdir else None
    if mode == 'train' and not (saved and os.path.exists(saved)):
      fail(f'--config is required to start a run, e.g. --config=configs/digits_dblock.py (a run already in --workdir '
           f'resumes from its config.json without it). {_available_configs()}')
    if workdir:
      if not os.path.exists(saved):
        fail(f'--mode={mode} without --config reads the config of the run in --workdir, but {saved} does not exist: '
             f'is {workdir!r} the workdir of a training run? Pass its --workdir, or --config=... as well.')
      path = f'{os.path.abspath(__file__)}:{workdir}'  # This file's get_config: the run's config.json.
      argv.insert(1, f'--config={path}')  # ml_collections finds the overrides in sys.argv, wherever they are.
    # Otherwise absl names what is wrong (an unknown --mode, a missing --workdir).
  if path is not None and not asks_help:
    check_overrides(argv, load_config(path))
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    fail(f'{e}\nPass --helpshort to see the flags.')
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections' own errors while overriding.
    fail(str(e).strip())
  if len(rest) > 1:
    fail(f'unexpected arguments {rest[1:]}: flags take the form --name=value')
  return rest


def check_workdir(workdir: str, *, writes: bool) -> None:
  """A workdir that is a file, or (for training) one that cannot be written, is named in one line."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    fail(f'--workdir={workdir} is a file, not a folder: pass a folder (it is created if it does not exist)')
  if not writes or '://' in workdir:
    return
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.access(existing, os.W_OK):
    saved = f' {paths.last_saved(workdir)}' if os.path.isdir(workdir) else ''
    fail(f'--workdir={workdir}: {existing} is not writable (a read-only disk, or another user\'s folder).{saved} '
         'Pass a folder you can write to (or make this one writable) and run again.')


def get_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in WORKDIR/config.json, tuples restored (JSON made them lists) so that
  `--config.data.mean=(0.5,)` overrides it like a config file's (and fields the run predates, which
  `config.load_workdir` fills with their defaults)."""
  saved = config_lib.load_workdir(workdir).to_dict()
  return ml_collections.ConfigDict(_lists_to_tuples(saved))


def _lists_to_tuples(tree):
  if isinstance(tree, dict):
    return {k: _lists_to_tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(_lists_to_tuples(v) for v in tree)
  return tree


def _flag_value(argv: list[str], name: str) -> str | None:
  """The last value of --name=V, -name=V, --name V in argv (as absl reads them), or None."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == '--':
      break
    m = re.fullmatch(rf'--?{re.escape(name)}(=(.*))?', arg, flags=re.DOTALL)
    if m:
      value = m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else '')
  return value


def _available_configs(near: str | None = None) -> str:
  """'Configs in configs/: ...' (those of the folder `near` names, else of the repository's configs/)."""
  folder = os.path.dirname(near) if near else None
  if not folder or not os.path.isdir(folder) or not _config_files(folder):
    root = paths.repository_root()
    folder = os.path.relpath(os.path.join(root, 'configs')) if root else None
  names = _config_files(folder) if folder else []
  if not names:
    return ''
  text = f'Configs in {folder}{os.sep}: ' + ', '.join(names) + '.'
  close = difflib.get_close_matches(os.path.basename(near), names, n=1, cutoff=0.6) if near else []
  return f'Did you mean {os.path.join(folder, close[0])}? {text}' if close else text


def _config_files(folder: str) -> list[str]:
  """Names of the files in `folder` that define get_config() (shared helper modules are not configs)."""
  out = []
  for path in sorted(glob.glob(os.path.join(folder, '*.py'))):
    with open(path) as f:
      if 'def get_config(' in f.read():
        out.append(os.path.basename(path))
  return out


def load_config(path: str) -> ml_collections.ConfigDict:
  """The config `--config=path[:arg]` names; a missing file or a failing get_config() is one message."""
  file, _, arg = path.partition(':')
  if os.path.isdir(file):
    fail(f'--config={path} is a folder, not a config file. {_available_configs(os.path.join(file, "x.py"))}')
  if not os.path.isfile(file):
    fail(f'--config={path}: no such config file {file!r}. {_available_configs(file)}')
  try:
    return config_lib.load_file(path)
  except USER_ERRORS as e:  # The workdir loader's FileNotFoundError and ConfigErrors raised by a config file.
    fail(str(e))
  except Exception as e:  # pylint: disable=broad-except
    where = [f for f in traceback.extract_tb(e.__traceback__)
             if os.path.abspath(f.filename) == os.path.abspath(file)]
    line = f' (line {where[-1].lineno}: {where[-1].line.strip()})' if where else ''
    fail(f'--config={path}: get_config({arg!r}) failed{line}: {type(e).__name__}: {e}' if arg else
         f'--config={path}: get_config() failed{line}: {type(e).__name__}: {e}')


def _field_names(config, prefix: str = '') -> list[str]:
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      out += _field_names(value, f'{prefix}{key}.')
  return out


def check_overrides(argv: list[str], config) -> None:
  """Every --config.<field>=... names a field of `config`; the closest names are offered for one that does not."""
  for arg in argv[1:]:
    if arg == '--':
      break
    m = re.match(r'--?(?:no)?config\.([^=]+)', arg)
    if not m:
      continue
    field, node = m.group(1), config
    parts = field.split('.')
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict):
        fail(f'unknown config field --config.{field}: config.{".".join(parts[:i])} is a {type(node).__name__}, '
             'not a group of fields')
      if part not in node:
        # The misspelt part among its group's fields, and the last part in every group (--config.train.lr).
        close = ['.'.join([*parts[:i], k, *parts[i + 1:]])
                 for k in difflib.get_close_matches(part, list(node.keys()), n=3, cutoff=0.6)]
        close += [n for n in _field_names(config) if n not in close
                  and difflib.get_close_matches(parts[-1], [n.split('.')[-1]], cutoff=0.8)]
        hint = (' Did you mean ' + ' or '.join(f'--config.{n}' for n in close[:3]) + '?') if close else ''
        fail(f'unknown config field --config.{field}.{hint} The fields are listed in diffblocks_jax/config.py '
             '(get_base_config) and the config file.')
      node = node[part]
