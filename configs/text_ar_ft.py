"""End-to-end fine-tuning of the pretrained configs/text_ar.py run on the same CPython text: the baseline of
configs/text_ar_dblock_ft.py at equal layer-updates (1 epoch of all 8 layers against 4 epochs of one block of 2).

  python -m diffblocks_jax.main --config=configs/text_ar_ft.py --workdir=workdirs/text_ar_ft

What it reached (2-core x86-64 CPU): docs/finetune.md, "What was measured".
"""

from configs import common
from configs import text_ar_dblock_ft


def get_config():
  return text_ar_dblock_ft.finetune(common.text_autoregressive('ar'))
