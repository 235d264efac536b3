"""A ~1B-parameter byte-level decoder, for the memory planner only: it has never been trained, here or elsewhere.

  python -m diffblocks_jax.tools.memory --config=configs/lm_1b_plan.py --device_memory=80GiB

The size of the independent report on checkpointing against DiffusionBlocks (a 0.72B decoder, 28 layers in
blocks of 7, context 1280): a Llama-style decoder (RMSNorm, SwiGLU, rotary), 28 layers, hidden 1664, 13 heads of
128, SwiGLU width 8/3 x hidden (0.93B parameters end to end; the DiffusionBlocks form adds adaLN modulation to
every layer, 1.4B), bytes (256 tokens), context 1280, B = 4 blocks of 7 layers, bfloat16 compute (fp32
parameters and Adam), batch 8 sequences per device. The planner pairs it with its end-to-end kind ('ar'). The
DiffusionBlocks LM here diffuses the next token's embedding under the Block Diffusion mask, so its sequence is
[clean | noisy], twice the context (docs/architecture.md, "Language models").

Training it would need a byte-level text (`--config.data.path`), a GPU and a run nobody has made.
"""

from configs import common


def get_config():
  config = common.text_autoregressive('ar_dblock')
  config.data.source = 'text'
  config.data.path = 'corpus.txt'  # Planning reads no data; a training run would name a UTF-8 file here.
  config.data.vocab = 'byte'  # 256 tokens.
  config.data.seq_len = 1280
  config.model.hidden_size = 1664
  config.model.num_heads = 13  # 128 channels each.
  config.model.num_layers = 28
  config.model.num_blocks = 4  # Blocks of 7 layers, as the report's.
  config.model.compute_dtype = 'bfloat16'
  config.train.batch_size = 8
  return config
