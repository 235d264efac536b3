"""Masked diffusion language model on CPython's bundled documentation text (~465k characters, offline),
end to end: the baseline of configs/text_mdm_dblock.py; minutes on a CPU.

  python -m diffblocks_jax.main --config=configs/text_mdm.py --workdir=workdirs/text_mdm

Writes eval/bpc (the bound on the held-out tail, bits per character) to metrics.jsonl and samples to
WORKDIR/samples/ (README: what this config reached).
"""

from diffblocks_jax import config as config_lib


def text_base(kind: str):
  """The small offline text setting shared by the four text configs (masked and autoregressive)."""
  config = config_lib.get_base_config()
  config.data.source = 'pydoc'
  config.data.vocab = 'char'  # 103 characters.
  config.data.seq_len = 64
  config.data.test_fraction = 0.1  # The held-out split: the corpus's last 10 %.
  config.model.kind = kind
  config.model.hidden_size = 128
  config.model.num_heads = 4
  config.model.num_layers = 6
  config.model.num_blocks = 3
  config.model.mlp_ratio = 8 / 3  # SwiGLU's three matrices: Llama's width, the parameters of a 4x GELU MLP.
  config.model.dropout = 0.0
  config.model.attention_dropout = 0.0
  config.optim.lr = 2e-3
  config.optim.weight_decay = 0.03  # Paper (text8).
  config.optim.schedule = 'cosine_with_min_lr'
  config.optim.warmup_epochs = 0.25
  config.train.batch_size = 32
  config.train.num_epochs = 6  # x B for DiffusionBlocks: equal layer-updates.
  config.train.steps_per_call = 20
  config.train.log_every_steps = 100
  config.train.checkpoint_every_steps = 500
  config.train.eval_every_epochs = 2.0
  config.eval.batch_size = 128
  config.eval.num_samples = 16
  return config


def get_config():
  return text_base('mdm')
