"""CIFAR-100, the paper's recipe, end-to-end ViT (published: 60.25 % top-1).

500 epochs, AdamW lr 5e-4 with cosine decay to 5e-5 after a 10-epoch warm-up,
horizontal flip + RandAugment (2 ops, magnitude 9).

  python -m diffblocks_jax.main --config=configs/cifar100_vit_paper.py --workdir=workdirs/cifar100_vit_paper
"""

from diffblocks_jax import config as config_lib


def paper_recipe(kind: str):
  """The paper's CIFAR-100 training recipe, shared by both paper configs."""
  config = config_lib.get_base_config()
  config.model.kind = kind
  config.optim.lr = 5e-4
  config.optim.schedule = 'cosine_with_min_lr'
  config.optim.min_lr = 5e-5
  config.optim.warmup_epochs = 10.0  # Scaled by B with the epochs (train.scale_epochs_by_blocks).
  config.data.randaugment = True
  return config


def get_config():
  return paper_recipe('vit')
