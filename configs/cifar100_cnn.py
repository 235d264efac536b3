"""CIFAR-100 classification on a convolutional stack, end to end: the backprop baseline of paper Table 6 (NoProp's
comparison), paired with configs/cifar100_cnn_dblock.py. For a GPU.

  python -m diffblocks_jax.main --config=configs/cifar100_cnn.py --workdir=workdirs/cifar100_cnn

The network is models/cnn.py (its docstring says what of NoProp's CNN it keeps and what it assumes): a 2x2,
stride-2 stem to 16x16 maps, 6 residual 3x3 conv layers of 128 channels (NoProp's widest), global pooling, an FC
head of 256 units. Table 6's recipe: AdamW lr 1e-4, batch 128, 1000 epochs; crops and flips as the release's.

Reached: not run here (it needs a GPU); the paper reports 47.80 % for backprop on NoProp's own CNN.
"""

from configs import common


def cnn(kind: str):
  """The CIFAR-100 CNN pair's shared fields at Table 6's recipe."""
  config = common.cifar100(kind)
  config.model.patch_size = 2  # Stem: 32x32 -> 16x16 maps.
  config.model.hidden_size = 128  # Channels of every conv layer (NoProp's last conv); the label embedding's width.
  config.model.num_layers = 6  # B = 3 blocks of 2 for DiffusionBlocks (Table 6: B = 3).
  config.model.num_blocks = 3
  config.model.mlp_dim = 256  # The head's FC layer (NoProp's FC(256)).
  config.model.dropout = 0.2  # Assumed: NoProp's CNN drops 20 % after each conv stage (public descriptions).
  config.model.attention_dropout = 0.0  # No attention.
  config.diffusion.overlap = 0.1  # γ (Table 6).
  config.optim.lr = 1e-4  # AdamW, lr 1e-4, batch 128, 1000 epochs (Table 6); constant lr (no schedule stated).
  config.optim.weight_decay = 1e-3  # Assumed: NoProp's (Table 6 states none).
  config.train.batch_size = 128
  config.train.num_epochs = 1000  # DiffusionBlocks: x B (train.scale_epochs_by_blocks), equal layer-updates.
  config.train.log_every_steps = 390
  config.train.checkpoint_every_steps = 3900
  config.train.eval_every_epochs = 50.0
  return config


def get_config():
  return cnn('cnn')
