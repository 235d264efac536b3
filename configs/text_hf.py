"""Fine-tuning a Hugging Face Llama-family checkpoint (Llama, SmolLM, Qwen2; a local folder with config.json and
*.safetensors) on text, end to end or block-wise (issue 25; docs/finetune.md). The model fields are the
checkpoint's (`models.pretrained.hf_model_fields`), train.init_from is hf:FOLDER, the rest is the small text
setting of configs/text_ar.py:

  python -m diffblocks_jax.main --config=configs/text_hf.py:FOLDER --workdir=workdirs/hf_ar \
      --config.data.source=text --config.data.path=corpus.txt
  python -m diffblocks_jax.main --config=configs/text_hf.py:FOLDER,kind=ar_dblock,lam=0.1 --workdir=... \
      --config.eval.scorer_workdir=workdirs/hf_ar

The data's token ids must be the checkpoint's. A folder with a tokenizer.json (what save_pretrained writes for a
fast tokenizer, as on the Hub) is read with it: data.vocab='tokenizer', data.tokenizer=FOLDER and
data.vocab_size=the checkpoint's vocab_size (its embedding rows, which may round the tokenizer's size up). A folder
without one keeps data.vocab 'char': then the checkpoint must have been trained on the same characters (the
import refuses a vocabulary of another size in one line).

Without FOLDER it takes the tiny test checkpoint tests/fixtures/hf/llama_tokenizer (random weights, a 384-token
byte-level BPE trained on the CPython text: a smoke test that runs offline on the default data).
"""

import os

from configs import common
from diffblocks_jax import config as config_lib
from diffblocks_jax.data import tokenizer
from diffblocks_jax.models import hf_checkpoint, pretrained


SMOKE_TEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests', 'fixtures', 'hf',
                          'llama_tokenizer')


def get_config(arg=None):
  folder, _, rest = (arg or '').partition(',')
  if '=' in folder:
    raise config_lib.ConfigError('configs/text_hf.py takes the checkpoint folder first: '
                                 '--config=configs/text_hf.py:FOLDER[,kind=ar_dblock][,lam=0.1]')
  folder = folder or SMOKE_TEST
  arg = common.parse_arg(rest, kind=('ar', 'ar_dblock'), lam=('0', '0.1', '0.3', '1', '3'))
  config = common.text_autoregressive(arg.kind)
  config.model.update(pretrained.hf_model_fields(folder))
  # B = 4 (the text configs') where the checkpoint's depth divides, else the largest of 3, 2 that does (SmolLM's 30
  # layers: 3); --config.model.layers_per_block gives any other cut.
  config.model.num_blocks = next(b for b in (4, 3, 2, 1) if config.model.num_layers % b == 0)
  config.train.init_from = f'hf:{folder}'
  if os.path.isfile(os.path.join(os.path.expanduser(folder), tokenizer.FILE)):
    config.data.vocab, config.data.tokenizer = 'tokenizer', folder
    config.data.vocab_size = hf_checkpoint.read_hf_config(folder)['vocab_size']
  # The samples' judge reads the same tokens: an end-to-end run of this checkpoint (the docstring), not text_ar.py's.
  config.eval.scorer_workdir = ''
  config.diffusion.clean_ce_weight = float(arg.lam) if arg.kind == 'ar_dblock' else 0.0
  return config
