"""CIFAR-10, end-to-end ViT classifier at the release's defaults: the feature space of eval/fd and the judge of
eval/sample_accuracy for the CIFAR-10 generation configs (train it first, on the same TFDS data).

  python -m diffblocks_jax.main --config=configs/cifar10_vit.py --workdir=workdirs/cifar10_vit

Reached: not run here (it needs a GPU).
"""

from configs import common


def get_config():
  return common.tfds_images(common.base('vit'), 'cifar10', common.CIFAR10_MEAN, common.CIFAR10_STD)
