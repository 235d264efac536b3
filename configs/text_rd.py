"""Recurrent depth on CPython's documentation text, end to end (paper Table 5's Huginn baseline, at CPU size): a
Llama-style causal LM of 1 prelude layer, one 2-layer recurrent block unrolled r times per step (r = 1 +
Poisson(λ), λ log-normal with mean 7: Huginn's distribution, E[r] = 8), gradients through the last k = 4 unrolls
only, 1 coda layer (models/recurrent.py). Evaluated at depth 8 (eval.num_inference_steps, 0 = the mean depth).
Its samples are scored by the end-to-end model of configs/text_ar.py, as DiffusionBlocks' are, so train that
first:

  python -m diffblocks_jax.main --config=configs/text_ar.py --workdir=workdirs/text_ar
  python -m diffblocks_jax.main --config=configs/text_rd.py --workdir=workdirs/text_rd
  python -m diffblocks_jax.main --mode=eval --workdir=workdirs/text_rd --config.eval.num_inference_steps=32

The paper's shape halved (2 prelude, 4-layer block, 2 coda, mean depth 32, k = 8 → 1, 2, 1, 8, 4), as its ratios
are: prelude : block : coda = 1 : 2 : 1, mean depth / k = 4. Budget: training FLOPs (eval/train_flops, the
analytic estimate of models/recurrent.py). This run's 4 epochs cost 2.89e13; configs/text_rd_dblock.py's 6 epochs
2.80e13, no more. Steps or layer-updates would not compare: a step here runs ~18 layers forward and backpropagates
through ~10, one of DiffusionBlocks' runs 4 layers over a sequence twice as long.

Writes eval/bpc (held out, at the evaluation depth), eval/gen_ppl (its samples under workdirs/text_ar),
eval/sample_entropy and eval/train_flops. Reached: docs/results.md, "Recurrent depth (paper Table 5)".
"""

from configs import common


def recurrent(config, *, prelude: int, coda: int, mean_depth: float | None = None, backprop_depth: int = 0):
  """config.model.recurrent (models/recurrent.py): the prelude and coda both recurrent-depth kinds read, and, given
  `mean_depth`, the depth draw that 'rd' trains with."""
  fields = dict(prelude_layers=prelude,  # Causal layers before the recurrent block.
                coda_layers=coda)  # And after it.
  if mean_depth is not None:
    fields.update(
        mean_depth=mean_depth,  # E[r]: unrolls per training step; the evaluation depth if eval.num_inference_steps=0.
        backprop_depth=backprop_depth,  # k: gradients through the last k unrolls (truncated backpropagation).
        min_depth=1,  # r >= 1: r = min_depth + Poisson(λ).
        depth_distribution='lognormal_poisson',  # Huginn's: λ = exp(τ), τ ~ N(ln(E[r] − 1) − σ²/2, σ).
        depth_sigma=0.5)  # σ (Huginn).
  config.model.recurrent = fields
  return config


def get_config():
  config = common.text_autoregressive('rd')
  config.model.num_layers = 2  # The recurrent block's layers.
  recurrent(config, prelude=1, coda=1, mean_depth=8.0, backprop_depth=4)
  config.train.num_epochs = 4  # 816 steps of batch 32: 2.89e13 training FLOPs.
  return config
