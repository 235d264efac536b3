"""Tiny-ImageNet, DiffusionBlocks B=2 (`tinyimagenet_dblock.py`), with the noise plan and options validated on
digits (`cifar100_dblock_tuned.tuned`: P_mean 0.782, 'concat', normalised embeddings; README, "Beyond the
paper"). Untested on Tiny-ImageNet (needs a GPU and the data). The folder source has no validation split here:
to re-choose on this data, hold out part of train/ in a second folder.

  python -m diffblocks_jax.main --config=configs/tinyimagenet_dblock_tuned.py --workdir=workdirs/tin_tuned \\
      --config.data.path=/data/tiny-imagenet-200
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from cifar100_dblock_tuned import tuned  # pylint: disable=g-import-not-at-top,wrong-import-position
from tinyimagenet_dblock import get_config as release_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  return tuned(release_config())
