"""Tiny-ImageNet (64 px, 200 classes), DiffusionBlocks B=2, the paper's setting (published: 36.16 % vs 35.32 %
for the end-to-end ViT): hidden 768, 12 heads, 12 layers, patch 4 (257 tokens), batch 256, lr 1e-4, 100 epochs.

The data come from disk in Tiny-ImageNet's own layout (train/<wnid>/images/*.JPEG, val/images + val_annotations.txt):

  python -m diffblocks_jax.main --config=configs/tinyimagenet_dblock.py --workdir=workdirs/tin_dblock \
      --config.data.path=/data/tiny-imagenet-200

Augmentation as in the release's data module: RandomResizedCrop(64) (scale 0.08-1, ratio 3/4-4/3, bilinear)
and a horizontal flip; test images unchanged (its Resize(64) + CenterCrop(64) is the identity at 64 px).
The release's Tiny-ImageNet LR schedule is not known here: the default (constant, no warm-up) is kept.
"""

from diffblocks_jax import config as config_lib


def get_config():
  config = config_lib.get_base_config()
  config.data.source = 'folder'
  config.data.path = ''  # Set on the command line: the tiny-imagenet-200 folder.
  config.data.mean = (0.485, 0.456, 0.406)  # ImageNet statistics.
  config.data.std = (0.229, 0.224, 0.225)
  config.data.pad_crop = 0
  config.data.random_resized_crop = True
  config.model.kind = 'dblock'
  config.model.hidden_size = 768
  config.model.num_heads = 12
  config.model.num_blocks = 2
  config.train.batch_size = 256
  config.train.num_epochs = 100
  config.optim.lr = 1e-4
  config.eval.batch_size = 250
  return config
