"""Fine-tuning a pretrained language model block-wise (issue 25; docs/finetune.md): the end-to-end
configs/text_ar.py run becomes the start of DiffusionBlocks (B = 4 blocks of 2 of its 8 layers, the tuned recipe
of configs/text_ar_dblock.py), then trains 1 epoch x B on the same CPython text, with diffusion.clean_ce_weight
λ = `lam` (the clean path's next-character cross-entropy added to the block-wise loss). configs/text_ar_ft.py is
the end-to-end fine-tuning at equal layer-updates.

  python -m diffblocks_jax.main --config=configs/text_ar.py --workdir=workdirs/text_ar
  python -m diffblocks_jax.main --config=configs/text_ar_dblock_ft.py:lam=0.1 --workdir=workdirs/text_ar_dblock_ft_0.1

From a Hugging Face Llama-family checkpoint instead: --config.train.init_from=hf:FOLDER, with the model fields the
checkpoint implies (`models.pretrained.hf_model_fields(FOLDER)`) and data whose vocabulary is the checkpoint's.

What it reached (2-core x86-64 CPU): docs/finetune.md, "What was measured".
"""

from configs import common
from configs import text_ar_dblock


def get_config(arg=None):
  arg = common.parse_arg(arg, lam=('0', '0.1', '1', '0.3', '3'))
  config = text_ar_dblock.get_config('recipe=tuned')
  finetune(config)
  config.diffusion.clean_ce_weight = float(arg.lam)
  return config


def finetune(config):
  """The fine-tuning schedule both fine-tuning configs share: from workdirs/text_ar, 1 epoch (x B block-wise),
  a tenth of pretraining's peak learning rate, evaluated at the end."""
  config.train.init_from = 'workdirs/text_ar'
  config.train.num_epochs = 1
  config.optim.lr = 2e-4
  config.optim.warmup_epochs = 0.05
  config.train.eval_every_epochs = 0.0
  config.eval.num_samples = 64
  return config
