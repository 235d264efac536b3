"""scikit-learn's digits: class-conditional generation with the end-to-end DiT (6 layers, hidden 128, patch 2)
inside EDM (`common.digits_generation`); minutes on a CPU. Its quality figures need a classifier trained on the
same split first:

  python -m diffblocks_jax.main --config=configs/digits_vit.py --workdir=workdirs/digits_vit
  python -m diffblocks_jax.main --config=configs/digits_dit.py --workdir=workdirs/digits_dit

Writes WORKDIR/samples/step_<N>.png (a row per class) at each evaluation, and eval/fd, eval/fd_floor,
eval/sample_accuracy to metrics.jsonl.

Reached: eval/fd 1.645 (floor 0.363), sample accuracy 1.000.
"""

from configs import common


def get_config():
  return common.digits_generation('dit')
