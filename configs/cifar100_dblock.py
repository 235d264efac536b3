"""CIFAR-100, DiffusionBlocks (B=3), the release defaults.

  python -m diffblocks_jax.main --config=configs/cifar100_dblock.py --workdir=workdirs/cifar100_dblock
"""

from diffblocks_jax import config as config_lib


def get_config():
  config = config_lib.get_base_config()
  config.model.kind = 'dblock'
  return config
