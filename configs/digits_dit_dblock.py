"""scikit-learn's digits: class-conditional generation with DiffusionBlocks, the DiT's 6 layers cut into B = 3
blocks of 2, each trained alone on its third of the noise levels (`common.digits_generation`); minutes on a CPU.
Same layer-updates as configs/digits_dit.py (each step trains 2 of 6 layers, for 3x the epochs). Its quality
figures need a classifier trained on the same split first:

  python -m diffblocks_jax.main --config=configs/digits_vit.py --workdir=workdirs/digits_vit
  python -m diffblocks_jax.main --config=configs/digits_dit_dblock.py --workdir=workdirs/digits_dit_dblock

Reached: eval/fd 1.549 (floor 0.363; end to end 1.645), sample accuracy 1.000.
"""

from configs import common


def get_config():
  return common.digits_generation('dit_dblock')
