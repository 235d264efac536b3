"""ViT-B/16 pretrained on ImageNet-21k (Hugging Face google/vit-base-patch16-224-in21k) fine-tuned block-wise on
CIFAR-100 (issue 25; docs/finetune.md): DiffusionBlocks with B = 3 blocks of 4 of its 12 layers, the paper's
'concat' label token (the pretrained CLS token stays, the noisy label gets a position of its own), a new label
table and head for the 100 classes. For a GPU.

The checkpoint reads 224 x 224 images: the data pipeline has no resize, so CIFAR-100 is prepared once at 224 as a
.npz (9 GB as uint8; the pipeline holds whole splits on the device), normalised as the checkpoint was (mean 0.5,
std 0.5). Another size works too: the position embeddings are resized as Hugging Face's interpolate_pos_encoding
does (e.g. 96 x 96 = 6 x 6 patches, 1.3 GB).

  huggingface-cli download google/vit-base-patch16-224-in21k --local-dir workdirs/vit-b16-in21k
  # (only pytorch_model.bin there? load it with transformers and save_pretrained(..., safe_serialization=True))
  python -c "from configs import cifar100_vit_b16_ft_dblock as c; c.write_resized('workdirs/cifar100_224.npz')"
  python -m diffblocks_jax.main --config=configs/cifar100_vit_b16_ft_dblock.py --workdir=workdirs/cifar100_b16_ft

Expected memory per step: `python -m diffblocks_jax.tools.memory --config=configs/cifar100_vit_b16_ft_dblock.py`
(docs/finetune.md). Reached: not run here (it needs a GPU).
"""

from configs import common

IMAGE_SIZE = 224


def write_resized(path: str, size: int = IMAGE_SIZE):
  """CIFAR-100 (TFDS, fine labels) resized bilinearly to size x size, as x_train/y_train/x_test/y_test."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  out = {}
  for split in ('train', 'test'):
    ds = tfds.load('cifar100', split=split, batch_size=1000)
    xs, ys = [], []
    for batch in tfds.as_numpy(ds):
      resized = tf.image.resize(batch['image'], (size, size), method='bilinear', antialias=False)
      xs.append(np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8))
      ys.append(batch['label'].astype(np.int64))
    out[f'x_{split}'], out[f'y_{split}'] = np.concatenate(xs), np.concatenate(ys)
  np.savez(path, **out)


def get_config():
  config = common.base('dblock')
  config.data.source = 'npz'
  config.data.path = 'workdirs/cifar100_224.npz'
  config.data.mean, config.data.std = (0.5,), (0.5,)  # The checkpoint's image processor.
  config.data.pad_crop = 16  # The release's 4 of 32 pixels, at 224.
  # ViT-B/16 as its config.json says (load_hf checks each field against it).
  m = config.model
  m.hidden_size, m.num_layers, m.num_heads, m.mlp_dim, m.patch_size = 768, 12, 12, 3072, 16
  m.layer_norm_eps = 1e-12
  m.dropout = m.attention_dropout = 0.0  # The checkpoint's hidden and attention dropout.
  m.num_blocks = 3
  m.compute_dtype = 'bfloat16'
  common.tuned(config)  # 'matched' noise plan, the 'concat' label token, normalised label embeddings.
  config.train.init_from = 'hf:workdirs/vit-b16-in21k'
  # Fine-tuning: 10 epochs x B, AdamW 1e-4 with a 1-epoch warm-up and cosine decay, batch 128.
  config.optim.lr = 1e-4
  config.optim.schedule = 'cosine_with_min_lr'
  config.optim.warmup_epochs = 1.0
  config.optim.weight_decay = 0.05
  config.train.batch_size = 128
  config.train.num_epochs = 10
  config.train.steps_per_call = 50
  config.train.log_every_steps = 200
  config.train.checkpoint_every_steps = 2000
  config.train.eval_every_epochs = 5.0
  config.eval.batch_size = 250
  return config
