"""CIFAR-100 classification with DiffusionBlocks (B = 3): the release's defaults, the paper's training recipe, and
the recipe validated on digits on top of either.

  python -m diffblocks_jax.main --config=configs/cifar100_dblock.py --workdir=workdirs/cifar100_dblock
  python -m diffblocks_jax.main --config=configs/cifar100_dblock.py:recipe=paper \\
      --workdir=workdirs/cifar100_dblock_paper

recipe=release (default): the public release's settings (constant lr 1e-3, 500 x B epochs, crops and flips).
recipe=paper: the paper's (cosine lr 5e-4 -> 5e-5 after a 10-epoch warm-up, RandAugment; `common.paper_recipe`).
recipe=tuned, recipe=paper_tuned: either, with noise plan 'matched', the 'concat' label token and normalised
embeddings (`common.tuned`, chosen on a validation split of digits).

Reached: not run here (it needs a GPU); the paper reports 59.30 % top-1 with recipe=paper.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, recipe=('release', 'paper', 'tuned', 'paper_tuned'))
  config = common.cifar100('dblock')
  if arg.recipe in ('paper', 'paper_tuned'):
    config = common.paper_recipe(config)
  if arg.recipe in ('tuned', 'paper_tuned'):
    config = common.tuned(config)
  return config
