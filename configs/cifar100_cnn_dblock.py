"""CIFAR-100 classification, DiffusionBlocks (B = 3, γ = 0.1) on configs/cifar100_cnn.py's convolutional stack:
paper Table 6 (NoProp's comparison). For a GPU.

  python -m diffblocks_jax.main --config=configs/cifar100_cnn_dblock.py --workdir=workdirs/cifar100_cnn_dblock
  python -m diffblocks_jax.main --config=configs/cifar100_cnn_dblock.py:recipe=tuned \\
      --workdir=workdirs/cifar100_cnn_dblock_tuned

recipe=paper (default): Table 6's (AdamW lr 1e-4, batch 128, 1000 epochs, B = 3, γ = 0.1) with EDM's noise plan.
recipe=tuned: the same with the classification recipe validated on digits (`common.tuned`: noise plan 'matched',
normalised embeddings), what configs/digits_cnn_dblock.py uses.
1000 epochs is the baseline's; each step trains one block of 2 layers, so the run takes 1000 x B epochs of steps
for the baseline's layer-updates (train.scale_epochs_by_blocks; set it False for 1000 epochs of steps).

Reached: not run here (it needs a GPU); the paper reports 46.88 % (NoProp-DT 46.06 %, backprop 47.80 %).
"""

from configs import cifar100_cnn
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, recipe=('paper', 'tuned'))
  config = cifar100_cnn.cnn('cnn_dblock')
  if arg.recipe == 'tuned':
    config = common.tuned(config)
  return config
