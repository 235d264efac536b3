"""Autoregressive DiffusionBlocks on CPython's documentation text with the noise plan and sampler chosen beyond
the paper (README, "Language models"): `text_ar_dblock.py` changed in two ways.

- diffusion.noise_plan = 'matched' (P_mean = ln σ_max − 3·P_std = 0.782), chosen on classification's validation
  split (configs/digits_dblock_tuned.py): block 0 trains where the sampler calls it, at σ_max.
- eval.solver = 'ancestral': each step draws a character from the block's logits and noises its embedding
  afresh to the next σ, so every block sees what it was trained on (one clean embedding plus noise). With the
  paper's Euler steps this plan's samples collapse (entropy 2.6 bits): an ODE from σ_max follows the mode.
  Chosen, with the step count and grid, by the sampler's own bits per character (eval/bpc) on a validation
  split, the train text's last 10 % (the test text never windowed):

  python -m diffblocks_jax.main --config=configs/text_ar_dblock_tuned.py --workdir=workdirs/val \
      --config.data.validation_fraction=0.1
  python -m diffblocks_jax.main --mode=eval --workdir=workdirs/val --config.eval.solver=euler   # and so on

Train the judge first (configs/text_ar.py), as for text_ar_dblock.py:

  python -m diffblocks_jax.main --config=configs/text_ar.py --workdir=workdirs/text_ar
  python -m diffblocks_jax.main --config=configs/text_ar_dblock_tuned.py --workdir=workdirs/text_ar_dblock_tuned
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from text_ar import text_ar_base  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  config = text_ar_base('ar_dblock')
  config.diffusion.noise_plan = 'matched'  # config.diffusion.p_mean is then unused.
  config.eval.solver = 'ancestral'
  return config
