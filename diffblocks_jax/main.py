"""Entry point: parses flags and calls the library.

  python -m diffblocks_jax.main --config=configs/cifar100_dblock.py --workdir=workdirs/run1
      [--mode=train|eval|sample] [--config.optim.lr=5e-4 ...] [--library_logs]
  python -m diffblocks_jax.main --workdir=workdirs/run1 --mode=eval [--config.eval.cfg_scale=2 ...]
  python -m diffblocks_jax.main --mode=merge --workdir=OUT --from=W0,W1,W2   # block jobs → one run

Without --config, every mode reads the run's WORKDIR/config.json (training resumes the run as it was started).
A mistake (an unknown flag or config field, a missing config file, workdir or checkpoint, an impossible setting)
prints one message and exits 2. The full config goes to WORKDIR/config.json and the debug log, not the console.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from diffblocks_jax import cli
from diffblocks_jax.training import block_jobs, distributed, evaluation, train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (eval, sample: default '
                                          'WORKDIR/config.json).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'sample', 'merge'],
                          'Train (and resume), evaluate a checkpoint, write samples, or merge block jobs '
                          '(docs/block_jobs.md).')
_FROM = flags.DEFINE_list('from', [], '--mode=merge: the block jobs\' workdirs, comma-separated.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 100, '--mode=sample: how many samples go into the .npz.')
_LIBRARY_LOGS = flags.DEFINE_bool('library_logs', False, "Show the INFO lines of Orbax, JAX and TensorFlow "
                                  '(hidden by default: they drown the progress lines).')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv  # cli.parse_flags refuses extra arguments.
  cli.quiet_library_logs(not _LIBRARY_LOGS.value)
  config, workdir = _CONFIG.value, _WORKDIR.value
  with cli.exit_on_user_error():
    if _MODE.value == 'merge':  # Reads the jobs' configs: no --config, no devices to initialise.
      print(block_jobs.merge(workdir, _FROM.value))
      return
    distributed.maybe_initialize(config)
    logging.debug('Config:\n%s', config)
    try:
      if _MODE.value == 'train':
        train.train_and_evaluate(config, workdir)
      elif _MODE.value == 'eval':
        logging.set_verbosity(logging.WARNING)  # The answer only; warnings still show.
        print(evaluation.evaluate(config, workdir)[1])
      else:
        logging.set_verbosity(logging.WARNING)
        print(evaluation.sample(config, workdir, _NUM_SAMPLES.value))
    except train.Preempted as e:  # SIGTERM or Ctrl-C during training: what is saved, in one line.
      logging.warning('%s', e)
      sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop's care (loading, evaluating): nothing to save.
      sys.stderr.write(f'\nStopped by Ctrl-C (--mode={_MODE.value}); nothing was written by this command after '
                       'that point.\n')
      sys.exit(train.EXIT_INTERRUPTED)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
