"""Masked diffusion language model with DiffusionBlocks on CPython's documentation text: the 6 layers in B = 3
blocks of 2, block b trained alone on its slice of masking times t ∈ [(2−b)/3, (3−b)/3] (widened by γ = 0.05);
minutes on a CPU.

  python -m diffblocks_jax.main --config=configs/text_mdm.py --workdir=workdirs/text_mdm
  python -m diffblocks_jax.main --config=configs/text_mdm_dblock.py --workdir=workdirs/text_mdm_dblock

Same layer-updates as configs/text_mdm.py: each step trains 2 of 6 layers, for 3x the epochs. eval/bpc is the
bound with each t routed to its block; eval/bpc_block{b} are its three terms (README: what it reached).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from text_mdm import text_base  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  return text_base('mdm_dblock')
