"""What a config builds before training: the mesh, the data, the model's shapes and shardings, the schedule
(`Experiment`); and a trained run read back from its workdir (`load_trained`). Shared by the training loop,
evaluation, the benchmark and the notebooks.

The experiment is also what a task's evaluator is given (tasks/__init__.py): the config resolved once (B, the
noise plan's EDM, the evaluation batch), the run's random streams, the placement helpers and the loader of the
runs that judge this one — so that tasks never import the training layer.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from diffblocks_jax import models
from diffblocks_jax.training import block_jobs, checkpointing, sharding
from diffblocks_jax import config as config_lib
from diffblocks_jax.core import optim, partitions, steps
from diffblocks_jax.data import input_pipeline
from diffblocks_jax.tasks import registry

# Every random stream of a run, folded into the seed's key: a resumed run draws the same numbers, and no two
# streams share them.
RNG_STREAMS = {
    'data': 0x5eed,  # Batch order and augmentation (training/train.py).
    'eval': 0xe7a1,  # Evaluation: the classification sampler's noise, the language bound and samples.
    'grid': 0x5a3,  # Generation: the class grid and the scored samples of every evaluation (the same noise each time).
    'samples': 0x5a4,  # --mode=sample.
}


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
  blocks: tuple[int, ...]  # The blocks this run trains (rows of the stacks): all B, or a block job's.

  @property
  def is_block_job(self) -> bool:
    """A run of some blocks only (config.train.blocks): it trains them, and the merge evaluates them."""
    return len(self.blocks) < self.num_blocks

  @property
  def task(self):
    """The task module of the config's model.kind (tasks/registry.py)."""
    return registry.task_module(self.config.model.kind)

  @property
  def blockwise(self) -> bool:
    return registry.kind(self.config.model.kind).blockwise

  @property
  def edm(self) -> partitions.EDM:
    """The config's EDM noise distribution, its noise plan resolved ('matched' sets P_mean)."""
    return partitions.EDM.from_config(self.config.diffusion)

  @property
  def eval_batch_size(self) -> int:
    """config.eval.batch_size rounded up to a multiple of the devices, so every device gets equal rows."""
    return -(-self.config.eval.batch_size // self.mesh.size) * self.mesh.size

  def key(self, stream: str) -> jax.Array:
    """The run's key for `stream` (RNG_STREAMS)."""
    return jax.random.fold_in(jax.random.key(self.config.seed), RNG_STREAMS[stream])

  def replicated(self) -> jax.sharding.NamedSharding:
    """Outputs every process can read (multi-host) and score."""
    return sharding.replicated(self.mesh)

  def eval_batches(self) -> jax.sharding.NamedSharding:
    """An evaluation batch: its rows split over every device of the mesh."""
    return sharding.eval_batch_sharding(self.mesh)

  @staticmethod
  def on_device(params):
    """Parameters with offloaded (host-memory) blocks brought to the device: inference needs every block."""
    return sharding.on_device(params)

  def load_judge(self, field: str, **checks):
    """(config, experiment, state) of the finished run in `config.eval.<field>` that scores this one
    (`load_judge`)."""
    return load_judge(self.config, field, **checks)

  def init_state(self, initial=None) -> steps.TrainState:
    """Real parameters, built directly in their shardings (and memory kinds) under jit; from `initial` (the whole
    model's parameters on the host: `initialisation.initial_params`) when given."""
    shardings = jax.tree.map(lambda a: a.sharding, self.abstract_state)
    return jax.jit(self._init, out_shardings=shardings)(initial)

  def _init(self, initial=None) -> steps.TrainState:
    c, d = self.config, self.data
    if initial is None:
      model = models.build(c.model, seed=c.seed, sigma_data=c.diffusion.sigma_data, **d.model_dims)
      initial = models.split(model)[1]
    if self.is_block_job:  # Under jit the other blocks' initialisation is dead code: never on the device.
      initial = block_jobs.rows(initial, self.blocks)
    return steps.init_state(initial, c.seed, freeze_shared=c.train.freeze_shared)


def build_experiment(config) -> Experiment:
  """Validates the config, builds the mesh, loads the data and derives shapes (no parameters yet)."""
  config_lib.validate(config, num_devices=jax.device_count())
  data = input_pipeline.load_dataset(config.data, process_index=jax.process_index(),
                                     process_count=jax.process_count())
  return experiment_from_data(config, data, validated=True)


def experiment_from_data(config, data: input_pipeline.Dataset, mesh=None, *, validated: bool = False) -> Experiment:
  """The experiment for an already-loaded dataset (the benchmark passes synthetic data); `validated`: the config
  was already checked by `build_experiment`."""
  if not validated:
    config_lib.validate(config, num_devices=jax.device_count())
  config_lib.validate_data(config, data)
  mesh = mesh or sharding.make_mesh(config)
  num_blocks = config_lib.num_blocks(config)
  local_batch = config.train.batch_size // jax.process_count()
  steps_per_epoch = data.num_train // local_batch
  if steps_per_epoch < 1:
    raise config_lib.ConfigError(f'config.train.batch_size={config.train.batch_size} is larger than the '
                                 f'{data.num_train} training examples')
  # Block-parallel training updates every block each step: num_epochs of steps already give each block the
  # updates that B·num_epochs sequential epochs give it on average (SPEC §5.7).
  block_factor = num_blocks if (registry.kind(config.model.kind).blockwise and config.train.scale_epochs_by_blocks
                                and not config.parallel_blocks) else 1
  total_steps = config.train.num_epochs * block_factor * steps_per_epoch
  warmup_steps = round(config.optim.warmup_epochs * block_factor * steps_per_epoch)
  schedule = optim.make_schedule(config.optim, total_steps, warmup_steps)
  exp = Experiment(config, mesh, data, None, None, num_blocks, steps_per_epoch, total_steps, schedule,
                   config_lib.trained_blocks(config))
  abstract_model = nnx.eval_shape(lambda: models.build(config.model, sigma_data=config.diffusion.sigma_data,
                                                       **data.model_dims))
  exp.graphdef = models.split(abstract_model)[0]
  abstract = jax.eval_shape(exp._init)
  shardings = sharding.state_shardings(mesh, abstract, offload=config.train.offload_idle_blocks)
  exp.abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                    shardings)
  return exp


def put_train_split(exp: Experiment) -> tuple[jax.Array, ...]:
  """This process's training shard (images and int32 labels, or token windows) as global arrays, rows sharded
  on 'data' (sharding.py)."""
  return tuple(sharding.put_rows(exp.mesh, a.astype(np.int32) if a.ndim == 1 else a)
               for a in exp.data.train_arrays())


def load_trained(config, workdir: str, step: int | None = None):
  """(experiment, state) from WORKDIR/checkpoints: for eval mode, notebooks and tests.

  A block-parallel run (or merged block jobs) is read back on fewer devices than it has blocks with its blocks
  unsharded: evaluation needs no device groups. A block job alone holds too few blocks to evaluate.
  """
  if config.train.blocks:
    raise config_lib.ConfigError(
        f'{workdir} is a block job (config.train.blocks={tuple(config.train.blocks)}): it holds only those blocks. '
        'Merge the jobs first (--mode=merge --workdir=OUT --from=W0,W1,...: docs/block_jobs.md) and evaluate OUT.')
  if config.parallel_blocks and jax.local_device_count() < config_lib.num_blocks(config):
    config = config.copy_and_resolve_references()
    config.parallel_blocks = False
  directory = os.path.join(workdir, 'checkpoints')
  if '://' not in directory and not os.path.isdir(directory):  # Opening a Checkpointer would create it.
    raise FileNotFoundError(f'No checkpoint in {directory}: train first with --workdir={workdir}, or import '
                            'one with diffblocks_jax.tools.import_torch.')
  exp = build_experiment(config)
  ckpt = checkpointing.Checkpointer(directory, keep=config.train.keep_checkpoints)
  try:
    restored = ckpt.restore(exp.abstract_state, step=step or None)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f'No checkpoint in {os.path.join(workdir, "checkpoints")}: train first with '
                            f'--workdir={workdir}, or import one with diffblocks_jax.tools.import_torch.')
  return exp, restored[0]


def load_judge(config, field: str, *, data_fields: tuple[str, ...], kind_error, why: str):
  """(judge config, experiment, state) of the finished run in `config.eval.<field>` that scores this one (the
  classifier of generated images, the scorer of samples), checked before it is loaded: its workdir exists,
  `kind_error(judge config)` returns None (else the error), and it was trained on the same data."""
  path = config.eval[field]
  try:
    judge = config_lib.load_workdir(path)
  except FileNotFoundError as e:
    raise config_lib.ConfigError(f'config.eval.{field}={path!r}: {e}') from None
  error = kind_error(judge)
  if error:
    raise config_lib.ConfigError(f'config.eval.{field}={path!r}{error}')
  differ = [f for f in data_fields if judge.data[f] != config.data[f]]
  if differ:
    raise config_lib.ConfigError(f'config.eval.{field}={path!r} was trained on other data '
                                 f'(config.data.{", ".join(differ)} differ): {why}')
  return (judge, *load_trained(judge, path))
