"""The noise plan as a config choice: the 'matched' P_mean, its boundaries and sampler σ, and a sweep that scores
on a validation split carved from TRAIN and never sees the test split. No training here (fakes stand in)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffblocks_jax import config as config_lib
from diffblocks_jax.core import partitions
from diffblocks_jax.data import input_pipeline as ip
from diffblocks_jax.data.dataset import DataError
from diffblocks_jax.tasks import classification
from diffblocks_jax.tools import noise_plan
from helpers import shipped_config, tiny_config

MATCHED = math.log(80.0) - 3 * 1.2  # 0.78203: σ_max = 80 sits three P_std above P_mean.


# ------------------------------------------------------------------------------------------ the plan

def test_matched_p_mean_puts_the_samplers_first_sigma_three_p_std_above_it():
  assert partitions.matched_p_mean() == pytest.approx(MATCHED, abs=1e-12)
  assert partitions.matched_p_mean(80.0, 1.2) == pytest.approx(0.7820266, abs=1e-6)
  assert partitions.matched_p_mean(80.0, 0.8) == pytest.approx(math.log(80) - 2.4)
  edm = partitions.resolve_noise_plan(partitions.EDM(p_mean=-1.2), 'matched')
  assert (math.log(edm.sigma_max) - edm.p_mean) / edm.p_std == pytest.approx(3.0)
  assert 1 - edm.cdf(edm.sigma_max) == pytest.approx(1.3499e-3, rel=1e-3)  # The three-sigma tail.
  # The release's plan leaves σ_max 4.65 P_std out, where the log-normal has 2e-6 of its mass.
  assert 1 - partitions.DEFAULT_EDM.cdf(80.0) < 2e-6
  with pytest.raises(ValueError, match='noise_plan'):
    partitions.resolve_noise_plan(partitions.DEFAULT_EDM, 'tuned')


@pytest.mark.parametrize('num_blocks, boundaries, block0_range', [
    (2, [0.002, 2.1814645, 80.0], [1.8219273, 80.0]),
    (3, [0.002, 1.3016965, 3.6543963, 80.0], [3.131857, 80.0]),
    (4, [0.002, 0.9717702, 2.1814645, 4.891971, 80.0], [4.2540595, 80.0]),
])
def test_matched_boundaries_and_block0_range_are_pinned(num_blocks, boundaries, block0_range):
  edm = partitions.EDM(p_mean=MATCHED)
  np.testing.assert_allclose(partitions.block_sigmas(num_blocks, edm), boundaries, rtol=1e-6)
  np.testing.assert_allclose(partitions.widened_ranges(num_blocks, 0.05, edm)[-1], block0_range, rtol=1e-6)


def test_matched_sampler_sigmas_are_pinned_and_route_the_first_step_to_block_0():
  edm = partitions.EDM(p_mean=MATCHED)
  np.testing.assert_allclose(partitions.inference_sigmas(3, edm), [80.0, 2.1814645, 0.002], rtol=1e-6)
  np.testing.assert_allclose(partitions.inference_sigmas(5, edm), [80.0, 4.891971, 2.1814645, 0.9717702, 0.002],
                             rtol=1e-6)
  for num_blocks in (2, 3, 4, 6):
    for num_steps in (num_blocks, 2 * num_blocks):
      for grid in ('quantile', 'karras'):  # Every grid starts at σ_max: the criterion holds for all.
        first = partitions.LogNormalPartition(num_blocks, edm=edm).inference_levels(num_steps, grid)[0]
        assert first == pytest.approx(80.0) and partitions.route_static(first, num_blocks, edm) == 0


def test_the_config_option_resolves_p_mean_wherever_the_edm_is_built():
  config = tiny_config(diffusion__noise_plan='matched', diffusion__p_mean=-1.2)
  assert partitions.EDM.from_config(config.diffusion).p_mean == pytest.approx(MATCHED)
  assert partitions.EDM.from_config(tiny_config(diffusion__p_mean=0.5).diffusion).p_mean == 0.5  # 'release'
  lines = classification.noise_plan_lines(config)
  assert lines[0].startswith("noise plan 'matched': P_mean 0.7820") and '3.00 P_std above' in lines[0]
  assert lines[1:] == partitions.noise_plan(3, 3, partitions.EDM(p_mean=MATCHED))
  assert 'median 6.22, 26.6 % above σ = 10' in lines[1]
  report = noise_plan.plan_report(config, 'release')  # The tool reports the configured value for 'release'.
  assert 'P_mean 0.7820' in report[0] and 'P_mean -1.2000' in noise_plan.plan_report(tiny_config(), None)[0]


def test_the_figure_is_written(tmp_path):
  pytest.importorskip('matplotlib')
  path = noise_plan.write_figure(tiny_config(), str(tmp_path / 'plan.png'), candidates=('release', 'matched'))
  assert open(path, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'


# --------------------------------------------------------------------------------- validation split

def _rows(images, labels):
  return sorted(img.tobytes() + bytes([int(label)]) for img, label in zip(images, labels))


def test_digits_validation_split_is_a_stratified_share_of_train_and_leaves_test_out():
  base = ip.load_dataset(tiny_config().data)
  d = tiny_config().data
  d.validation_fraction = 0.2
  val = ip.load_dataset(d)
  assert len(val.test_labels) == 288 and len(val.train_labels) == len(base.train_labels) - 288
  # Train and validation together are exactly the training split: not one test image comes in.
  assert _rows(np.concatenate([val.train_images, val.test_images]), np.concatenate([val.train_labels,
                                                                                   val.test_labels])) \
      == _rows(base.train_images, base.train_labels)
  np.testing.assert_allclose(np.bincount(val.test_labels) / 288, np.bincount(base.train_labels) / 1437, atol=0.01)
  again = ip.load_dataset(d)
  np.testing.assert_array_equal(again.test_images, val.test_images)  # Seeded by data.split_seed.
  d.split_seed = 1
  assert not np.array_equal(ip.load_dataset(d).test_labels, val.test_labels)


def test_npz_validation_split_never_uses_x_test(tmp_path):
  rng = np.random.default_rng(0)
  x_train = rng.integers(0, 200, (40, 6, 6), dtype=np.uint8)
  np.savez(tmp_path / 'd.npz', x_train=x_train, y_train=np.arange(40) % 4,
           x_test=np.full((8, 6, 6), 255, np.uint8), y_test=np.arange(8) % 4)  # 255 appears only in test.
  d = tiny_config().data
  d.update(source='npz', path=str(tmp_path / 'd.npz'), mean=(0.5,), std=(0.25,), validation_fraction=0.25)
  data = ip.load_dataset(d)
  assert len(data.test_labels) == 10 and len(data.train_labels) == 30
  assert data.test_images.max() < 255 and data.train_images.max() < 255
  assert _rows(np.concatenate([data.train_images, data.test_images])[..., 0],
               np.concatenate([data.train_labels, data.test_labels])) == _rows(x_train, np.arange(40) % 4)


def test_tfds_validation_split_is_a_slice_of_train():
  class Info:
    splits = {'train': type('Split', (), {'num_examples': 50_000})()}
  builder = type('Builder', (), {'info': Info()})()
  d = tiny_config().data
  assert ip._tfds_splits(builder, d) == ['train', 'test']
  d.validation_fraction = 0.1
  assert ip._tfds_splits(builder, d) == ['train[5000:]', 'train[:5000]']
  Info.splits = {}
  assert ip._tfds_splits(builder, d) == ['train[10%:]', 'train[:10%]']
  d.train_split = 'train[:90%]'
  with pytest.raises(DataError, match='whole split'):
    ip._tfds_splits(builder, d)


# ------------------------------------------------------------------------------------------ the sweep

def test_sweep_trains_every_candidate_on_the_validation_split_only(tmp_path, monkeypatch):
  test_images = ip.load_dataset(tiny_config().data).test_images
  real_digits = ip._load_digits

  def digits_without_test(d, shard):
    assert d.validation_fraction > 0, 'the sweep loaded the test split'
    return real_digits(d, shard)

  monkeypatch.setattr(ip, '_load_digits', digits_without_test)
  seen = []

  def fake_train(config, workdir):
    data = ip.load_dataset(config.data)  # What training would load: raises if it is the test split.
    assert config.data.validation_fraction == 0.2 and config.train.num_epochs == 3
    assert not set(_rows(data.test_images, np.zeros(len(data.test_images)))) & set(
        _rows(test_images, np.zeros(len(test_images))))
    seen.append((workdir, config.seed, partitions.EDM.from_config(config.diffusion).p_mean,
                 config.diffusion.loss_weighting))
    return {'eval/accuracy': {-1.2: 0.5, round(MATCHED, 5): 0.9}.get(round(seen[-1][2], 5), 0.7) + 0.01 * config.seed}

  rescored = []
  fake_eval = lambda config, workdir: rescored.append((workdir, config.eval.normalized_embeddings)) or {
      'eval/accuracy': 0.1}
  config = tiny_config()
  candidates = [('release', 'release', {}), ('P_mean 0', '0', {}), ('matched', 'matched', {}),
                ('matched + per_sample', 'matched', {'diffusion.loss_weighting': 'per_sample'}),
                ('matched + normalized', 'matched', {'eval.normalized_embeddings': 'True'}, 'matched')]
  scores = noise_plan.sweep(config, candidates, seeds=[0, 1], fraction=0.2, epochs=3, workdir=str(tmp_path),
                            train_fn=fake_train, eval_fn=fake_eval, log=lambda line: None)
  assert [round(p, 5) for _, _, p, _ in seen] == [-1.2, -1.2, 0.0, 0.0, round(MATCHED, 5), round(MATCHED, 5),
                                                  round(MATCHED, 5), round(MATCHED, 5)]
  assert seen[-1][3] == 'per_sample' and len({w for w, *_ in seen}) == 8
  assert rescored == [(str(tmp_path / 'matched_seed0'), True), (str(tmp_path / 'matched_seed1'), True)]
  assert scores['matched'] == [0.9, 0.91] and noise_plan.best(scores) == 'matched'
  assert config.data.validation_fraction == 0.0 and config.diffusion.noise_plan == 'release'  # Untouched.
  with pytest.raises(ValueError, match='validation'):
    noise_plan.validation_config(config, seed=0, fraction=0.0)


def test_the_tuned_text_config_keeps_both_ends_of_the_sampler_grid_in_the_training_bulk():
  """configs/text_ar_dblock.py:recipe=tuned: the sampler's first σ (σ_max, run by block 0) and its last (σ_min,
  whose logits the character is drawn from, run by block B−1) each three P_std from P_mean; EDM's σ_min 0.002 is
  5.8 P_std below, where the last block never trains."""
  config = shipped_config('text_ar_dblock.py:recipe=tuned')
  config_lib.validate(config)
  plan = partitions.LogNormalPartition.from_config(config_lib.num_blocks(config), config.diffusion)
  edm = plan.edm
  levels = plan.inference_levels(4)
  z = lambda sigma: (math.log(sigma) - edm.p_mean) / edm.p_std
  assert z(levels[0]) == pytest.approx(3.0) and z(levels[-1]) == pytest.approx(-3.0)
  assert plan.route_static(levels[0]) == 0 and plan.route_static(levels[-1]) == 3
  assert z(0.002) == pytest.approx(-5.83, abs=0.01)
