"""CIFAR-10 class-conditional generation, end-to-end DiT-S/2 in EDM: the paper's Table 2 baseline setting.

  python -m diffblocks_jax.main --config=configs/cifar10_vit.py --workdir=workdirs/cifar10_vit
  python -m diffblocks_jax.main --config=configs/cifar10_dit.py --workdir=workdirs/cifar10_dit

Paper (Inception FID, train / test): 32.84 / 39.83. Not reproduced here (no GPU was available): this project
reports the offline eval/fd (classifier features) and eval/sample_accuracy instead; see the README.
"""

from diffblocks_jax import config as config_lib


def cifar10_dit_base(kind: str):
  config = config_lib.get_base_config()
  config.data.name = 'cifar10'
  config.data.mean, config.data.std = (0.5,), (0.5,)  # Pixels to [-1, 1].
  config.data.pad_crop = 0  # The image is the target: flips only.
  config.model.kind = kind
  config.model.hidden_size = 384  # DiT-S/2: 12 layers, hidden 384, 6 heads, patch 2.
  config.model.num_layers = 12
  config.model.num_heads = 6
  config.model.patch_size = 2
  config.model.num_blocks = 3  # B = 3 (paper).
  config.diffusion.overlap = 0.05  # gamma (paper).
  config.diffusion.class_dropout_prob = 0.1  # Null class for guidance (paper).
  config.optim.lr = 1e-4  # AdamW, batch 512, lr 1e-4, 100 epochs (paper); DiT's zero weight decay.
  config.optim.weight_decay = 0.0
  config.train.batch_size = 512
  config.train.num_epochs = 100
  config.train.log_every_steps = 100
  config.train.checkpoint_every_steps = 1000
  config.train.eval_every_epochs = 10.0
  config.eval.batch_size = 500
  config.eval.num_inference_steps = 50  # Euler, 50 steps, guidance 2.0 (paper).
  config.eval.cfg_scale = 2.0
  config.eval.num_samples = 10000
  config.eval.classifier_workdir = 'workdirs/cifar10_vit'
  return config


def get_config():
  return cifar10_dit_base('dit')
