"""scikit-learn's digits (8x8 grayscale, 10 classes, offline), DiffusionBlocks B = 3 on configs/digits_cnn.py's
CNN (6 conv layers, 32 channels; 2 layers per block, each FiLM-conditioned on the noisy label and σ), with the
classification recipe validated on digits (`common.tuned`); minutes on a CPU.

  python -m diffblocks_jax.main --config=configs/digits_cnn_dblock.py --workdir=workdirs/digits_cnn_dblock

Equal layer-updates: the baseline's epochs, times B (train.scale_epochs_by_blocks): each step trains one block of
2 layers instead of 6.

Reached (test split, seeds 0, 1, 2): 98.6 / 98.1 / 96.9 % (97.9 ± 0.9 %; the CNN: 99.4 ± 0.6 %; docs/results.md,
"A convolutional stack").
"""

from configs import common
from configs import digits_cnn


def get_config():
  config = common.tuned(digits_cnn.cnn('cnn_dblock'))  # Noise plan 'matched', normalised embeddings.
  return config
