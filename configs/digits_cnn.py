"""scikit-learn's digits (8x8 grayscale, 10 classes, offline), end-to-end CNN (models/cnn.py: 6 residual 3x3 conv
layers, 32 channels): the baseline of configs/digits_cnn_dblock.py (paper Table 6's comparison on a convolutional
stack); minutes on a CPU.

  python -m diffblocks_jax.main --config=configs/digits_cnn.py --workdir=workdirs/digits_cnn

Reached (test split, seeds 0, 1, 2): 98.9 / 100.0 / 99.4 % (99.4 ± 0.6 %; docs/results.md, "A convolutional
stack").
"""

from configs import common


def cnn(kind: str):
  """The digits CNN pair's shared fields: the digits setting (`common.digits`) with the CNN's sizes."""
  config = common.digits(kind)
  # Stem: a 2x2, stride-2 convolution, so the layers work on 4x4 maps (the 8x8 maps of a 1x1 stem cost 4x the
  # time per step on the CPU).
  config.model.patch_size = 2
  config.model.hidden_size = 32  # Channels of every conv layer; also the label embedding's width.
  config.model.num_layers = 6  # B = 3 blocks of 2 for DiffusionBlocks.
  config.model.mlp_dim = 64  # The head's fully connected layer.
  return config


def get_config():
  return cnn('cnn')
