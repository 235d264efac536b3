"""scikit-learn's digits: class-conditional generation with DiffusionBlocks, the DiT's 6 layers cut into B = 3
blocks of 2, each trained alone on its third of the noise levels; minutes on a CPU.

  python -m diffblocks_jax.main --config=configs/digits_vit.py --workdir=workdirs/digits_vit
  python -m diffblocks_jax.main --config=configs/digits_dit_dblock.py --workdir=workdirs/digits_dit_dblock

Same layer-updates as configs/digits_dit.py: each step trains 2 of 6 layers, for 3x the epochs. Sampling runs one
block per step: 50 steps cost what 50/3 end-to-end steps do (README).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from digits_dit import digits_dit_base  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  return digits_dit_base('dit_dblock')
