"""scikit-learn's digits (8x8 grayscale, 10 classes, offline): class-conditional generation with the end-to-end
DiT inside EDM; minutes on a CPU. The quality figures need a classifier trained on the same split first:

  python -m diffblocks_jax.main --config=configs/digits_vit.py --workdir=workdirs/digits_vit
  python -m diffblocks_jax.main --config=configs/digits_dit.py --workdir=workdirs/digits_dit

Writes WORKDIR/samples/step_<N>.png (a row per class) at each evaluation, and eval/fd, eval/fd_floor,
eval/sample_accuracy to metrics.jsonl (README: what they are, and what this config reached).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from digits_vit import digits_base  # pylint: disable=g-import-not-at-top,wrong-import-position


def digits_dit_base(kind: str):
  """The small offline generation setting shared by both digits DiT configs."""
  config = digits_base(kind)
  config.data.mean, config.data.std = (0.5,), (0.5,)  # Pixels to [-1, 1]: EDM's sigma_data = 0.5 scale.
  config.data.pad_crop = 0  # The image itself is the target: no crops.
  config.model.hidden_size = 128
  config.model.num_heads = 4
  config.model.num_layers = 6
  config.model.patch_size = 2  # 16 tokens.
  config.diffusion.class_dropout_prob = 0.1  # Null class 10 % of the time, for guidance (paper).
  config.optim.lr = 1e-3
  config.optim.weight_decay = 0.0
  config.optim.warmup_epochs = 5.0
  config.train.batch_size = 128
  config.train.num_epochs = 400
  config.train.steps_per_call = 11  # One epoch (1437 // 128 = 11 steps) per compiled call.
  config.train.log_every_steps = 220
  config.train.checkpoint_every_steps = 1100
  config.train.eval_every_epochs = 100.0
  config.eval.batch_size = 360
  config.eval.num_inference_steps = 50  # Euler on the release's quantile grid (paper).
  config.eval.cfg_scale = 2.0  # Paper.
  config.eval.classifier_workdir = 'workdirs/digits_vit'
  return config


def get_config():
  return digits_dit_base('dit')
