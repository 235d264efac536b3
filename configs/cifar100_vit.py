"""CIFAR-100, end-to-end ViT baseline, the release defaults.

  python -m diffblocks_jax.main --config=configs/cifar100_vit.py --workdir=workdirs/cifar100_vit
"""

from diffblocks_jax import config as config_lib


def get_config():
  config = config_lib.get_base_config()
  config.model.kind = 'vit'
  return config
