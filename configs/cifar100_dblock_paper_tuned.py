"""CIFAR-100, the paper's recipe (500 epochs, cosine lr 5e-4, RandAugment), DiffusionBlocks B=3, with the noise
plan and options validated on digits (`cifar100_dblock_tuned.tuned`; README, "Beyond the paper"). Untested on
CIFAR-100 (needs a GPU).

  python -m diffblocks_jax.main --config=configs/cifar100_dblock_paper_tuned.py --workdir=workdirs/cifar100_paper_tuned
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from cifar100_dblock_tuned import tuned  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar100_vit_paper import paper_recipe  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  return tuned(paper_recipe('dblock'))
