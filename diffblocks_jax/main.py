"""Entry point: parses flags and calls the library.

  python -m diffblocks_jax.main --config=configs/cifar100_dblock.py --workdir=workdirs/run1 \
      [--mode=train|eval|sample] [--config.optim.lr=5e-4 ...]
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from diffblocks_jax import distributed, locking, train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'sample'],
                          'Train (and resume), evaluate a checkpoint, or write samples (image generation).')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 100, '--mode=sample: how many samples go into the .npz.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  distributed.maybe_initialize(config)
  logging.info('Config:\n%s', config)
  if _MODE.value == 'train':
    try:
      train.train_and_evaluate(config, _WORKDIR.value)
    except train.Preempted as e:
      logging.warning('%s', e)
      sys.exit(train.EXIT_PREEMPTED)
    except locking.WorkdirBusyError as e:
      logging.error('%s', e)
      sys.exit(2)
  elif _MODE.value == 'eval':
    train.evaluate(config, _WORKDIR.value)
  else:
    train.sample(config, _WORKDIR.value, _NUM_SAMPLES.value)


if __name__ == '__main__':
  app.run(main)
