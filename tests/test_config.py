"""config.validate: every shipped config passes; every impossible value is refused with its field named."""

from __future__ import annotations

import json
import pathlib

import pytest

from diffblocks_jax import config as config_lib

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / 'configs').glob('*.py'))


def _config(**overrides):
  """The base config with dotted overrides ('optim.lr'); 'diffusion.sigma_min' etc. as given."""
  c = config_lib.get_base_config()
  for dotted, value in overrides.items():
    section, name = dotted.split('.')
    c[section][name] = value
  return c


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
  config_lib.validate(config_lib.load_file(str(path)))


@pytest.mark.parametrize('overrides,says', [
    ({'optim.lr': float('nan')}, 'optim.lr=nan'),
    ({'optim.lr': float('inf')}, 'optim.lr=inf'),
    ({'optim.grad_clip': -1.0}, 'optim.grad_clip=-1.0'),  # Would reverse the gradient.
    ({'optim.b2': 1.0}, 'optim.b2=1.0'),
    ({'optim.weight_decay': -0.1}, 'optim.weight_decay=-0.1'),
    ({'model.dropout': 1.5}, 'model.dropout=1.5'),
    ({'model.attention_dropout': 1.5}, 'model.attention_dropout=1.5'),
    ({'model.attention_dropout': -0.1}, 'model.attention_dropout=-0.1'),
    ({'diffusion.overlap': -2.0}, 'diffusion.overlap=-2.0'),
    ({'diffusion.sigma_min': 0.0}, 'diffusion.sigma_min=0.0'),
    ({'diffusion.sigma_max': -1.0}, 'diffusion.sigma_max=-1.0'),
    ({'diffusion.sigma_min': 90.0}, 'diffusion.sigma_min=90.0 must be below config.diffusion.sigma_max=80.0'),
    ({'diffusion.p_std': 0.0}, 'diffusion.p_std=0.0'),
    ({'diffusion.p_mean': float('nan')}, 'diffusion.p_mean=nan'),
    ({'diffusion.sigma_data': 0.0}, 'diffusion.sigma_data=0.0'),
    ({'data.pad_crop': -3}, 'data.pad_crop=-3'),  # Failed deep inside the crop before.
    ({'model.kind': 'vit', 'model.hidden_size': 0}, 'model.hidden_size=0'),  # Failed deep inside the ViT.
    ({'model.num_heads': 0}, 'model.num_heads=0'),  # ZeroDivisionError inside validate before.
    ({'model.patch_size': 0}, 'model.patch_size=0'),
    ({'train.eval_every_epochs': -1.0}, 'train.eval_every_epochs=-1.0'),
])
def test_impossible_values_are_refused_by_name(overrides, says):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(_config(**overrides))
  assert f'config.{says}' in str(e.value), str(e.value)


def test_errors_are_listed_together():
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(_config(**{'optim.lr': float('nan'), 'model.dropout': 1.5, 'data.pad_crop': -3,
                                   'model.kind': 'resnet', 'model.num_heads': 0, 'model.num_layers': 7}))
  # The checks that combine fields skip those already named (no ZeroDivisionError, no KeyError on the kind).
  for field in ('optim.lr=nan', 'model.dropout=1.5', 'data.pad_crop=-3', "model.kind='resnet'", 'model.num_heads=0'):
    assert f'config.{field}' in str(e.value)


def test_a_config_saved_before_a_field_existed_still_validates():
  c = config_lib.get_base_config()
  del c.train['eval_every_epochs']  # As in a config.json written by an older version.
  config_lib.validate(c)


def test_a_saved_run_takes_overrides_of_fields_it_predates(tmp_path):
  from diffblocks_jax import cli  # pylint: disable=g-import-not-at-top
  c = config_lib.get_base_config().to_dict()
  del c['eval']['top_k']  # As in a config.json written before the field existed.
  c['eval']['batch_size'] = 7
  (tmp_path / 'config.json').write_text(json.dumps(c))
  loaded = cli.get_config(str(tmp_path))
  assert loaded.eval.top_k == config_lib.get_base_config().eval.top_k  # The default.
  assert loaded.eval.batch_size == 7  # What the run saved wins.
