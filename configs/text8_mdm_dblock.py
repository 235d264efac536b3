"""text8 masked diffusion with DiffusionBlocks at the paper's size (Table 3, MD4 protocol): a 12-layer DiT-style
transformer, hidden 768, 12 heads, B = 3, γ = 0.05, sequences of 256, batch 256, lr 3e-4, weight decay 0.03,
2,000 warm-up steps. For a GPU and the text8 file (TFDS has no text8: fetch http://mattmahoney.net/dc/text8.zip
and unzip it; 100M characters, 27 symbols):

  python -m diffblocks_jax.main --config=configs/text8_mdm_dblock.py --workdir=workdirs/text8_mdm_dblock \\
      --config.data.path=/path/to/text8

End to end: add --config.model.kind=mdm. Reached: not run here (it needs a GPU and text8); the paper reports 1.45
bits per character with DiffusionBlocks, 1.56 end to end.
"""

from configs import common

TEXT8_TRAIN_CHARACTERS = 95_000_000  # The first 95 % of text8's 100M characters.


def get_config():
  config = common.text('mdm_dblock')
  config.data.source = 'text'
  config.data.path = 'text8'  # The unzipped file (override with --config.data.path).
  # The held-out split is the last 5M characters (MD4's test split); training gets the first 95M (MD4 trains on
  # 90M and validates on the next 5M, which this split trains on).
  config.data.test_fraction = 0.05
  config.data.seq_len = 256
  config.model.hidden_size = 768
  config.model.num_heads = 12
  config.model.num_layers = 12
  config.model.num_blocks = 3
  config.diffusion.overlap = 0.05
  config.optim.lr = 3e-4
  config.optim.weight_decay = 0.03
  config.optim.schedule = 'constant_with_warmup'
  config.train.batch_size = 256
  steps_per_epoch = TEXT8_TRAIN_CHARACTERS // config.data.seq_len // config.train.batch_size
  # 2,000 steps (the schedule counts epochs; block-wise runs scale it by B, as their epochs).
  config.optim.warmup_epochs = 2000 / steps_per_epoch
  config.train.num_epochs = 20
  config.train.steps_per_call = 100
  config.train.log_every_steps = 500
  config.train.checkpoint_every_steps = 5000
  config.train.eval_every_epochs = 1.0
  config.eval.batch_size = 256
  config.eval.num_samples = 16
  return config
