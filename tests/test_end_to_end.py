"""End to end: the real CIFAR-100 configs under TFDS mock data (train, resume, eval), a non-finite loss, a damaged
latest checkpoint through the CLI, the Tiny-ImageNet config on its folder layout, offloaded blocks.
(The CLI's answers to mistakes: tests/test_main.py; config.validate: tests/test_config.py.)"""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffblocks_jax.training import checkpointing, evaluation, experiment, reporting, train
from helpers import run_cli, shipped_config


def cifar_config(name: str, **overrides):
  """The real CIFAR-100 config at its full model size, cut to a few steps on 16 mock images (a shipped config
  shrunk in time, not in size: not a tiny config)."""
  return shipped_config(name, **{'train__batch_size': 8, 'train__num_epochs': 1, 'train__steps_per_call': 2,
                                 'train__log_every_steps': 2, 'train__checkpoint_every_steps': 2,
                                 'train__eval_every_epochs': 0.0, 'eval__batch_size': 8, **overrides})


def checkpoint_steps(workdir):
  return checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints')).all_steps()


@pytest.mark.slow
@pytest.mark.long  # Full-size models (2+ min each on 2 cores); the loop on tiny configs runs by default.
@pytest.mark.parametrize('name', ['cifar100_dblock.py', 'cifar100_vit.py'])
def test_cifar100_train_eval_resume_under_mock_data(tmp_path, name):
  workdir = str(tmp_path)
  with tfds.testing.mock_data(num_examples=16):
    result = train.train_and_evaluate(cifar_config(name), workdir)
    blocks = 3 if 'dblock' in name else 1
    assert result['step'] == 2 * blocks  # 16 // 8 steps per epoch, one epoch (x B for DiffusionBlocks).
    evals = [r['eval/accuracy'] for r in reporting.read_metrics(workdir) if 'eval/accuracy' in r]
    assert evals == [result['eval/accuracy']]  # One evaluation, at the end: the log holds what was returned.
    assert checkpoint_steps(workdir)[-1] == 2 * blocks
    # The same command with more epochs resumes from the last checkpoint instead of restarting.
    result = train.train_and_evaluate(cifar_config(name, train__num_epochs=2), workdir)
    assert result['step'] == 4 * blocks
    records = reporting.read_metrics(workdir)
    logged = [r['step'] for r in records if 'train/loss' in r]
    assert logged == sorted(set(logged)) and logged[-1] == 4 * blocks  # No step trained twice.
    assert all(np.isfinite(r['train/loss']) for r in records if 'train/loss' in r)
    if blocks > 1:
      assert any(k.startswith('train/loss_block') for r in records for k in r)
    evaluated, _ = evaluation.evaluate(cifar_config(name), workdir)
  assert evaluated['step'] == 4 * blocks
  assert evaluated['eval/accuracy'] == pytest.approx(result['eval/accuracy'])
  assert json.load(open(os.path.join(workdir, 'config.json')))['model']['kind'] == ('dblock' if blocks > 1 else 'vit')
  assert os.listdir(os.path.join(workdir, 'tensorboard'))


@pytest.mark.long  # Time budget: test_resume.py moves a diverged step aside.
@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path)
  config = shipped_config('testing.py:vit', data__source='digits', data__mean=(0.3,), data__std=(0.4,),
                          train__num_epochs=1, train__checkpoint_every_steps=100)
  train.train_and_evaluate(config, workdir)
  good = checkpoint_steps(workdir)
  assert good
  config.train.num_epochs = 2
  config.optim.lr = 1e30  # One update blows the weights up; the next forward overflows to NaN.
  config.train.allow_config_change = True  # A changed lr on resume must be asked for.
  with pytest.raises(FloatingPointError, match='Non-finite loss'):
    train.train_and_evaluate(config, workdir)
  assert checkpoint_steps(workdir) == good


@pytest.mark.slow
@pytest.mark.long  # In-process by default: tests/test_failures.py falls back past an unreadable step.
def test_cli_corrupt_latest_checkpoint_falls_back_and_loses_nothing(tmp_path):
  workdir = str(tmp_path)
  flags = ['--config=configs/testing.py:dblock', f'--workdir={workdir}', '--config.data.source=digits',
           '--config.data.mean=(0.3,)', '--config.data.std=(0.4,)', '--config.model.patch_size=2',
           '--config.train.checkpoint_every_steps=60']
  proc = run_cli(*flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  steps = checkpoint_steps(workdir)
  assert len(steps) >= 2
  latest = os.path.join(workdir, 'checkpoints', str(steps[-1]))
  for dirpath, _, files in os.walk(latest):
    for f in files:
      if os.path.getsize(os.path.join(dirpath, f)) > 512:
        with open(os.path.join(dirpath, f), 'r+b') as fh:
          fh.truncate(64)
  proc = run_cli(*flags, '--mode=eval')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'unreadable' in proc.stderr and str(latest) in proc.stderr
  assert json.load(open(os.path.join(workdir, 'eval.json')))['step'] == steps[-2]
  assert os.path.isdir(latest)  # Reported, never deleted.


@pytest.mark.slow
@pytest.mark.long  # 31 s; by default the folder loader's own tests (tests/test_input_pipeline.py) read the layout.
def test_tinyimagenet_config_trains_from_a_folder_in_its_layout(tmp_path):
  """The Tiny-ImageNet config's data side as shipped (folder layout, RandomResizedCrop, flip, ImageNet
  statistics); the model cut to a CPU size, which is not what this test is about."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  root = tmp_path / 'tiny-imagenet-200'
  wnids = ('n01443537', 'n01629819')
  for wnid in wnids:
    for i in range(4):
      path = root / 'train' / wnid / 'images' / f'{wnid}_{i}.JPEG'
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
  (root / 'val' / 'images').mkdir(parents=True)
  lines = []
  for i, wnid in enumerate(wnids * 2):
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / 'val' / 'images' / f'val_{i}.JPEG')
    lines.append(f'val_{i}.JPEG\t{wnid}\t0\t0\t63\t63')
  (root / 'val' / 'val_annotations.txt').write_text('\n'.join(lines) + '\n')

  config = shipped_config('tinyimagenet_dblock.py')
  assert config.data.random_resized_crop and not config.data.pad_crop and config.data.flip
  config.data.path = str(root)
  config.model.update(hidden_size=24, num_heads=2, num_layers=2, mlp_dim=32, patch_size=16)
  config.train.update(batch_size=4, num_epochs=1, steps_per_call=2, log_every_steps=2, checkpoint_every_steps=4,
                      eval_every_epochs=0.0)
  config.eval.batch_size = 4
  result = train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  assert result['step'] == 4  # 8 images / 4 = 2 steps x B=2.
  # The checkpoint, restored and scored again, gives what training reported.
  assert evaluation.evaluate(config, str(tmp_path / 'workdir'))[0]['eval/accuracy'] == pytest.approx(result['eval/accuracy'])


@pytest.mark.long  # Time budget: test_steps.py checks offloaded updates.
@pytest.mark.slow
def test_offloaded_blocks_train_resume_and_evaluate_like_resident_ones(tmp_path):
  """`train.offload_idle_blocks` through the whole loop: checkpoints from host memory, resume into host memory,
  evaluation; the parameters equal a run whose blocks stay on the device."""
  import jax  # pylint: disable=g-import-not-at-top

  def config(offload: bool, epochs: int):
    c = shipped_config('testing.py:dblock')
    c.data.source, c.data.pad_crop, c.data.flip = 'digits', 0, False
    c.data.mean, c.data.std, c.model.patch_size = (0.305,), (0.375,), 2  # 8x8 grayscale.
    c.train.batch_size, c.train.num_epochs, c.train.steps_per_call = 64, epochs, 11
    c.train.checkpoint_every_steps = 22
    c.train.offload_idle_blocks = offload
    return c

  results = {}
  for offload in (False, True):
    workdir = str(tmp_path / f'offload_{offload}')
    train.train_and_evaluate(config(offload, 1), workdir)
    results[offload] = train.train_and_evaluate(config(offload, 2), workdir)  # Resumes at the last step.
    exp, state = experiment.load_trained(config(offload, 2), workdir)
    kinds = {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state.params['blocks'])}
    assert kinds == ({'pinned_host'} if offload else {'device'}), kinds
    results[offload]['params'] = jax.device_get(state.params)
  assert results[True]['step'] == results[False]['step'] == 2 * 2 * (1437 // 64)
  assert results[True]['eval/accuracy'] == pytest.approx(results[False]['eval/accuracy'], abs=1 / 360)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), results[True]['params'],
               results[False]['params'])
