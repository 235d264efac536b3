"""Recurrent depth with DiffusionBlocks on CPython's documentation text (paper Table 5, at CPU size): the
autoregressive DiffusionBlocks network of configs/text_ar_dblock.py (recipe=tuned) whose B = 4 blocks are ONE
weight-tied 2-layer block (model.weight_tied), between a shared 1-layer prelude and 1-layer coda
(models/recurrent.py). A training step runs prelude → block → coda once, at one noise level; sampling runs them
once per sampler step, so the recurrent block's depth is N = eval.num_inference_steps (8 here: configs/text_rd.py's
mean depth). Train configs/text_ar.py first (it scores the samples), and configs/text_rd.py to compare:

  python -m diffblocks_jax.main --config=configs/text_ar.py --workdir=workdirs/text_ar
  python -m diffblocks_jax.main --config=configs/text_rd_dblock.py --workdir=workdirs/text_rd_dblock
  python -m diffblocks_jax.main --mode=eval --workdir=workdirs/text_rd_dblock --config.eval.num_inference_steps=32

Budget: training FLOPs, against configs/text_rd.py (eval/train_flops, models/recurrent.py's estimate): 6 epochs
(1224 steps) cost 2.80e13, the baseline's 4 epochs 2.89e13. The paper gave DiffusionBlocks 3x the baseline's epochs
at about a tenth of its compute; here it gets 1.5x the steps at slightly less compute (the baseline's mean depth is
8, not 32).

Writes eval/gen_ppl (its samples under workdirs/text_ar), eval/sample_entropy, eval/ce_block{b} (each noise slice
under the one block) and eval/train_flops. Reached: docs/results.md, "Recurrent depth (paper Table 5)".
"""

from configs import text_ar_dblock
from configs import text_rd


def get_config():
  config = text_ar_dblock.get_config('recipe=tuned')  # Noise plan 'matched', σ_min 0.06, the ancestral sampler.
  config.model.kind = 'rd_dblock'
  config.model.weight_tied = True  # One row of block parameters serves the B = 4 noise slices.
  config.model.num_layers = 8  # B x 2: the weight-tied block has num_layers / num_blocks = 2 layers.
  text_rd.recurrent(config, prelude=1, coda=1)
  config.train.scale_epochs_by_blocks = False  # The one block trains every step: epochs are set, not scaled by B.
  config.train.num_epochs = 6  # 1224 steps: 2.80e13 training FLOPs, <= configs/text_rd.py's 2.89e13.
  config.eval.num_inference_steps = 8  # The recurrent block's depth at sampling (any N >= 1).
  return config

