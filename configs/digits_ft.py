"""Image fine-tuning on scikit-learn's digits (issue 25; docs/finetune.md): a ViT pretrained end to end on the
digits 0-4 ("split A") starts a DiffusionBlocks ViT (B = 3) that learns the digits 5-9 ("split B", labels 0-4),
against the same run from random weights. The head and the label embeddings are new (another label set); the
patch and position embeddings and each block's layers come from the ViT (models/pretrained.from_end_to_end).

  python -c "from configs import digits_ft; digits_ft.write_splits('workdirs')"
  python -m diffblocks_jax.main --config=configs/digits_ft.py:stage=pretrain --workdir=workdirs/digits_vit_a
  python -m diffblocks_jax.main --config=configs/digits_ft.py:stage=finetune --workdir=workdirs/digits_dblock_b_ft
  python -m diffblocks_jax.main --config=configs/digits_ft.py:stage=scratch --workdir=workdirs/digits_dblock_b

What it reached (2-core x86-64 CPU): docs/finetune.md, "What was measured".
"""

import os

import numpy as np

from configs import common


def write_splits(folder: str, seed: int = 0):
  """folder/digits_a.npz (digits 0-4) and folder/digits_b.npz (digits 5-9 as labels 0-4): 80/20 per class, seeded."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # As the 'digits' source.
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  for name, classes in (('a', range(5)), ('b', range(5, 10))):
    train, test = [], []
    for c in classes:
      rows = rng.permutation(np.flatnonzero(digits.target == c))
      cut = int(round(0.8 * len(rows)))
      train.append(rows[:cut])
      test.append(rows[cut:])
    train, test = np.concatenate(train), np.concatenate(test)
    label = lambda rows: (digits.target[rows] - min(classes)).astype(np.int64)
    np.savez(os.path.join(folder, f'digits_{name}.npz'), x_train=images[train], y_train=label(train),
             x_test=images[test], y_test=label(test))


def get_config(arg=None):
  arg = common.parse_arg(arg, stage=('pretrain', 'finetune', 'scratch'))
  config = common.digits('vit' if arg.stage == 'pretrain' else 'dblock')
  config.data.source = 'npz'
  config.data.path = 'workdirs/digits_a.npz' if arg.stage == 'pretrain' else 'workdirs/digits_b.npz'
  config.train.steps_per_call = 11  # 719 training images of split A or B: 11 steps of 64 per epoch.
  config.train.log_every_steps = 55
  config.train.checkpoint_every_steps = 220
  if arg.stage == 'pretrain':
    config.train.num_epochs = 100
    return config
  # Fine-tuning and its baseline: a short budget (20 epochs x B), the same for both.
  config.train.num_epochs = 20
  config.optim.warmup_epochs = 1.0
  config.train.eval_every_epochs = 0.0
  if arg.stage == 'finetune':
    config.train.init_from = 'workdirs/digits_vit_a'
  return config
