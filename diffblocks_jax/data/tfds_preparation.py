"""Preparing a TFDS dataset that is not on disk yet: fail fast offline, name the cause, leave no debris.

TFDS's own download retries a dead host for about 3.5 minutes (urllib3: 10 retries, exponential back-off)
and leaves an empty dataset folder and a partial download behind. So before downloading, `prepare` checks
that every host the builder downloads from answers (DNS and a TCP connect, through the proxy if one is set),
and when an attempt fails it removes what the attempt created under the data directory, never anything
that was there before.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import urllib.parse
import urllib.request

from absl import logging

from diffblocks_jax.data.dataset import DataError

PROBE_TIMEOUT_S = 10.0  # Per host, DNS and connect together; all hosts are probed at once.
_SNAPSHOT_DEPTH = 3  # TFDS writes <root>/<name>/[<config>/]<version>, <root>/downloads/{<name>,extracted}/...


def prepare(builder, data_config) -> None:
  """Downloads and prepares `builder`'s data as array_record, or raises DataError saying why and what to do."""
  name, where = data_config.name, builder.data_dir
  if not data_config.tfds_download:
    raise DataError(_not_prepared(name, where, 'config.data.tfds_download=False, so nothing is downloaded',
                                  data_config))
  try:
    urls = sorted(builder.url_infos or ())  # The builder's registered downloads; unknown for a few datasets.
  except ModuleNotFoundError as e:  # Reading them already needs importlib_resources.
    raise DataError(_missing_module(name, e)) from e
  if _mocked(builder):  # tfds.testing.mock_data: download_and_prepare is a no-op, nothing is downloaded.
    urls = []
  unreachable = unreachable_hosts(urls)
  if unreachable:
    raise DataError(_not_prepared(
        name, where, f'no network connection to {"; ".join(unreachable)}, needed to download {", ".join(urls)}',
        data_config))
  logging.info('TFDS %s is not prepared in %s; downloading and preparing it.', name, where)
  root = os.fspath(builder.data_dir_root)
  before, created_root = _snapshot(root), _first_missing(root)
  try:
    builder.download_and_prepare(file_format='array_record')
  except BaseException as e:  # pylint: disable=broad-except  (also Ctrl-C: never leave a half-made folder)
    _remove_new(root, before, created_root)
    if not isinstance(e, Exception):
      raise
    if isinstance(e, ModuleNotFoundError):  # A broken install, not the network: say so first.
      raise DataError(_missing_module(name, e)) from e
    raise DataError(_not_prepared(name, where, f'download_and_prepare failed: {type(e).__name__}: {e}',
                                  data_config)) from e


def open_builder(tfds, data_config, alternatives: str = ''):
  """The TFDS builder of `data.name`, or a DataError naming it (and `alternatives`, another way to give data)."""
  try:
    return tfds.builder(data_config.name, data_dir=data_config.tfds_data_dir or None)
  except tfds.core.DatasetNotFoundError as e:
    first_line = str(e).splitlines()[0]  # The rest lists every TFDS dataset.
    raise DataError(f'config.data.name={data_config.name!r} is not a TFDS dataset ({first_line}); see '
                    f'tfds.list_builders(), {"" if alternatives else "or "}set --config.data.tfds_data_dir to where '
                    f'it is prepared{alternatives}') from e


def check_splits(builder, splits, name: str) -> None:
  """Names a train or test split (or slice) that the prepared dataset lacks or that holds no examples."""
  for field, split in zip(('train_split', 'test_split'), splits):
    if not builder.info.splits:  # Empty under tfds.testing.mock_data: nothing to check against.
      continue
    try:
      num_examples = builder.info.splits[split].num_examples  # Parses slices too ('train[:90%]').
    except (KeyError, ValueError) as e:
      raise DataError(f'config.data.{field}={split!r} is not a split of {name}: {e}') from e
    if not num_examples:
      raise DataError(f'config.data.{field}={split!r} of {name} has no examples; choose a split or slice that '
                      f'has some (the splits: {sorted(builder.info.splits)})')


def _mocked(builder) -> bool:
  return getattr(builder.download_and_prepare, '__module__', '').startswith('tensorflow_datasets.testing')


def unreachable_hosts(urls, timeout_s: float = PROBE_TIMEOUT_S) -> list[str]:
  """'host:port (why)' for each http(s) host of `urls` that does not accept a connection within timeout_s.

  With a proxy configured for a URL (HTTPS_PROXY, ...), the proxy is what must answer, and it is named.
  """
  targets = {}  # (host, port) -> description
  for url in urls:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ('http', 'https') or not parts.hostname:
      continue
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname):
      proxy_parts = urllib.parse.urlsplit(proxy if '://' in proxy else f'http://{proxy}')
      key = (proxy_parts.hostname, proxy_parts.port or 80)
      targets[key] = f'the proxy {key[0]}:{key[1]} (for {parts.hostname})'
    else:
      key = (parts.hostname, parts.port or (443 if parts.scheme == 'https' else 80))
      targets[key] = f'{key[0]}:{key[1]}'
  answers = {}

  def probe(target):
    try:
      socket.create_connection(target, timeout=timeout_s).close()
      answers[target] = None
    except OSError as e:  # socket.gaierror (DNS), ConnectionRefusedError, TimeoutError, ...
      answers[target] = f'{type(e).__name__}: {e}'

  # Daemon threads with a deadline: a DNS lookup has no timeout of its own and may hang far longer.
  threads = [threading.Thread(target=probe, args=(t,), daemon=True) for t in targets]
  for thread in threads:
    thread.start()
  deadline = time.monotonic() + timeout_s + 1.0
  for thread in threads:
    thread.join(max(0.0, deadline - time.monotonic()))
  silent = f'no answer within {timeout_s:g} s'
  return [f'{what} ({answers.get(t, silent)})' for t, what in targets.items() if answers.get(t, silent)]


def _missing_module(name: str, e: ModuleNotFoundError) -> str:
  return (f'Cannot prepare TFDS dataset {name!r}: TFDS needs the Python module {e.name!r}, which is not '
          f'installed. Install it (`uv sync`, or `pip install {e.name}`) and run again.')


def _not_prepared(name: str, where, reason: str, data_config) -> str:
  data_dir = data_config.tfds_data_dir or '~/tensorflow_datasets'
  return (
      f'Cannot prepare TFDS dataset {name!r}: {reason}. It is not prepared in {where}. Either:\n'
      f'  1. on a machine with internet, run\n'
      f'       python -c "import tensorflow_datasets as tfds; tfds.builder({name!r}, data_dir=\'{data_dir}\')'
      f'.download_and_prepare(file_format=\'array_record\')"\n'
      f'     then copy {data_dir} here and pass --config.data.tfds_data_dir=<that folder>;\n'
      f'  2. point --config.data.tfds_data_dir at a folder that already holds the prepared data; or\n'
      f'  3. try configs/digits_dblock.py, which needs no download.')


def _snapshot(root: str, depth: int = _SNAPSHOT_DEPTH) -> set[str]:
  """Every path under `root` down to `depth` levels: enough to see what TFDS adds, cheap on a big root."""
  found, level = set(), [root]
  for _ in range(depth):
    below = []
    for folder in level:
      try:
        with os.scandir(folder) as entries:
          for entry in entries:
            found.add(entry.path)
            if entry.is_dir(follow_symlinks=False):
              below.append(entry.path)
      except OSError:  # Missing or unreadable: nothing of it can be new.
        continue
    level = below
  return found


def _first_missing(path: str) -> str | None:
  """The outermost not-yet-existing folder on the way to `path` (created by the attempt, if anything is)."""
  path, missing = os.path.abspath(path), None
  while not os.path.lexists(path):
    missing, parent = path, os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return missing


def _remove_new(root: str, before: set[str], created_root: str | None) -> None:
  """Removes what appeared under `root` since `before` (outermost new paths only); all of `created_root`."""
  if created_root is not None:
    new = [created_root] if os.path.lexists(created_root) else []
  else:
    added = _snapshot(root) - before
    new = [p for p in added if os.path.dirname(p) not in added]
  for path in sorted(new):
    logging.info('Removing %s, left by the failed TFDS preparation.', path)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      try:
        os.unlink(path)
      except OSError:
        pass
