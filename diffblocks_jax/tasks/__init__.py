"""Tasks: what is diffused and how it is scored. Each task module offers the same functions to the loop:

  make_task(config, data) -> task         the object the core's steps and sampler ask (target, loss, ...)
  partition(config, data=None)            the noise plan of its blocks
  train_batch(key, rows, data_config)     -> (inputs, targets) of a step from gathered training rows
  make_train_step(graphdef, config, schedule, *, data, block=None, placement=...)
"""

from diffblocks_jax import config as config_lib


def module(config):
  """The task module of a config's model.kind (config.KINDS)."""
  # pylint: disable-next=g-import-not-at-top
  from diffblocks_jax.tasks import autoregressive, classification, generation, masked_lm
  return {'classification': classification, 'generation': generation, 'masked_lm': masked_lm,
          'autoregressive': autoregressive}[config_lib.task_name(config)]
