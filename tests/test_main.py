"""The command line (main.py, cli.py): mistakes answered in one message with exit status 2 (unknown fields, a
missing config file, missing TFDS data, a workdir without a run), quiet logs, and eval from a workdir's own
config with overrides on top (also of fields the run predates). Each subprocess costs a JAX start-up (~10 s on a
CPU): they are few."""

import json
import logging
import os

import pytest

from diffblocks_jax import cli
from diffblocks_jax.training import checkpointing, reporting
import helpers
from helpers import ROOT, base_config, run_cli, shipped_config

# The tiny digits baseline: 22 steps of 64 in two compiled calls, a checkpoint and a progress line after each.
TINY = ['--config=configs/testing.py:vit', '--config.data.source=digits', '--config.data.mean=(0.3,)',
        '--config.data.std=(0.4,)', '--config.model.patch_size=2', '--config.train.num_epochs=1',
        '--config.train.batch_size=64', '--config.train.steps_per_call=11', '--config.train.log_every_steps=11',
        '--config.train.checkpoint_every_steps=11']


def assert_one_message(proc, *expected):
  """Exit status 2 and a single `error: ...` line holding `expected`, no traceback."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  for text in expected:
    assert text in errors[0], errors[0]


# ----------------------------------------------------------------------------------------------- in process

def test_unknown_config_fields_are_named_with_the_closest_ones(capsys):
  config = shipped_config('testing.py')
  cli.check_overrides(['main', '--config.optim.lr=1', '--config.data.mean=(0.5,)'], config)  # All exist.
  for override, suggestion in [('--config.optim.lrr=1', '--config.optim.lr?'),
                               ('--config.optm.lr=1', '--config.optim.lr?'),
                               ('--config.train.lr=1', '--config.optim.lr?'),
                               ('--config.optim.lr.x=1', 'config.optim.lr is a float')]:
    with pytest.raises(SystemExit) as e:
      cli.check_overrides(['main', override], config)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: ') and suggestion in err, (override, err)


def test_missing_config_file_lists_the_configs(capsys):
  with pytest.raises(SystemExit) as e:
    cli.load_config('configs/digits_vt.py')
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert 'Did you mean configs/digits_vit.py?' in err and 'cifar100_dblock.py' in err and 'testing.py' in err


def test_user_errors_exit_2_with_their_message_and_bugs_keep_their_traceback(capsys, monkeypatch):
  assert cli.TRACEBACK_ENV == helpers.TRACEBACK_ENV  # What run_cli's subprocesses do not inherit.
  monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
  with pytest.raises(SystemExit) as e, cli.exit_on_user_error():
    raise checkpointing.CheckpointError('No checkpoint for step 7 in W; available steps: [4]')
  assert e.value.code == 2
  assert capsys.readouterr().err == 'error: No checkpoint for step 7 in W; available steps: [4]\n'
  with pytest.raises(ZeroDivisionError), cli.exit_on_user_error():
    raise ZeroDivisionError('a bug')


def test_library_info_lines_are_dropped_and_their_warnings_kept():
  handler = logging.Handler()
  cli.quiet_library_logs(True, handler=handler)
  record = lambda path, level: logging.LogRecord('absl', level, path, 1, 'msg', None, None)
  orbax = os.path.join('site-packages', 'orbax', 'checkpoint', 'checkpoint_manager.py')
  assert not handler.filter(record(orbax, logging.INFO))
  assert handler.filter(record(orbax, logging.WARNING))
  assert handler.filter(record(str(ROOT / 'diffblocks_jax' / 'training' / 'train.py'), logging.INFO))


def test_a_saved_run_takes_overrides_of_fields_it_predates(tmp_path):
  c = base_config().to_dict()
  del c['eval']['top_k']  # As in a config.json written before the field existed.
  c['eval']['batch_size'] = 7
  (tmp_path / 'config.json').write_text(json.dumps(c))
  loaded = cli.get_config(str(tmp_path))
  assert loaded.eval.top_k == base_config().eval.top_k  # The default.
  assert loaded.eval.batch_size == 7  # What the run saved wins.


# ----------------------------------------------------------------------------------------------- subprocesses

@pytest.mark.slow  # CLI runs.
def test_cli_config_mistakes_print_one_line_and_create_nothing(tmp_path):
  workdir = tmp_path / 'w'
  assert_one_message(run_cli(*TINY, f'--workdir={workdir}', '--config.optim.lrr=5e-4'),
                     '--config.optim.lrr', 'Did you mean --config.optim.lr?')
  assert_one_message(run_cli('--config=configs/nope.py', f'--workdir={workdir}'),
                     "no such config file 'configs/nope.py'", 'digits_vit.py')
  assert not workdir.exists()


@pytest.mark.long  # Time budget: the CLI trains in test_train.py, evaluates in test_failures.py.
@pytest.mark.slow  # A training and an evaluation through the CLI.
def test_cli_trains_quietly_then_evaluates_from_the_workdir_config(tmp_path):
  workdir = tmp_path / 'run'
  train = run_cli(*TINY, f'--workdir={workdir}')
  assert train.returncode == 0, train.stderr[-3000:]
  assert 'orbax' not in train.stderr and 'checkpoint_manager.py' not in train.stderr, train.stderr[-3000:]
  assert 'step 22/22 (epoch 1/1)' in train.stderr, train.stderr[-3000:]
  trained = [r['eval/accuracy'] for r in reporting.read_metrics(str(workdir)) if 'eval/accuracy' in r][-1]

  # No --config: WORKDIR/config.json, with overrides on top (a tuple field too, though JSON saved a list).
  evaluated = run_cli('--mode=eval', f'--workdir={workdir}', '--config.eval.batch_size=50',
                       '--config.data.mean=(0.3,)')
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  result = json.loads((workdir / 'eval.json').read_text())
  assert result['step'] == 22 and result['eval/accuracy'] == pytest.approx(trained), (result, trained)


@pytest.mark.slow  # CLI runs.
def test_cli_eval_of_a_workdir_without_a_run_creates_nothing(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  assert_one_message(run_cli('--mode=eval', f'--workdir={empty}'), f'{empty / "config.json"} does not exist')
  # With --config, the checkpoint is what is missing.
  assert_one_message(run_cli(*TINY, '--mode=eval', f'--workdir={empty}'), f'No checkpoint in {empty}')
  assert os.listdir(empty) == []


@pytest.mark.slow  # CLI runs.
def test_cli_missing_tfds_data_says_what_to_do(tmp_path):
  proc = run_cli('--config=configs/cifar100_dblock.py', f'--workdir={tmp_path / "w"}',
                 f'--config.data.tfds_data_dir={tmp_path / "empty"}', '--config.data.tfds_download=False')
  assert proc.returncode != 0
  assert 'tfds_data_dir' in proc.stderr and 'digits' in proc.stderr
  assert not os.path.exists(os.path.join(tmp_path, 'w', 'checkpoints'))
