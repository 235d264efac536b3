"""A tiny CIFAR-100-shaped setting for tests and CI (any TFDS image dataset, seconds per run on a CPU); the
argument is the model kind, 'dblock' (default) or 'vit':

  python -m diffblocks_jax.main --config=configs/testing.py:dblock --workdir=/tmp/t   (or :vit)
"""

from configs import common


def get_config(kind: str = 'dblock'):
  config = common.cifar100(kind)
  config.model.hidden_size = 24
  config.model.num_layers = 2
  config.model.num_heads = 2
  config.model.mlp_dim = 32
  config.model.num_blocks = 2
  config.train.batch_size = 8
  config.train.num_epochs = 1
  config.train.steps_per_call = 2
  config.train.log_every_steps = 2
  config.train.checkpoint_every_steps = 4
  config.train.eval_every_epochs = 0.0
  config.eval.batch_size = 16
  return config
