"""Autoregressive language model (Llama-style: RMSNorm, SwiGLU, rotary; 8 layers x 128) on CPython's
documentation text, end to end (`common.text_autoregressive`): the baseline of configs/text_ar_dblock.py and
the scorer of its samples; minutes on a CPU.

  python -m diffblocks_jax.main --config=configs/text_ar.py --workdir=workdirs/text_ar

Writes eval/bpc (held-out next-character cross-entropy, bits), and eval/gen_ppl and eval/sample_entropy of its
own samples.

Reached: eval/bpc 1.835; its own samples' eval/gen_ppl 3.61 and 3.44 (two sets of 64).
"""

from configs import common


def get_config():
  return common.text_autoregressive('ar')
