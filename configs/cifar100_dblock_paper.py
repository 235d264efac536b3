"""CIFAR-100, the paper's recipe, DiffusionBlocks B=3 (published: 59.30 % top-1).

500 epochs (x B = 1,500 block-epochs), AdamW lr 5e-4 with cosine decay to 5e-5 after a 10-epoch warm-up (x B),
horizontal flip + RandAugment (2 ops, magnitude 9).

  python -m diffblocks_jax.main --config=configs/cifar100_dblock_paper.py --workdir=workdirs/cifar100_dblock_paper
"""

from diffblocks_jax import config as config_lib


def get_config():
  config = config_lib.get_base_config()
  config.model.kind = 'dblock'
  config.optim.lr = 5e-4
  config.optim.schedule = 'cosine_with_min_lr'
  config.optim.min_lr = 5e-5
  config.optim.warmup_epochs = 10.0  # Scaled by B with the epochs (train.scale_epochs_by_blocks).
  config.data.randaugment = True
  return config
