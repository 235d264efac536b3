"""Fine-tuning a Hugging Face Llama-family checkpoint (Llama, SmolLM, Qwen2; a local folder with config.json and
*.safetensors) on text, end to end or block-wise (issue 25; docs/finetune.md). The model fields are the
checkpoint's (`models.pretrained.hf_model_fields`), train.init_from is hf:FOLDER, the rest is the small text
setting of configs/text_ar.py:

  python -m diffblocks_jax.main --config=configs/text_hf.py:FOLDER --workdir=workdirs/hf_ar \
      --config.data.source=text --config.data.path=corpus.txt
  python -m diffblocks_jax.main --config=configs/text_hf.py:FOLDER,kind=ar_dblock,lam=0.1 --workdir=... \
      --config.eval.scorer_workdir=workdirs/hf_ar

Without FOLDER it takes the tiny test checkpoint tests/fixtures/hf/llama_gqa (random weights, 64 tokens: a
smoke test; its data must have 64 characters). The data's token ids must be the checkpoint's: with data.vocab 'char' or 'byte' that means a checkpoint trained on
the same characters or bytes (the import refuses a vocabulary of another size in one line).
"""

import os

from configs import common
from diffblocks_jax import config as config_lib
from diffblocks_jax.models import pretrained


SMOKE_TEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests', 'fixtures', 'hf',
                          'llama_gqa')


def get_config(arg=None):
  folder, _, rest = (arg or '').partition(',')
  if '=' in folder:
    raise config_lib.ConfigError('configs/text_hf.py takes the checkpoint folder first: '
                                 '--config=configs/text_hf.py:FOLDER[,kind=ar_dblock][,lam=0.1]')
  folder = folder or SMOKE_TEST
  arg = common.parse_arg(rest, kind=('ar', 'ar_dblock'), lam=('0', '0.1', '0.3', '1', '3'))
  config = common.text_autoregressive(arg.kind)
  config.model.update(pretrained.hf_model_fields(folder))
  config.train.init_from = f'hf:{folder}'
  config.diffusion.clean_ce_weight = float(arg.lam) if arg.kind == 'ar_dblock' else 0.0
  return config
