"""Recurrent depth on LM1B at the paper's size (Table 5), for a GPU: a Huginn-style model the size of Pythia-70M,
hidden 512, 8 heads, 2 prelude layers, one 4-layer recurrent block, 2 coda layers; DiffusionBlocks with the block
weight-tied over B = 4 noise slices (γ = 0.1, the paper's LM1B setting) and the recipe that worked on the CPython
text ('matched' noise plan, σ_min 0.06, the ancestral sampler: configs/text_ar_dblock.py recipe=tuned). The
baseline ('rd', kind=rd) unrolls the block r times, E[r] = 32, with 8-step truncated backpropagation.

  python -m diffblocks_jax.main --config=configs/lm1b_rd_dblock.py:kind=ar --workdir=workdirs/lm1b_ar
  python -m diffblocks_jax.main --config=configs/lm1b_rd_dblock.py:kind=rd --workdir=workdirs/lm1b_rd
  python -m diffblocks_jax.main --config=configs/lm1b_rd_dblock.py --workdir=workdirs/lm1b_rd_dblock

kind=ar is the judge (a plain 8-layer causal LM on the same bytes, eval.scorer_workdir of the other two).
Vocabulary: UTF-8 bytes (256 tokens) of TFDS lm1b's sentences, as a stream cut into windows of 128; the paper used
Llama-2's 32K-token tokenizer and scored with Llama-2 and GPT2-XL, so its perplexities (17.04, 16.08) and ours
do not compare, only the direction does. Budget: as the paper's, epochs (5 for the baseline, 15 for
DiffusionBlocks); eval/train_flops says what each cost (the paper: DiffusionBlocks about 10x less).

Reached: not run here (it needs a GPU and the TFDS lm1b download).
"""

from configs import common
from configs import text_ar_dblock
from configs import text_rd


def get_config(arg=None):
  arg = common.parse_arg(arg, kind=('rd_dblock', 'rd', 'ar'))
  if arg.kind == 'rd_dblock':
    config = text_ar_dblock.get_config('recipe=tuned')
    config.model.kind = 'rd_dblock'
    config.model.weight_tied = True  # One row of 4 layers serves the 4 noise slices.
    config.model.num_layers = 16  # B x 4: num_layers / num_blocks = 4 layers in the block.
    text_rd.recurrent(config, prelude=2, coda=2)
    config.train.scale_epochs_by_blocks = False  # The one block trains every step.
    config.train.num_epochs = 15  # Paper: 15 epochs against the baseline's 5.
    config.eval.num_inference_steps = 32  # The baseline's mean depth.
  else:
    config = common.text_autoregressive(arg.kind)
    config.train.num_epochs = 5  # Paper (the baseline).
    if arg.kind == 'rd':
      config.model.num_layers = 4  # The recurrent block.
      text_rd.recurrent(config, prelude=2, coda=2, mean_depth=32.0, backprop_depth=8)  # Paper.
    else:
      config.model.num_layers = 8  # The judge: a plain causal LM.
  config.data.source = 'text'
  config.data.name = 'lm1b'  # TFDS: train and test splits, feature 'text'.
  config.data.path = ''
  config.data.vocab = 'byte'
  config.data.seq_len = 128
  config.model.hidden_size = 512  # Pythia-70M's width and heads.
  config.model.num_heads = 8
  config.model.num_blocks = 4
  config.optim.lr = 3e-4
  config.optim.schedule = 'cosine_with_min_lr'
  config.optim.warmup_epochs = 0.05
  config.train.batch_size = 256
  config.train.steps_per_call = 100
  config.train.log_every_steps = 500
  config.train.checkpoint_every_steps = 5000
  config.train.eval_every_epochs = 1.0
  config.eval.batch_size = 256
  config.eval.num_samples = 64
  config.eval.scorer_workdir = 'workdirs/lm1b_ar'
  return config
