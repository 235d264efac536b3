"""CIFAR-10, end-to-end ViT classifier at the release's defaults: the feature space of eval/fd and the judge of
eval/sample_accuracy for the CIFAR-10 generation configs (train it first, on the same TFDS data).

  python -m diffblocks_jax.main --config=configs/cifar10_vit.py --workdir=workdirs/cifar10_vit
"""

from diffblocks_jax import config as config_lib


def get_config():
  config = config_lib.get_base_config()
  config.model.kind = 'vit'
  config.data.name = 'cifar10'
  config.data.mean = (0.4914, 0.4822, 0.4465)  # CIFAR-10 statistics.
  config.data.std = (0.2470, 0.2435, 0.2616)
  return config
