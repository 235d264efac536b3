"""Checkpoints of the training state in WORKDIR/checkpoints: Orbax's CheckpointManager, made safe to resume.

Each step directory holds Orbax items: `state` (the arrays), `manifest` (JSON: every leaf's path, shape, dtype
and a fingerprint of its bits) and, when given, `meta` (the caller's small JSON dict) and `config` (the run's
config, from which a damaged WORKDIR/config.json can be restored: config.CONFIG_COPY).

* Keys: the state is saved as `flax.serialization.to_state_dict(state)` (dataclasses become dicts, int
  keys like `params['blocks'][0]` become '0') and rebuilt with `from_state_dict(abstract_state, ...)`, so
  the caller's int keys and dataclasses come back exactly.
* Damage: Orbax writes into a temporary directory and renames it when complete, so a killed save is never
  listed. Later damage is another matter: a truncated or missing file fails the read, but garbled bytes in
  an uncompressed chunk restore silently; the manifest's fingerprints catch those. `restore()` without a
  step walks back past unreadable steps (logging each) and never deletes one.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import serialization

from diffblocks_jax import config as config_lib
from diffblocks_jax.training import fingerprints, paths, reporting

PyTree = Any
_STATE, _MANIFEST, _META = 'state', 'manifest', 'meta'
_CONFIG = config_lib.CONFIG_COPY[0]  # Where config.read_saved finds the copy.


class CheckpointError(ValueError):
  """A named step is missing or unreadable, or the checkpoints do not fit the state asked for."""


class _Unreadable(Exception):
  """This step's files are damaged: the caller may fall back to an older step."""


def _check_fits(manifest: dict[str, Any], target: PyTree, where: str) -> None:
  """A structural mismatch is a config error, not damage: say so instead of trying older steps."""
  saved, wanted = manifest['leaves'], fingerprints.leaves_by_path(target)
  problems = [f'missing from the checkpoint: {k}' for k in wanted if k not in saved]
  problems += [f'not in this model: {k}' for k in saved if k not in wanted]
  problems += [f'{k}: checkpoint shape {tuple(saved[k]["shape"])}, expected {tuple(wanted[k].shape)}'
               for k in wanted if k in saved and tuple(saved[k]['shape']) != tuple(wanted[k].shape)]
  if problems:
    more = [f'... and {len(problems) - 20} more'] if len(problems) > 20 else []
    raise CheckpointError(f'{where} does not fit the state to restore (wrong config?):\n  '
                          + '\n  '.join(problems[:20] + more))


def _verify(manifest: dict[str, Any], restored: PyTree) -> None:
  leaves = fingerprints.leaves_by_path(restored)
  # A leaf restored into another dtype (a deliberate cast) has other bits: only same-dtype leaves compare.
  prints = fingerprints.fingerprints({k: v for k, v in leaves.items()
                                     if str(v.dtype) == manifest['leaves'][k]['dtype']})
  bad = [k for k, p in prints.items() if fingerprints.fetch(p) != manifest['leaves'][k]['fingerprint']]
  if bad:
    raise _Unreadable(f'fingerprint mismatch (damaged data) in {", ".join(bad)}')


def _write_errno(error: BaseException | None) -> int | None:
  """The errno of a failed write that is the disk's (paths.WRITE_ERRNOS) anywhere in `error`'s chain, also when
  TensorStore reports it only in words; None otherwise."""
  words = {'no space left': errno.ENOSPC, 'resource_exhausted': errno.ENOSPC, 'disk quota': errno.EDQUOT,
           'read-only file system': errno.EROFS, 'permission denied': errno.EACCES}
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in paths.WRITE_ERRNOS:
      return error.errno
    text = str(error).lower()
    for phrase, code in words.items():
      if phrase in text:
        return code
    error = error.__cause__ or error.__context__
  return None


def _describe(e: BaseException) -> str:
  # TensorStore errors carry kilobytes of spec JSON after the useful first sentence.
  text = f'{type(e).__name__}: {e}'
  return text if len(text) <= 400 else text[:400] + ' ...'


def _everywhere(ok: bool) -> bool:
  """True iff `ok` on every process: all must pick the same step, and the next steps are collective."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


class Checkpointer:
  """Keeps the last `keep` checkpoints of a training state in `directory` (None or 0: keep all)."""

  def __init__(self, directory: str | os.PathLike, *, keep: int | None = 3, async_save: bool = True):
    directory = os.fspath(directory)
    self.directory = directory if '://' in directory else os.path.abspath(directory)  # gs:// etc. as given.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep or None, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._unreadable: set[int] = set()  # Found damaged by restore(): a save at that step sets it aside.
    self._in_flight: int | None = None  # The step of the last save, until check_saves() has seen it land.
    self._last_attempt: int | None = None  # The step of the last save asked for, for messages.
    # While a save is in flight, stderr is held: if it fails, Orbax's writes still in flight fail one by one, each
    # printing a traceback, which go to the details file, not the console (released there at close()).
    self._held: reporting.HeldStderr | None = None
    self._failing = False
    self._closed = False

  def all_steps(self) -> list[int]:
    # Sorted here: Orbax lists in save order, and a resumed run can save below a damaged later step.
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_path(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(step)  # Orbax's default step name format.

  def save(self, step: int, state: PyTree, *, metadata: dict | None = None, config: dict | None = None,
           force: bool = False) -> bool:
    """Saves `state` at `step` (asynchronously if so built), with `metadata` and a copy of the run's `config`
    (JSON dicts); False if Orbax's policy skips it."""
    if not force and not self._manager.should_save(step):
      return False
    self._finish_pending()
    if step in self._unreadable and step in self._manager.all_steps():
      self.set_aside(step, 'unreadable')
    # Python and NumPy leaves as jax arrays: one dtype story for the manifest and the fingerprints.
    tree = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x),
                        serialization.to_state_dict(state))
    items = {_STATE: ocp.args.StandardSave(tree), _MANIFEST: ocp.args.JsonSave(fingerprints.manifest(tree))}
    if metadata is not None:
      items[_META] = ocp.args.JsonSave(metadata)
    if config is not None:
      items[_CONFIG] = ocp.args.JsonSave(config)
    self._last_attempt = step
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed_save(step, e) from e
    if saved:
      self._in_flight = step
      if self._held is None:
        self._held = reporting.HeldStderr()
    return saved

  def check_saves(self) -> None:
    """Raises CheckpointError if the last asynchronous save has finished without its step on disk: called
    between compiled calls, so a failed save is reported one call later, not one checkpoint interval later."""
    step = self._in_flight
    if step is None or self._manager.is_saving_in_progress():
      return
    self._in_flight = None
    cause = None
    try:
      self._manager.check_for_errors()  # Orbax's finaliser may have taken (and logged) the error already.
    except Exception as e:  # pylint: disable=broad-except
      cause = e
    self._manager.reload()
    if cause is not None or step not in self._manager.all_steps():
      raise self._failed_save(step, cause)
    self._release()

  def _release(self) -> None:
    if self._held is not None:
      held, self._held = self._held, None
      held.release(to_details=self._failing)

  def _failed_save(self, step: int | None, cause: BaseException | None) -> CheckpointError:
    step = self._last_attempt if step is None else step
    self._failing = True
    self._remove_partial()
    self._manager.reload()
    on_disk = sorted(self._manager.all_steps())
    code = _write_errno(cause)
    if code is not None:  # The disk's doing: one line that says so, and what is safe.
      return CheckpointError(f'cannot write checkpoint step {step} in {self.directory}: {os.strerror(code).lower()} '
                             f'({paths.free_space(self.directory)}). The steps on disk are intact: {on_disk}; the '
                             'partial step was removed. Free space (or fix the permissions) and run the same '
                             'command again to resume.')
    return CheckpointError(f'Saving checkpoint step {step} in {self.directory} failed: '
                           f'{_describe(cause) if cause else "see the Orbax error logged above"}. The steps on disk '
                           f'are intact: {on_disk}. Check the disk (space, permissions) and run the same command '
                           'again to resume.')

  def _remove_partial(self) -> None:
    """Deletes what a failed save left: Orbax's temporary step folders, which it never lists nor reads."""
    if jax.process_index() != 0 or '://' in self.directory:
      return
    for partial in glob.glob(os.path.join(self.directory, '*.orbax-checkpoint-tmp*')):
      logging.debug('Removing %s, left by the failed save.', partial)
      shutil.rmtree(partial, ignore_errors=True)

  def set_aside(self, step: int, reason: str) -> str:
    """Renames a step out of Orbax's sight, kept for inspection (damaged, diverged, superseded by a resume
    from an earlier step); returns its new path."""
    path = self.step_path(step)
    aside = path.parent / f'{step}.{reason}-{time.strftime("%Y%m%d-%H%M%S")}'
    if jax.process_index() == 0:
      logging.warning('Moving the %s checkpoint %s to %s.', reason, path, aside)
      path.rename(aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f'checkpointing_set_aside_{step}')
    self._unreadable.discard(step)
    self._manager.reload()
    return str(aside)

  def restore(self, abstract_state: PyTree, *, step: int | None = None) -> tuple[PyTree, int] | None:
    """(state, step) shaped, typed and sharded like `abstract_state`; None when there is no checkpoint.

    step=None: the latest readable step; damaged later ones are logged and skipped (CheckpointError if
    none is readable). A named step that is missing or damaged: CheckpointError.
    """
    self.wait()
    self._manager.reload()  # Another process (an importer, a previous run) may have written since.
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise self._missing(step, steps)
      try:
        return self._restore_step(step, abstract_state), step
      except _Unreadable as e:
        raise CheckpointError(f'Checkpoint {self.step_path(step)} is unreadable: {e}') from e
    failures = []
    for s in reversed(steps):
      try:
        return self._restore_step(s, abstract_state), s
      except _Unreadable as e:
        logging.warning('Checkpoint %s is unreadable, trying the previous one: %s', self.step_path(s), e)
        failures.append(f'{self.step_path(s)}: {e}')
    if failures:
      raise CheckpointError(f'No readable checkpoint in {self.directory}:\n' + '\n'.join(failures))
    return None

  def _restore_step(self, step: int, abstract_state: PyTree) -> PyTree:
    target = serialization.to_state_dict(abstract_state)
    error = None
    try:
      manifest = self._read_json(step, _MANIFEST)
      _check_fits(manifest, target, self.step_path(step))
      args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
      restored = self._manager.restore(step, args=args)
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # Damage shows up as anything from KeyError (a deleted item) to JSON and TensorStore errors.
      error = e
    if not _everywhere(error is None):
      self._unreadable.add(step)
      raise _Unreadable(_describe(error) if error else 'unreadable on another process')
    try:
      _verify(manifest, restored[_STATE])
    except _Unreadable:
      self._unreadable.add(step)
      raise
    return serialization.from_state_dict(abstract_state, restored[_STATE])

  def metadata(self, step: int | None = None) -> dict | None:
    """The `metadata` saved with `step` (default: the latest); None if none was, or no checkpoint."""
    self.wait()
    steps = self.all_steps()
    if step is None and not steps:
      return None
    step = steps[-1] if step is None else step
    if step not in steps:
      raise self._missing(step, steps)
    if not (self.step_path(step) / _META).exists():
      return None
    try:
      return dict(self._read_json(step, _META))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'Metadata of {self.step_path(step)} is unreadable: {_describe(e)}') from e

  def manifest(self, step: int) -> dict:
    """The manifest saved with `step`: {'leaves': {path: {'shape', 'dtype', 'fingerprint'}}} (no array is read)."""
    try:
      return dict(self._read_json(step, _MANIFEST))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'Manifest of {self.step_path(step)} is unreadable: {_describe(e)}') from e

  def _read_json(self, step: int, item: str) -> Any:
    return self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

  def _missing(self, step: int, steps: list[int]) -> CheckpointError:
    return CheckpointError(f'No checkpoint for step {step} in {self.directory}; available steps: {steps}')

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk; a failed one raises CheckpointError."""
    self._finish_pending()

  def _finish_pending(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      step, self._in_flight = self._in_flight, None
      raise self._failed_save(step, e) from e
    self.check_saves()

  def close(self) -> None:
    """Waits for pending saves, then releases Orbax's threads. Safe to call twice."""
    if not self._closed:
      self._closed = True
      try:
        self.wait()  # A failed save is reported as ours, not as Orbax's raw error from close().
      finally:
        try:
          self._manager.close()
        finally:
          self._release()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
