"""CIFAR-100, the paper's recipe, DiffusionBlocks B=3, γ=0.05 (published: 59.30 % top-1).

500 epochs (x B = 1,500 block-epochs), AdamW lr 5e-4 with cosine decay to 5e-5 after a 10-epoch warm-up
(x B), horizontal flip + RandAugment (2 ops, magnitude 9).

  python -m diffblocks_jax.main --config=configs/cifar100_dblock_paper.py --workdir=workdirs/cifar100_dblock_paper
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from cifar100_vit_paper import paper_recipe  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  return paper_recipe('dblock')
