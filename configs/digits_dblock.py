"""scikit-learn's digits (8x8 grayscale, 10 classes, offline), DiffusionBlocks with B=3; minutes on a CPU.

  python -m diffblocks_jax.main --config=configs/digits_dblock.py --workdir=workdirs/digits_dblock

Reaches about 95 % test accuracy on the seeded 80/20 split (see README for the measured figure).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from digits_vit import digits_base  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  return digits_base('dblock')
