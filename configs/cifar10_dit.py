"""CIFAR-10 class-conditional generation, end-to-end DiT-S/2 in EDM: the paper's Table 2 baseline
(`common.cifar10_generation`). Its quality figures need configs/cifar10_vit.py trained first:

  python -m diffblocks_jax.main --config=configs/cifar10_vit.py --workdir=workdirs/cifar10_vit
  python -m diffblocks_jax.main --config=configs/cifar10_dit.py --workdir=workdirs/cifar10_dit

Reached: not run here (it needs a GPU); the paper reports Inception FID 32.84 / 39.83 (train / test).
"""

from configs import common


def get_config():
  return common.cifar10_generation('dit')
