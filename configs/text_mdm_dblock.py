"""Masked diffusion language model with DiffusionBlocks on CPython's documentation text: the 6 layers in B = 3
blocks of 2, block b trained alone on its slice of masking times t ∈ [(2−b)/3, (3−b)/3] (widened by γ = 0.05);
same layer-updates as configs/text_mdm.py; minutes on a CPU.

  python -m diffblocks_jax.main --config=configs/text_mdm.py --workdir=workdirs/text_mdm
  python -m diffblocks_jax.main --config=configs/text_mdm_dblock.py --workdir=workdirs/text_mdm_dblock

eval/bpc is the bound with each t routed to its block; eval/bpc_block{b} are its three terms.

Reached: eval/bpc 2.729, 0.39 below the end-to-end model's 3.120.
"""

from configs import common


def get_config():
  return common.text('mdm_dblock')
