"""Masked diffusion language model on CPython's bundled documentation text (characters, windows of 64, offline),
end to end, 6 layers x 128 (`common.text`): the baseline of configs/text_mdm_dblock.py; minutes on a CPU.

  python -m diffblocks_jax.main --config=configs/text_mdm.py --workdir=workdirs/text_mdm

Writes eval/bpc (the bound on the held-out tail, bits per character) and samples to WORKDIR/samples/.

Reached: eval/bpc 3.120.
"""

from configs import common


def get_config():
  return common.text('mdm')
