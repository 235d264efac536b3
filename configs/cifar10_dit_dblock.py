"""CIFAR-10 class-conditional generation with DiffusionBlocks: DiT-S/2's 12 layers in B = 3 blocks of 4
(`common.cifar10_generation`). Its quality figures need configs/cifar10_vit.py trained first:

  python -m diffblocks_jax.main --config=configs/cifar10_vit.py --workdir=workdirs/cifar10_vit
  python -m diffblocks_jax.main --config=configs/cifar10_dit_dblock.py --workdir=workdirs/cifar10_dit_dblock

Reached: not run here (it needs a GPU); the paper reports Inception FID 30.59 / 37.20 (train / test), against
32.84 / 39.83 end to end.
"""

from configs import common


def get_config():
  return common.cifar10_generation('dit_dblock')
