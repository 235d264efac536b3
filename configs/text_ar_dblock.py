"""Autoregressive language model with DiffusionBlocks on CPython's documentation text: the next character's
normalised embedding is diffused (EDM, B = 4 blocks of 2 layers, γ = 0.1), the sequence is [clean | noisy]
under the Block Diffusion mask; minutes on a CPU. Its samples are scored by the end-to-end model, so train
that first:

  python -m diffblocks_jax.main --config=configs/text_ar.py --workdir=workdirs/text_ar
  python -m diffblocks_jax.main --config=configs/text_ar_dblock.py --workdir=workdirs/text_ar_dblock

Same layer-updates as configs/text_ar.py (each step trains 2 of 8 layers, for 4x the epochs). Writes
eval/gen_ppl (its samples' perplexity under workdirs/text_ar), eval/sample_entropy and eval/ce_block{b}.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from text_ar import text_ar_base  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  return text_ar_base('ar_dblock')
