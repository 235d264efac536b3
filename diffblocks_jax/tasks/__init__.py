"""Tasks: what is diffused and how it is scored. Each task module offers the same functions to the loop:

  make_task(config, data) -> task         the object the core's steps and sampler ask (target, loss, ...)
  partition(config)                       the noise plan of its blocks
  train_batch(images, labels)             -> (inputs, targets) of a training step
  make_train_step(graphdef, config, schedule, *, data, block=None, placement=...)
"""

from diffblocks_jax import config as config_lib


def module(config):
  """The task module of a config's model.kind (config.KINDS)."""
  from diffblocks_jax.tasks import classification, generation  # pylint: disable=g-import-not-at-top
  return {'classification': classification, 'generation': generation}[config_lib.task_name(config)]
