"""CIFAR-100 classification, the end-to-end ViT baseline of configs/cifar100_dblock.py (12 layers, hidden 128).

  python -m diffblocks_jax.main --config=configs/cifar100_vit.py --workdir=workdirs/cifar100_vit
  python -m diffblocks_jax.main --config=configs/cifar100_vit.py:recipe=paper --workdir=workdirs/cifar100_vit_paper

recipe=release (default): the public release's settings. recipe=paper: the paper's (`common.paper_recipe`).

Reached: not run here (it needs a GPU); the paper reports 60.25 % top-1 with recipe=paper.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, recipe=('release', 'paper'))
  config = common.cifar100('vit')
  if arg.recipe == 'paper':
    config = common.paper_recipe(config)
  return config
