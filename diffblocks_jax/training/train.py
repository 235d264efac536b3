"""The training loop: an `Experiment` (experiment.py) → steps → many steps per compiled call → checkpoints, logs,
evaluations (the task's evaluator, tasks/). Nothing here depends on the task.

Many steps run per compiled call (`lax.scan`): batch indices, augmentation, the block draw and the update
all happen on the device, and the host only logs, evaluates and checkpoints between calls.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffblocks_jax import config as config_lib
from diffblocks_jax.training import block_jobs, checkpointing, initialisation, locking, paths, reporting, sharding
from diffblocks_jax.core import blocks, steps
from diffblocks_jax.training.experiment import Experiment, build_experiment, put_train_split


def make_train_step(exp: Experiment, *, block: int | None = None):
  """The config's step; block-parallel training steps every block at once (`steps.make_parallel_step`)."""
  c, task = exp.config, exp.task
  if c.parallel_blocks:
    return steps.make_parallel_step(exp.graphdef, task.make_task(c, exp.data), task.partition(c, exp.data),
                                    c.optim, exp.schedule, condition_dropout=c.diffusion.class_dropout_prob,
                                    block_ids=exp.blocks)
  return task.make_train_step(exp.graphdef, c, exp.schedule, data=exp.data, block=block,
                              placement=blocks.Placement(host=c.train.offload_idle_blocks))


def make_train_chunk(exp: Experiment, *, block: int | None = None, train_step=None):
  """jit(state, arrays, num_steps) → (state, stacked metrics): `num_steps` steps in one call.

  `arrays` come from `put_train_split` (images and labels, or token windows). `block` fixes the trained block
  (benchmark); None draws it every step. `train_step` replaces the step built from the config.
  """
  config, mesh = exp.config, exp.mesh
  train_step = train_step or make_train_step(exp, block=block)
  train_batch = exp.task.train_batch
  batch = config.train.batch_size
  num_local = exp.data.num_train
  num_padded = sharding.padded_rows(mesh, num_local)
  data_key = exp.key('data')
  # Block-parallel: each block its own data order and augmentation, one batch per block (a block job: its blocks').
  data_keys = [jax.random.fold_in(data_key, b) for b in exp.blocks] if config.parallel_blocks else [data_key]

  def batch_of(key, step):
    # A fresh permutation per epoch of the processes' shards together, indexed by the global step: a resumed
    # run sees the same batches, and so does a run on any number of processes and devices.
    epoch, within = jnp.divmod(step, exp.steps_per_epoch)
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), jax.process_count() * num_local)
    return sharding.global_rows(jax.lax.dynamic_slice(perm, (within * batch,), (batch,)), num_local, num_padded)

  def body(state, arrays):
    rows = jnp.stack([batch_of(k, state.step) for k in data_keys])
    gathered = sharding.gather_rows(mesh, arrays, rows if config.parallel_blocks else rows[0])
    # The task turns gathered rows into (inputs, targets): images are augmented here, on the device.
    prepare = lambda key, rows: train_batch(jax.random.fold_in(jax.random.fold_in(key, 1), state.step), rows,
                                            config.data)
    if config.parallel_blocks:
      per_block = [prepare(k, tuple(a[b] for a in gathered)) for b, k in enumerate(data_keys)]
      inputs, targets = jax.tree.map(lambda *xs: jnp.stack(xs), *per_block)
    else:
      inputs, targets = prepare(data_key, gathered)
    inputs, targets = jax.lax.with_sharding_constraint((inputs, targets), sharding.batch_sharding(mesh))
    return train_step(state, inputs, targets)

  def chunk(state, arrays, num_steps):
    return jax.lax.scan(lambda s, _: body(s, arrays), state, None, length=num_steps)

  state_shardings = jax.tree.map(lambda a: a.sharding, exp.abstract_state)
  rows = sharding.split_sharding(mesh)
  return jax.jit(chunk, static_argnums=2, donate_argnums=0, in_shardings=(state_shardings, rows),
                 out_shardings=(state_shardings, sharding.replicated(mesh)))


EXIT_PREEMPTED = 75  # A run stopped by SIGTERM after saving (EX_TEMPFAIL: run it again).
EXIT_INTERRUPTED = 130  # A run stopped by Ctrl-C (128 + SIGINT), saved or not.


class Preempted(Exception):
  """A signal stopped training: SIGTERM or a first Ctrl-C between two compiled calls (the current step saved), or
  a second Ctrl-C at once (nothing saved). The message names the step that is saved; `exit_code` is the
  process's exit status."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


class _Stop(Exception):
  """Raised in the loop when the stop flag is set; becomes Preempted once the step is saved."""


class _StopFlag:
  """Set by SIGTERM or Ctrl-C. The handler only sets it: raising from a signal handler can land inside a donated
  call, an Orbax save or a garbage-collection callback, where the exception is lost or leaves damage. A second
  Ctrl-C is the person insisting: it raises KeyboardInterrupt at once, and nothing more is saved."""

  def __init__(self):
    self.signum = None

  def __call__(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signum == signal.SIGINT:
      raise KeyboardInterrupt
    if signum == signal.SIGINT:
      # os.write: the only output that is safe inside a signal handler (logging takes locks).
      os.write(2, b'\nCtrl-C: stopping after the current call and saving this step (Ctrl-C again stops at once, '
                  b'without saving).\n')
    self.signum = self.signum or signum

  @property
  def name(self) -> str:
    return 'Ctrl-C' if self.signum == signal.SIGINT else 'SIGTERM'

  def everywhere(self) -> bool:
    """True on every process as soon as any process was signalled: all must stop at the same step."""
    if jax.process_count() == 1:
      return self.signum is not None
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self.signum is not None))))


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains (resuming from WORKDIR/checkpoints if any), evaluates, checkpoints; returns final metrics.

  One run per workdir (`locking.WorkdirLock`). SIGTERM or Ctrl-C saves the current step and raises `Preempted`;
  a write that fails for want of space or permission raises `paths.WorkdirWriteError` (docs/operations.md).
  """
  lead = jax.process_index() == 0
  with locking.WorkdirLock(workdir, enabled=lead):
    return _train_and_evaluate(config, workdir, lead)


def _train_and_evaluate(config, workdir: str, lead: bool) -> dict[str, float]:
  stop = _StopFlag()  # From the start: a signal while loading or compiling is honoured at the first chance.
  signals = (signal.SIGTERM, signal.SIGINT)
  old_handlers = {s: signal.signal(s, stop) for s in signals} if _main_thread() else {}
  try:
    return _train_loop(config, workdir, lead, stop)
  except OSError as e:
    if e.errno in paths.WRITE_ERRNOS:
      raise paths.WorkdirWriteError.of(e, workdir) from None
    raise
  finally:
    for s, handler in old_handlers.items():
      signal.signal(s, handler)


def _has_checkpoints(workdir: str) -> bool:
  """Whether WORKDIR/checkpoints holds a step folder (read without creating anything; a damaged step counts: the
  restore sets it aside and says so)."""
  directory = os.path.join(workdir, 'checkpoints')
  if '://' in directory:  # Remote storage: ask Orbax (opening a Checkpointer there creates nothing we keep).
    with checkpointing.Checkpointer(directory, keep=None) as ckpt:
      return bool(ckpt.all_steps())
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _restore_or_init(config, workdir: str, exp: Experiment, ckpt: checkpointing.Checkpointer, lead: bool,
                     initial=None):
  """(state, resumed step or None). A workdir's saved config is compared before anything is overwritten; the
  metrics log is made to match the step the run goes on from. `initial`: a new run's parameters
  (config.train.init_from)."""
  saved = os.path.join(workdir, 'config.json')
  if ckpt.all_steps() and os.path.exists(saved) and not config.train.allow_config_change:
    changed = config_lib.changed_fields(config_lib.read_saved(workdir), config)
    if changed:
      raise config_lib.ConfigError(
          f'{workdir} holds a run started with another config; resuming would continue it under other rules:\n  '
          + '\n  '.join(changed) + '\nUse another --workdir, undo the change, or pass '
          '--config.train.allow_config_change=True to resume anyway.')
  resume_step = config.train.resume_step or None
  restored = ckpt.restore(exp.abstract_state, step=resume_step)
  if resume_step is not None:
    for later in [s for s in ckpt.all_steps() if s > resume_step]:
      ckpt.set_aside(later, 'superseded')
  if lead:  # Only now: a refused resume leaves the run's config and metrics as they were.
    with open(saved, 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    # Whatever the path (the latest step, a named one, one before an unreadable step, none at all), the steps
    # after the one the run goes on from are logged anew: their old records are set aside, never duplicated.
    reporting.repair_metrics(workdir)
    reporting.set_aside_metrics(workdir, restored[1] if restored is not None else 0)
  if restored is None:
    return exp.init_state(initial), None
  return restored


def _evaluation_at(workdir: str, step: int) -> dict | None:
  """The last metrics record at `step` holding an evaluation, if one was logged."""
  found = [r for r in reporting.read_metrics(workdir) if r['step'] == step and any(k.startswith('eval/') for k in r)]
  return found[-1] if found else None


@jax.jit
def _finite(tree) -> jax.Array:
  # One module-level jit: a fresh lambda per save would compile again at every checkpoint.
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _all_finite(tree) -> bool:
  return bool(_finite(tree))


def _train_loop(config, workdir: str, lead: bool, stop: _StopFlag) -> dict[str, float]:
  new_run = not _has_checkpoints(workdir)
  if new_run:
    initialisation.check_source(config)
  exp = build_experiment(config)
  # A new run's weights from config.train.init_from, read and checked before the workdir is touched; a resume
  # reads its own checkpoint instead.
  initial = initialisation.initial_params(config, exp.data) if new_run else None
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=config.train.keep_checkpoints)
  try:
    state, start = _restore_or_init(config, workdir, exp, ckpt, lead, initial)
  except BaseException:
    ckpt.close()
    raise
  evaluated = _evaluation_at(workdir, start) if start is not None else None
  if exp.is_block_job and start is not None and start >= exp.total_steps:  # A block job is never evaluated.
    ckpt.close()
    if lead:
      logging.info('Already finished at step %d of %d: blocks %s. Nothing to do; merge the jobs (%s).', start,
                   exp.total_steps, exp.blocks, block_jobs.MERGE_HINT)
    return {'step': start}
  if start is not None and start >= exp.total_steps and evaluated:  # The answer, and nothing before it.
    ckpt.close()
    shown = ', '.join(f'{k} {v:.4g}' for k, v in evaluated.items() if k.startswith('eval/'))
    if lead:
      logging.info('Already finished at step %d of %d: %s. Nothing to do (--config.train.num_epochs=N trains '
                   'further).', start, exp.total_steps, shown)
    return dict(evaluated, step=start)
  if lead:  # A few lines say what runs; the full config is in WORKDIR/config.json.
    for line in [reporting.run_line(config, workdir), *reporting.experiment_lines(exp)]:
      logging.info('%s', line)
    if exp.is_block_job:
      logging.info('Block job: trains blocks %s of %d as the block-parallel run does, no evaluation (merge the '
                   'jobs: %s).', exp.blocks, exp.num_blocks, block_jobs.MERGE_HINT)
    if start is None:
      origin = (f'from the weights of {config.train.init_from}' if config.train.init_from else 'from scratch') + (
          ', the shared outer parts frozen' if config.train.freeze_shared else '')
      logging.info('Starting %s: %d steps (%d per epoch).', origin, exp.total_steps, exp.steps_per_epoch)
      for line in getattr(exp.task, 'start_lines', lambda exp: [])(exp):
        logging.info('%s', line)
    else:
      logging.info('Resumed from %s at step %d of %d.', ckpt.directory, start, exp.total_steps)
  arrays = put_train_split(exp)
  chunk_fn = make_train_chunk(exp)
  evaluator = None if exp.is_block_job else exp.task.make_evaluator(exp, workdir)
  writer = reporting.MetricWriter(workdir, enabled=lead)
  unit = exp.task.UNIT  # What the progress line counts per second.
  progress = reporting.Progress(exp.total_steps, config.train.batch_size, exp.steps_per_epoch, unit)
  eval_every = max(1, round(config.train.eval_every_epochs * exp.steps_per_epoch)) \
      if config.train.eval_every_epochs > 0 and evaluator else exp.total_steps
  saved_config = json.loads(config.to_json_best_effort())  # Kept in every checkpoint: config.CONFIG_COPY.
  step = first_step = int(state.step)
  last_good = step
  evaluated_at = None
  started = time.perf_counter()
  window: dict[str, list] = {}
  result: dict[str, float] = {}
  crossed = lambda every, before, after: after // every > before // every or after == exp.total_steps

  def diverged(bad: int, what: str):
    """Stops at step `bad`: checkpoints at or after it hold the parameters that produced it (a blow-up on a
    chunk's last step is saved before the next chunk's first loss shows it), so they are moved aside."""
    ckpt.wait()
    moved = [ckpt.set_aside(s, 'diverged') for s in ckpt.all_steps() if s >= bad]
    good = ckpt.latest_step()
    return FloatingPointError(
        f'{what} at step {bad}; training stopped. '
        + (f'The checkpoints it came from were moved aside ({", ".join(moved)}). ' if moved else '')
        + (f'The last good checkpoint is step {good} in {ckpt.directory}: run again with a lower --config.optim.lr '
           'and --config.train.allow_config_change=True to resume from it (or name an earlier step with '
           '--config.train.resume_step).' if good is not None
           else 'No checkpoint was saved before it: lower --config.optim.lr and start again.'))

  def flush(pending):
    """Host side of a finished chunk: finiteness check, window metrics, logs."""
    nonlocal last_good
    end, metrics = pending
    metrics = jax.device_get(metrics)
    if not np.all(np.isfinite(metrics['loss'])):
      raise diverged(end - len(metrics['loss']) + int(np.argmin(np.isfinite(metrics['loss']))), 'Non-finite loss')
    last_good = end
    for k, v in metrics.items():
      window.setdefault(k, []).append(np.asarray(v))
    if crossed(config.train.log_every_steps, end - len(metrics['loss']), end):
      summary = reporting.summarise({k: np.concatenate(v) for k, v in window.items()}, exp.num_blocks)
      summary['train/epoch'] = end / exp.steps_per_epoch
      window.clear()
      writer.write(end, summary)
      result.update(summary)
      if lead:
        logging.info('%s', progress.line(end, summary))

  def save(at_step):
    # Offloaded block stacks are not checked here: gathering them onto the device would undo the offload.
    if not config.train.offload_idle_blocks and not _all_finite(state.params):
      raise diverged(at_step, 'Non-finite parameters')
    metadata = {'epoch': at_step / exp.steps_per_epoch}
    if exp.is_block_job:  # The blocks it owns (also in the config copy): what --mode=merge reads.
      metadata['blocks'] = list(exp.blocks)
    ckpt.save(at_step, state, metadata=metadata, config=saved_config, force=True)

  def evaluate_now():
    nonlocal evaluated_at
    if evaluator is None:  # A block job: the merged run is evaluated.
      return
    metrics, line = evaluator(state.params, step)
    writer.write(step, metrics)
    result.update(metrics)
    evaluated_at = step
    if lead:
      logging.info('step %d: %s', step, line)

  pending = None
  try:
    if start and not evaluated and start < exp.total_steps and start % eval_every == 0:
      evaluate_now()  # The evaluation due at the step resumed from was interrupted (or never ran): redone first.
    while step < exp.total_steps:
      if stop.everywhere():
        raise _Stop
      n = min(config.train.steps_per_call, exp.total_steps - step)
      state, metrics = chunk_fn(state, arrays, n)
      if step == first_step:
        progress.start(step)  # Throughput from here on: the first call's compile is not in it.
      if pending is not None:
        flush(pending)  # The previous chunk's metrics, fetched while this one runs.
      ckpt.check_saves()  # A failed asynchronous save is reported now, not at the next checkpoint.
      pending, before, step = (step + n, metrics), step, step + n
      need_ckpt = crossed(config.train.checkpoint_every_steps, before, step)
      need_eval = crossed(eval_every, before, step)
      if need_ckpt or need_eval:
        flush(pending)
        pending = None
      if need_ckpt:
        save(step)
      if need_eval:
        evaluate_now()
    if pending is not None:
      flush(pending)
    if evaluated_at != step:  # A rerun of a run stopped after its last checkpoint but before its last evaluation.
      evaluate_now()
    ckpt.wait()
    ckpt.check_saves()
  except _Stop:
    # Save where we are, if the state is known good, so the same command resumes here.
    if pending is not None:
      flush(pending)
    if last_good == step and ckpt.latest_step() != step:
      save(step)
    ckpt.wait()
    code = EXIT_INTERRUPTED if stop.name == 'Ctrl-C' else EXIT_PREEMPTED
    raise Preempted(f'Stopped by {stop.name} at step {step} of {exp.total_steps}; checkpoint step '
                    f'{ckpt.latest_step()} is saved in {ckpt.directory}. Run the same command to resume.',
                    code) from None
  except KeyboardInterrupt:
    # A second Ctrl-C: no save (the person asked to stop now); an asynchronous save already under way finishes.
    raise Preempted(f'Stopped at once by a second Ctrl-C at step {step} of {exp.total_steps}, without saving; '
                    f'checkpoint step {ckpt.latest_step()} in {ckpt.directory} is the latest. Run the same command '
                    'to resume from it.', EXIT_INTERRUPTED) from None
  finally:
    latest = ckpt.latest_step()
    ckpt.close()
    writer.close()
  result['step'] = step
  if lead:
    logging.info('%s', reporting.end_summary(result, workdir=workdir, total_steps=exp.total_steps,
                                             wall_s=time.perf_counter() - started, start_step=first_step,
                                             batch_size=config.train.batch_size, checkpoint_dir=ckpt.directory,
                                             checkpoint_step=latest, unit=unit,
                                             then=block_jobs.MERGE_HINT if exp.is_block_job else None))
  return result


def _main_thread() -> bool:
  return threading.current_thread() is threading.main_thread()


