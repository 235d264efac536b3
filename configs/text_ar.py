"""Autoregressive language model (Llama-style: RMSNorm, SwiGLU, rotary) on CPython's documentation text, end to
end: the baseline of configs/text_ar_dblock.py and the scorer of its samples; minutes on a CPU.

  python -m diffblocks_jax.main --config=configs/text_ar.py --workdir=workdirs/text_ar

Writes eval/bpc (held-out next-character cross-entropy, bits), and eval/gen_ppl and eval/sample_entropy of its
own samples (README: what it reached).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from text_mdm import text_base  # pylint: disable=g-import-not-at-top,wrong-import-position


def text_ar_base(kind: str):
  config = text_base(kind)
  config.model.num_layers = 8
  config.model.num_blocks = 4  # Paper (LM1B): B = 4, γ = 0.1.
  config.diffusion.overlap = 0.1
  config.diffusion.max_loss_weight = 20.0  # w(σ) reaches 10⁵ at σ_min; public attempts clamp it at 20.
  config.eval.scorer_workdir = 'workdirs/text_ar'
  config.train.num_epochs = 4  # x B = 16 for DiffusionBlocks, whose sequences are twice as long ([clean | noisy]).
  return config


def get_config():
  return text_ar_base('ar')
