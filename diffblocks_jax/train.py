"""Training and evaluation loops: config → mesh → data → model/optimizer → steps → loop → checkpoints/logs.

Many steps run per compiled call (`lax.scan`): batch indices, augmentation, the block draw and the update
all happen on the device, and the host only logs, evaluates and checkpoints between calls.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from diffblocks_jax import checkpointing, diffusion, locking, models, reporting, sampling, sharding, tasks
from diffblocks_jax import config as config_lib
from diffblocks_jax.core import blocks, optim, steps
from diffblocks_jax.data import input_pipeline
from diffblocks_jax.tasks import classification


@dataclasses.dataclass
class Experiment:
  """Everything derived from a config and its dataset, before any parameter exists."""
  config: Any
  mesh: jax.sharding.Mesh
  data: input_pipeline.Dataset
  graphdef: Any
  abstract_state: steps.TrainState  # ShapeDtypeStructs carrying their shardings.
  num_blocks: int
  steps_per_epoch: int
  total_steps: int
  schedule: Any

  def init_state(self) -> steps.TrainState:
    """Real parameters, built directly in their shardings (and memory kinds) under jit."""
    shardings = jax.tree.map(lambda a: a.sharding, self.abstract_state)
    return jax.jit(self._init, out_shardings=shardings)()

  def _init(self) -> steps.TrainState:
    c, d = self.config, self.data
    model = models.build(c.model, image_size=d.image_size, channels=d.channels, num_classes=d.num_classes,
                         seed=c.seed, sigma_data=c.diffusion.sigma_data)
    return steps.init_state(models.split(model)[1], c.seed)


def build_experiment(config) -> Experiment:
  """Validates the config, builds the mesh, loads the data and derives shapes (no parameters yet)."""
  config_lib.validate(config, num_devices=jax.device_count())
  data = input_pipeline.load_dataset(config.data, process_index=jax.process_index(),
                                     process_count=jax.process_count())
  return experiment_from_data(config, data)


def experiment_from_data(config, data: input_pipeline.Dataset, mesh=None) -> Experiment:
  """The experiment for an already-loaded dataset (the benchmark passes synthetic data)."""
  config_lib.validate(config, num_devices=jax.device_count())
  config_lib.validate_data(config, image_size=data.image_size, channels=data.channels)
  mesh = mesh or sharding.make_mesh(config)
  num_blocks = config_lib.num_blocks(config)
  local_batch = config.train.batch_size // jax.process_count()
  steps_per_epoch = len(data.train_images) // local_batch
  if steps_per_epoch < 1:
    raise config_lib.ConfigError(f'config.train.batch_size={config.train.batch_size} is larger than the '
                                 f'{len(data.train_images)} training examples')
  # Block-parallel training updates every block each step: num_epochs of steps already give each block the
  # updates that B·num_epochs sequential epochs give it on average (SPEC §5.7).
  block_factor = num_blocks if (config_lib.uses_blocks(config) and config.train.scale_epochs_by_blocks
                                and not config.parallel_blocks) else 1
  total_steps = config.train.num_epochs * block_factor * steps_per_epoch
  warmup_steps = round(config.optim.warmup_epochs * block_factor * steps_per_epoch)
  schedule = optim.make_schedule(config.optim, total_steps, warmup_steps)
  exp = Experiment(config, mesh, data, None, None, num_blocks, steps_per_epoch, total_steps, schedule)
  abstract_model = nnx.eval_shape(lambda: models.build(
      config.model, image_size=data.image_size, channels=data.channels, num_classes=data.num_classes,
      sigma_data=config.diffusion.sigma_data))
  exp.graphdef = models.split(abstract_model)[0]
  abstract = jax.eval_shape(exp._init)
  shardings = sharding.state_shardings(mesh, abstract, offload=config.train.offload_idle_blocks)
  exp.abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                    shardings)
  return exp


def put_train_split(exp: Experiment):
  """(images, labels): this process's training shard as global arrays, rows sharded on 'data' (sharding.py)."""
  return (sharding.put_rows(exp.mesh, exp.data.train_images),
          sharding.put_rows(exp.mesh, exp.data.train_labels.astype(np.int32)))


def make_train_step(exp: Experiment, *, block: int | None = None):
  """The config's step; block-parallel training steps every block at once (`steps.make_parallel_step`)."""
  c = exp.config
  task = tasks.module(c)
  if c.parallel_blocks:
    return steps.make_parallel_step(exp.graphdef, task.make_task(c, exp.data), task.partition(c), c.optim,
                                    exp.schedule, condition_dropout=c.diffusion.class_dropout_prob)
  return task.make_train_step(exp.graphdef, c, exp.schedule, data=exp.data, block=block,
                              placement=blocks.Placement(host=c.train.offload_idle_blocks))


def make_train_chunk(exp: Experiment, *, block: int | None = None, train_step=None):
  """jit(state, images_u8, labels, num_steps) → (state, stacked metrics): `num_steps` steps in one call.

  `images_u8, labels` come from `put_train_split`. `block` fixes the trained block (benchmark); None draws
  it every step. `train_step` replaces the step built from the config.
  """
  config, mesh = exp.config, exp.mesh
  train_step = train_step or make_train_step(exp, block=block)
  train_batch = tasks.module(config).train_batch
  batch = config.train.batch_size
  num_local = len(exp.data.train_labels)
  num_padded = sharding.padded_rows(mesh, num_local)
  data_key = jax.random.fold_in(jax.random.key(config.seed), 0x5eed)
  # Block-parallel: each block its own data order and augmentation, one batch per block.
  data_keys = [jax.random.fold_in(data_key, b) for b in range(exp.num_blocks)] if config.parallel_blocks \
      else [data_key]

  def batch_of(key, step):
    # A fresh permutation per epoch of the processes' shards together, indexed by the global step: a resumed
    # run sees the same batches, and so does a run on any number of processes and devices.
    epoch, within = jnp.divmod(step, exp.steps_per_epoch)
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), jax.process_count() * num_local)
    return sharding.global_rows(jax.lax.dynamic_slice(perm, (within * batch,), (batch,)), num_local, num_padded)

  def body(state, images_u8, labels):
    rows = jnp.stack([batch_of(k, state.step) for k in data_keys])
    images_b, labels_b = sharding.gather_rows(mesh, (images_u8, labels), rows if config.parallel_blocks
                                              else rows[0])
    augment = lambda key, x: input_pipeline.augment(jax.random.fold_in(jax.random.fold_in(key, 1), state.step),
                                                    x, config.data)
    if config.parallel_blocks:
      x = jnp.stack([augment(k, images_b[b]) for b, k in enumerate(data_keys)])
    else:
      x = augment(data_key, images_b)
    x = jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh))
    return train_step(state, *train_batch(x, labels_b))

  def chunk(state, images_u8, labels, num_steps):
    return jax.lax.scan(lambda s, _: body(s, images_u8, labels), state, None, length=num_steps)

  state_shardings = jax.tree.map(lambda a: a.sharding, exp.abstract_state)
  rows = sharding.split_sharding(mesh)
  return jax.jit(chunk, static_argnums=3, donate_argnums=0, in_shardings=(state_shardings, rows, rows),
                 out_shardings=(state_shardings, sharding.replicated(mesh)))


def make_eval_fn(exp: Experiment, **sampler_overrides):
  """(params, key) → test logits for the whole split (padded last batch, nothing dropped)."""
  predict = classification.make_predict_fn(exp.graphdef, exp.config, **sampler_overrides)
  data_config = exp.config.data
  batches = sharding.eval_batch_sharding(exp.mesh)
  # Logits replicated: every process can read them (multi-host) and score the split. The parameters come as
  # they are (block-parallel: each block on its group; XLA moves what the sampler needs).
  jitted = jax.jit(lambda p, x, k: predict(p, input_pipeline.normalize(x, data_config), k),
                   in_shardings=(None, batches, None), out_shardings=sharding.replicated(exp.mesh))
  # Every process holds the whole test split: each places its devices' rows of a batch.
  to_global = lambda batch: jax.make_array_from_callback(batch.shape, batches, lambda index: batch[index])
  # Rounded up to a multiple of the devices (predict_split pads the batches, so nothing is scored twice).
  batch_size = -(-exp.config.eval.batch_size // exp.mesh.size) * exp.mesh.size
  key = jax.random.fold_in(jax.random.key(exp.config.seed), 0xe7a1)
  return lambda params: classification.predict_split(jitted, sharding.on_device(params), exp.data.test_images,
                                                     batch_size, key, preprocess=to_global)


def evaluate_params(exp: Experiment, params, **sampler_overrides) -> float:
  logits = make_eval_fn(exp, **sampler_overrides)(params)
  return classification.accuracy(logits, exp.data.test_labels)


def make_evaluator(exp: Experiment, workdir: str):
  """(params, step) -> (metrics, log line) of the config's task, built (and its inputs checked) up front."""
  if config_lib.task_name(exp.config) == 'classification':
    eval_fn = make_eval_fn(exp)

    def classification_eval(params, step):
      del step
      accuracy = classification.accuracy(eval_fn(params), exp.data.test_labels)
      return {'eval/accuracy': accuracy}, f'test accuracy {accuracy:.4f} on {len(exp.data.test_labels)} images'

    return classification_eval
  e = exp.config.eval
  evaluator = sampling.GenerationEvaluator(exp, workdir, classifier=load_classifier(exp),
                                           feature_fn=sampling.load_feature_fn(e.feature_fn) if e.feature_fn else None)

  def generation_eval(params, step):
    metrics = evaluator(params, step)
    return metrics, sampling.describe(metrics, evaluator.num_samples)

  return generation_eval


def load_classifier(exp: Experiment) -> sampling.Classifier | None:
  """The classifier of config.eval.classifier_workdir (a finished run on the same data), checked up front."""
  path = exp.config.eval.classifier_workdir
  if not path:
    logging.warning('config.eval.classifier_workdir is empty: no eval/fd or eval/sample_accuracy, only sample '
                    'grids. Train a classifier on the same data first (e.g. configs/digits_vit.py) and pass '
                    'its workdir.')
    return None
  try:
    cls_config = config_lib.load_workdir(path)
  except FileNotFoundError as e:
    raise config_lib.ConfigError(f'config.eval.classifier_workdir={path!r}: {e}') from None
  if config_lib.task_name(cls_config) != 'classification':
    raise config_lib.ConfigError(f'config.eval.classifier_workdir={path!r} holds a {cls_config.model.kind!r} '
                                 'run, not a classifier (model.kind vit or dblock)')
  fields = ('source', 'name', 'path', 'split_seed', 'train_split', 'test_split', 'label_key')
  differ = [f for f in fields if cls_config.data.get(f) != exp.config.data.get(f)]
  if differ:
    raise config_lib.ConfigError(f'config.eval.classifier_workdir={path!r} was trained on other data '
                                 f'(config.data.{", ".join(differ)} differ): FD needs the same dataset')
  if cls_config.model.kind != 'vit':
    raise config_lib.ConfigError(f'config.eval.classifier_workdir={path!r}: the features come from the '
                                 "end-to-end ViT (model.kind 'vit'), not 'dblock'")
  cls_exp, state = load_trained(cls_config, path)
  logging.info('Quality features: the ViT classifier of %s (checkpoint step %d).', path, int(state.step))
  return sampling.Classifier(cls_exp.graphdef, sharding.on_device(state.params), cls_config.data, path)


EXIT_PREEMPTED = 75  # Exit status of a run stopped by SIGTERM after saving (EX_TEMPFAIL: run it again).


class Preempted(Exception):
  """SIGTERM stopped training between two compiled calls; the message names the step saved."""


class _StopFlag:
  """Set by SIGTERM. The handler only sets it: raising from a signal handler can land inside a donated call,
  an Orbax save or a garbage-collection callback, where the exception is lost or leaves damage."""

  def __init__(self):
    self.requested = False

  def __call__(self, signum, frame):
    del signum, frame
    self.requested = True

  def everywhere(self) -> bool:
    """True on every process as soon as any process was signalled: all must stop at the same step."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains (resuming from WORKDIR/checkpoints if any), evaluates, checkpoints; returns final metrics.

  One run per workdir (`locking.WorkdirLock`); SIGTERM saves the current step and raises `Preempted`.
  """
  lead = jax.process_index() == 0
  with locking.WorkdirLock(workdir, enabled=lead):
    return _train_and_evaluate(config, workdir, lead)


def _train_and_evaluate(config, workdir: str, lead: bool) -> dict[str, float]:
  stop = _StopFlag()  # From the start: a SIGTERM while loading or compiling is honoured at the first chance.
  old_handler = signal.signal(signal.SIGTERM, stop) if _main_thread() else None
  try:
    return _train_loop(config, workdir, lead, stop)
  finally:
    if old_handler is not None:
      signal.signal(signal.SIGTERM, old_handler)


def _restore_or_init(config, workdir: str, exp: Experiment, ckpt: checkpointing.Checkpointer, lead: bool):
  """(state, resumed step or None). A workdir's saved config is compared before anything is overwritten."""
  saved = os.path.join(workdir, 'config.json')
  if ckpt.all_steps() and os.path.exists(saved) and not config.train.allow_config_change:
    with open(saved) as f:
      changed = config_lib.changed_fields(json.load(f), config)
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
    if lead:
      _set_aside_metrics(workdir, resume_step)
  if lead:  # Only now: a refused resume leaves the run's config as it was.
    with open(saved, 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  if restored is None:
    return exp.init_state(), None
  return restored


def _set_aside_metrics(workdir: str, step: int) -> None:
  """Moves metrics.jsonl records past `step` to metrics.superseded-<time>.jsonl: the resumed run logs them anew."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = [line for line in lines if json.loads(line)['step'] <= step]
  if len(keep) == len(lines):
    return
  with open(os.path.join(workdir, f'metrics.superseded-{time.strftime("%Y%m%d-%H%M%S")}.jsonl'), 'w') as f:
    f.writelines(line for line in lines if json.loads(line)['step'] > step)
  with open(path + '.tmp', 'w') as f:
    f.writelines(keep)
  os.replace(path + '.tmp', path)


def _all_finite(tree) -> bool:
  return bool(jax.jit(lambda t: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(t)])))(tree))


def _train_loop(config, workdir: str, lead: bool, stop: _StopFlag) -> dict[str, float]:
  exp = build_experiment(config)
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=config.train.keep_checkpoints)
  try:
    state, start = _restore_or_init(config, workdir, exp, ckpt, lead)
  except BaseException:
    ckpt.close()
    raise
  if start is None:
    logging.info('Starting from scratch: %d steps (%d per epoch, B=%d).', exp.total_steps,
                 exp.steps_per_epoch, exp.num_blocks)
    if config_lib.task_name(config) == 'classification' and config_lib.uses_blocks(config):
      # Where each block trains vs. where the sampler calls it (README).
      for line in diffusion.noise_plan_for(config, exp.num_blocks):
        logging.info('%s', line)
  else:
    logging.info('Resumed from %s at step %d of %d.', ckpt.directory, start, exp.total_steps)
    if start >= exp.total_steps:
      finished = [r for r in reporting.read_metrics(workdir) if r['step'] == start and
                  any(k.startswith('eval/') for k in r)]
      if finished:
        ckpt.close()
        shown = ', '.join(f'{k} {v:.4g}' for k, v in finished[-1].items() if k.startswith('eval/'))
        logging.info('Already finished at step %d of %d: %s. Nothing to do (--config.train.num_epochs=N trains '
                     'further).', start, exp.total_steps, shown)
        return dict(finished[-1], step=start)
  images, labels = put_train_split(exp)
  chunk_fn = make_train_chunk(exp)
  evaluator = make_evaluator(exp, workdir)
  writer = reporting.MetricWriter(workdir, enabled=lead)
  progress = reporting.Progress(exp.total_steps, config.train.batch_size, exp.steps_per_epoch)
  eval_every = max(1, round(config.train.eval_every_epochs * exp.steps_per_epoch)) \
      if config.train.eval_every_epochs > 0 else exp.total_steps
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
    ckpt.save(at_step, state, metadata={'epoch': at_step / exp.steps_per_epoch}, force=True)

  def evaluate_now():
    nonlocal evaluated_at
    metrics, line = evaluator(state.params, step)
    writer.write(step, metrics)
    result.update(metrics)
    evaluated_at = step
    if lead:
      logging.info('step %d: %s', step, line)

  pending = None
  try:
    while step < exp.total_steps:
      if stop.everywhere():
        raise Preempted('SIGTERM')
      n = min(config.train.steps_per_call, exp.total_steps - step)
      state, metrics = chunk_fn(state, images, labels, n)
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
  except (KeyboardInterrupt, Preempted) as e:
    # Save where we are, if the state is known good, so the same command resumes here.
    if pending is not None:
      flush(pending)
    if last_good == step and ckpt.latest_step() != step:
      try:
        save(step)
      except Exception as err:  # pylint: disable=broad-except
        # Ctrl-C can land while the state's buffers are donated to a running call (SIGTERM cannot).
        logging.warning('Could not save at interruption (%s); step %s stays the latest.', err, ckpt.latest_step())
    if isinstance(e, Preempted):
      ckpt.wait()
      raise Preempted(f'Stopped by SIGTERM at step {step} of {exp.total_steps}; checkpoint step '
                      f'{ckpt.latest_step()} is saved in {ckpt.directory}. Run the same command to resume.') from None
    raise
  finally:
    latest = ckpt.latest_step()
    ckpt.close()
    writer.close()
  result['step'] = step
  if lead:
    logging.info('%s', reporting.end_summary(result, workdir=workdir, total_steps=exp.total_steps,
                                             wall_s=time.perf_counter() - started, start_step=first_step,
                                             batch_size=config.train.batch_size, checkpoint_dir=ckpt.directory,
                                             checkpoint_step=latest))
  return result


def _main_thread() -> bool:
  return threading.current_thread() is threading.main_thread()


def load_trained(config, workdir: str, step: int | None = None):
  """(experiment, state) from WORKDIR/checkpoints: for eval mode, notebooks and tests."""
  directory = os.path.join(workdir, 'checkpoints')
  if '://' not in directory and not os.path.isdir(directory):  # Opening a Checkpointer would create it.
    raise FileNotFoundError(f'No checkpoint in {directory}: train first with --workdir={workdir}, or import '
                            'one with diffblocks_jax.import_torch.')
  exp = build_experiment(config)
  ckpt = checkpointing.Checkpointer(directory, keep=config.train.keep_checkpoints)
  try:
    restored = ckpt.restore(exp.abstract_state, step=step or None)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f'No checkpoint in {os.path.join(workdir, "checkpoints")}: train first with '
                            f'--workdir={workdir}, or import one with diffblocks_jax.import_torch.')
  return exp, restored[0]


def evaluate(config, workdir: str) -> dict[str, float]:
  """--mode=eval: the task's test figures for the latest (or config.eval.step) checkpoint, logged and returned."""
  exp, state = load_trained(config, workdir, config.eval.step)
  step = int(state.step)
  metrics, line = make_evaluator(exp, workdir)(state.params, step)
  logging.info('Checkpoint step %d: %s.', step, line)
  result = {'step': step, **metrics}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'eval.json'), 'w') as f:
      json.dump(result, f)
  return result


def sample(config, workdir: str, num_samples: int = 100) -> str:
  """--mode=sample (image generation): the class grid and `num_samples` samples of the latest checkpoint."""
  if config_lib.task_name(config) != 'generation':
    raise config_lib.ConfigError(f'--mode=sample needs an image-generation config (model.kind dit or '
                                 f'dit_dblock), not model.kind={config.model.kind!r}')
  exp, state = load_trained(config, workdir, config.eval.step)
  return sampling.write_samples(sampling.GenerationEvaluator(exp, workdir), state.params, int(state.step),
                                num_samples, config.seed)
