"""What a rerun in the same workdir does (train.py, checkpointing.py): it refuses another config, resumes from a
named step, never calls a diverged checkpoint good, finishes a missing final evaluation, reports a failed
asynchronous save at once."""

import json
import os

import numpy as np
import pytest

from diffblocks_jax.training import checkpointing, reporting, train
from diffblocks_jax import config as config_lib
from helpers import shipped_config


def tiny(**train_fields):
  """The testing ViT on the digits: 22 steps an epoch, one step per call, a checkpoint every 4 steps (a shipped
  config on the digits, whose step counts the tests below name)."""
  config = shipped_config('testing.py:vit', data__source='digits', data__mean=(0.3,), data__std=(0.4,),
                          model__patch_size=2, train__batch_size=64, train__steps_per_call=1,
                          train__log_every_steps=1, train__checkpoint_every_steps=4, train__keep_checkpoints=10,
                          eval__batch_size=360)
  config.train.update(train_fields)
  return config


def steps_in(workdir):
  with checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints')) as ckpt:
    return ckpt.all_steps()


@pytest.mark.slow  # Trainings.
def test_changed_config_is_refused_and_config_json_kept(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny(), workdir)
  saved = open(os.path.join(workdir, 'config.json')).read()
  for field, value in (('model.hidden_size', 32), ('data.split_seed', 1), ('seed', 3), ('model.num_heads', 4)):
    config = tiny(num_epochs=2)
    section, _, name = field.rpartition('.')
    (config[section] if section else config)[name] = value
    with pytest.raises(config_lib.ConfigError, match=rf'config\.{field}: .* -> {value}') as e:
      train.train_and_evaluate(config, workdir)
    assert 'allow_config_change' in str(e.value)
    assert open(os.path.join(workdir, 'config.json')).read() == saved  # Untouched by the refusal.
  assert steps_in(workdir)[-1] == 22
  # Run length, logging and evaluation may change; another seed only with the explicit flag.
  config = tiny(num_epochs=2, allow_config_change=True)
  config.seed, config.eval.batch_size = 3, 120
  assert train.train_and_evaluate(config, workdir)['step'] == 44
  assert json.load(open(os.path.join(workdir, 'config.json')))['seed'] == 3


@pytest.mark.slow
def test_diverged_checkpoint_is_moved_aside_and_a_named_step_resumes(tmp_path):
  """A blow-up on the last step of a chunk that ends on a checkpoint saves parameters that are finite but
  poisoned; the next loss is NaN. The stop names a step that really is good, and resuming works."""
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny(checkpoint_every_steps=11), workdir)  # Checkpoints 11 and 22.
  config = tiny(num_epochs=2, checkpoint_every_steps=1, keep_checkpoints=30, allow_config_change=True)
  config.optim.lr = 1e30
  with pytest.raises(FloatingPointError, match=r'Non-finite .* at step (\d+)') as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  # lr 1e30 blows the first update up (step 22 -> 23); clipped Adam keeps the parameters finite (~1e30), so
  # step 23 is saved, and its loss, the next chunk's first, is the first non-finite one.
  assert 'Non-finite loss at step 23' in message and 'The last good checkpoint is step 22' in message, message
  assert steps_in(workdir)[-1] == 22
  assert any(name.startswith('23.diverged-') for name in os.listdir(os.path.join(workdir, 'checkpoints')))
  # A named earlier step resumes and finishes with a sane learning rate.
  config = tiny(num_epochs=2, checkpoint_every_steps=11, allow_config_change=True, resume_step=11)
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 44 and np.isfinite(result['train/loss'])
  names = os.listdir(os.path.join(workdir, 'checkpoints'))
  assert any(name.startswith('22.superseded-') for name in names)  # Later steps kept aside, not deleted.
  logged = [r['step'] for r in reporting.read_metrics(workdir) if 'train/loss' in r]
  assert logged == sorted(set(logged))  # The superseded records left metrics.jsonl.


@pytest.mark.slow  # Trainings.
def test_rerun_finishes_a_missing_final_evaluation_or_says_finished(tmp_path):
  workdir = str(tmp_path)
  first = train.train_and_evaluate(tiny(), workdir)
  records = reporting.read_metrics(workdir)
  # Stopped after the final checkpoint, before the final evaluation: drop that record.
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records if 'eval/accuracy' not in r)
  again = train.train_and_evaluate(tiny(), workdir)
  assert again['eval/accuracy'] == pytest.approx(first['eval/accuracy'])
  assert [r['step'] for r in reporting.read_metrics(workdir) if 'eval/accuracy' in r] == [22]
  # Finished and evaluated: the rerun reports it and writes nothing.
  size = os.path.getsize(os.path.join(workdir, 'metrics.jsonl'))
  third = train.train_and_evaluate(tiny(), workdir)
  assert third['step'] == 22 and third['eval/accuracy'] == pytest.approx(first['eval/accuracy'])
  assert os.path.getsize(os.path.join(workdir, 'metrics.jsonl')) == size


@pytest.mark.slow  # Trainings.
def test_failed_asynchronous_save_is_reported_at_the_next_call(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def full_disk(self, *args, **kwargs):
    if self._final_path.name == '8':  # The step-8 save dies in the background, as on a full disk.
      raise OSError(28, 'No space left on device')
    return await finalize(self, *args, **kwargs)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', full_disk)
  workdir = str(tmp_path)
  with pytest.raises(checkpointing.CheckpointError, match=r'cannot write checkpoint step 8 in ') as e:
    train.train_and_evaluate(tiny(), workdir)
  assert workdir in str(e.value) and '\n' not in str(e.value)
  assert 'no space left on device' in str(e.value) and 'intact: [4]' in str(e.value)
  assert steps_in(workdir) == [4]  # Step 8 never landed; nothing after it was saved.
  logged = [r['step'] for r in reporting.read_metrics(workdir) if 'train/loss' in r]
  # Reported at the first call boundary after Orbax gave up, at the latest before the next save (12).
  assert logged[-1] <= 12, logged
