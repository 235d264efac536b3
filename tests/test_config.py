"""config.validate: every shipped config and variant passes; every impossible value, and every combination of
fields that cannot work together (for each task), is refused with its fields named. The configs/ package: variants
as arguments, no path hacks. config.load_workdir fills the fields a saved run predates."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types

import pytest

from configs import common
from diffblocks_jax import config as config_lib
from diffblocks_jax.tasks import registry
from helpers import HANG_GUARD_S, ROOT, base_config, shipped_config, tiny_config

CONFIG_DIR = ROOT / 'configs'
# The config files (common.py and __init__.py define no get_config: they are not configs).
CONFIGS = sorted(p for p in CONFIG_DIR.glob('*.py') if 'def get_config(' in p.read_text())
# Every variant a config's argument selects (`--config=configs/<file>:<arg>`).
VARIANTS = ['cifar100_dblock.py:recipe=release', 'cifar100_dblock.py:recipe=paper', 'cifar100_dblock.py:recipe=tuned',
            'cifar100_dblock.py:recipe=paper_tuned', 'cifar100_vit.py:recipe=release', 'cifar100_vit.py:recipe=paper',
            'tinyimagenet_dblock.py:recipe=release', 'tinyimagenet_dblock.py:recipe=tuned',
            'digits_dblock.py:recipe=tuned', 'digits_dblock.py:recipe=hand', 'text_ar_dblock.py:recipe=paper',
            'text_ar_dblock.py:recipe=tuned', 'testing.py:dblock', 'testing.py:vit']


@pytest.mark.parametrize('name', [p.name for p in CONFIGS] + VARIANTS)
def test_every_shipped_config_and_variant_validates(name):
  config = shipped_config(name)
  config_lib.validate(config)
  assert config.model.kind  # The base names no kind: every config does.


def _flat(config) -> dict:
  """'section.field' -> value."""
  return {f'{section}.{k}': v for section, fields in json.loads(config.to_json_best_effort()).items()
          for k, v in (fields.items() if isinstance(fields, dict) else [('', fields)])}


def _differing(a: str, b: str) -> set[str]:
  x, y = (_flat(shipped_config(name)) for name in (a, b))
  return {k for k in x if x[k] != y[k]}


def test_variants_change_what_their_recipe_says_and_nothing_else():
  assert _flat(shipped_config('cifar100_dblock.py')) == _flat(
      shipped_config('cifar100_dblock.py:recipe=release'))  # No argument: the default.
  tuned = {'diffusion.noise_plan', 'model.label_token', 'eval.normalized_embeddings'}
  paper = {'optim.lr', 'optim.schedule', 'optim.min_lr', 'optim.warmup_epochs', 'data.randaugment'}
  assert _differing('cifar100_dblock.py', 'cifar100_dblock.py:recipe=tuned') == tuned
  assert _differing('cifar100_dblock.py', 'cifar100_dblock.py:recipe=paper') == paper
  assert _differing('cifar100_dblock.py', 'cifar100_dblock.py:recipe=paper_tuned') == tuned | paper
  assert _differing('cifar100_vit.py', 'cifar100_vit.py:recipe=paper') == paper
  assert _differing('tinyimagenet_dblock.py', 'tinyimagenet_dblock.py:recipe=tuned') == tuned
  assert _differing('digits_vit.py', 'digits_dblock.py') == tuned | {'model.kind', 'train.num_epochs'}
  assert _differing('text_ar_dblock.py', 'text_ar_dblock.py:recipe=tuned') == {
      'diffusion.noise_plan', 'diffusion.sigma_min', 'eval.solver'}


def test_cifar100_configs_name_their_data():
  """The base is dataset-neutral: a CIFAR-100 config sets the data set and its statistics itself."""
  for name in ('cifar100_dblock.py', 'cifar100_vit.py:recipe=paper', 'testing.py:vit'):
    data = shipped_config(name).data
    assert (data.source, data.name) == ('tfds', 'cifar100')
    assert (tuple(data.mean), tuple(data.std)) == (common.CIFAR100_MEAN, common.CIFAR100_STD)


@pytest.mark.parametrize('arg, says', [
    ('recipe=papr', "recipe='papr' is not one of release|paper|tuned|paper_tuned"),
    ('recpe=paper', "unknown key 'recpe'; this config takes recipe=release|paper|tuned|paper_tuned (default release)"),
    ('paper', "'paper' is not key=value"),
])
def test_a_bad_config_argument_names_what_is_allowed(arg, says):
  with pytest.raises(config_lib.ConfigError) as e:
    shipped_config(f'cifar100_dblock.py:{arg}')
  assert says in str(e.value), str(e.value)


def test_parse_arg():
  assert vars(common.parse_arg(None, recipe=('a', 'b'), size=('s', 'm'))) == {'recipe': 'a', 'size': 's'}
  assert vars(common.parse_arg('size=m, recipe=b', recipe=('a', 'b'), size=('s', 'm'))) == {'recipe': 'b', 'size': 'm'}


def test_configs_import_as_a_package_from_any_directory(tmp_path):
  """No config edits sys.path: `from configs import common` resolves through the installed package (pyproject's
  packages.find includes configs*), from any working directory."""
  for path in CONFIG_DIR.glob('*.py'):
    assert 'sys.path' not in path.read_text(), path
  code = ('from diffblocks_jax import config; c = config.load_file(%r); print(c.model.kind, c.data.name)'
          % f'{CONFIG_DIR / "cifar100_dblock.py"}:recipe=paper')
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  result = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ['dblock', 'cifar100']


@pytest.mark.parametrize('overrides,says', [
    ({'optim__lr': float('nan')}, 'optim.lr=nan'),
    ({'optim__lr': float('inf')}, 'optim.lr=inf'),
    ({'optim__grad_clip': -1.0}, 'optim.grad_clip=-1.0'),  # Would reverse the gradient.
    ({'optim__b2': 1.0}, 'optim.b2=1.0'),
    ({'optim__weight_decay': -0.1}, 'optim.weight_decay=-0.1'),
    ({'model__dropout': 1.5}, 'model.dropout=1.5'),
    ({'model__attention_dropout': 1.5}, 'model.attention_dropout=1.5'),
    ({'model__attention_dropout': -0.1}, 'model.attention_dropout=-0.1'),
    ({'diffusion__overlap': -2.0}, 'diffusion.overlap=-2.0'),
    ({'diffusion__sigma_min': 0.0}, 'diffusion.sigma_min=0.0'),
    ({'diffusion__sigma_max': -1.0}, 'diffusion.sigma_max=-1.0'),
    ({'diffusion__sigma_min': 90.0}, 'diffusion.sigma_min=90.0 must be below config.diffusion.sigma_max=80.0'),
    ({'diffusion__p_std': 0.0}, 'diffusion.p_std=0.0'),
    ({'diffusion__p_mean': float('nan')}, 'diffusion.p_mean=nan'),
    ({'diffusion__sigma_data': 0.0}, 'diffusion.sigma_data=0.0'),
    ({'data__pad_crop': -3}, 'data.pad_crop=-3'),  # Failed deep inside the crop before.
    ({'model__kind': 'vit', 'model__hidden_size': 0}, 'model.hidden_size=0'),  # Failed deep inside the ViT.
    ({'model__num_heads': 0}, 'model.num_heads=0'),  # ZeroDivisionError inside validate before.
    ({'model__patch_size': 0}, 'model.patch_size=0'),
    ({'train__eval_every_epochs': -1.0}, 'train.eval_every_epochs=-1.0'),
])
def test_impossible_values_are_refused_by_name(overrides, says):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(base_config(**overrides))
  assert f'config.{says}' in str(e.value), str(e.value)


def test_errors_are_listed_together():
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(base_config('resnet', optim__lr=float('nan'), model__dropout=1.5, data__pad_crop=-3,
                                    model__num_heads=0, model__num_layers=7))
  # The checks that combine fields skip those already named (no ZeroDivisionError, no KeyError on the kind).
  for field in ('optim.lr=nan', 'model.dropout=1.5', 'data.pad_crop=-3', "model.kind='resnet'", 'model.num_heads=0'):
    assert f'config.{field}' in str(e.value)


def test_a_config_saved_before_a_field_existed_still_validates(tmp_path):
  """Where a saved config is read (config.load_workdir), the fields it predates get their defaults; validation
  then sees a whole config (it holds no fallbacks of its own)."""
  c = base_config('dblock', data__name='cifar100')
  saved = c.to_dict()
  del saved['train']['eval_every_epochs']  # As in a config.json written by an older version.
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  loaded = config_lib.load_workdir(str(tmp_path))
  assert loaded.train.eval_every_epochs == c.train.eval_every_epochs
  config_lib.validate(loaded)


# ------------------------------------------------------------------------------ fields that must agree, by task

def test_fields_that_must_agree_are_refused_by_name():
  """Layers and blocks, patch and image size (validate_data, once the data is known), batch and devices, the kind."""
  config = shipped_config('cifar100_dblock.py', model__num_layers=10)
  with pytest.raises(config_lib.ConfigError, match='config.model.num_layers=10'):
    config_lib.validate(config, num_devices=1)
  config = shipped_config('cifar100_dblock.py', model__patch_size=5)
  with pytest.raises(config_lib.ConfigError, match='config.model.patch_size=5'):
    config_lib.validate_data(config, types.SimpleNamespace(image_size=32, channels=3))
  config = shipped_config('testing.py:vit', train__batch_size=12)
  with pytest.raises(config_lib.ConfigError, match=r'config\.train\.batch_size=12'):
    config_lib.validate(config, num_devices=8)
  config_lib.validate(config, num_devices=4)  # 12 splits over 4.
  config = shipped_config('cifar100_dblock.py', train__batch_size=6)
  with pytest.raises(config_lib.ConfigError, match='config.train.batch_size=6'):
    config_lib.validate(config, num_devices=4)
  config.model.kind = 'resnet'
  with pytest.raises(config_lib.ConfigError, match="config.model.kind='resnet'"):
    config_lib.validate(config, num_devices=1)


def test_bad_resized_crop_settings_are_named():
  config = base_config()
  config.data.random_resized_crop = True  # pad_crop stays 4.
  config.data.resized_crop_scale = (0.5, 1.5)
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config)
  assert 'config.data.pad_crop=4' in str(info.value) and 'config.data.resized_crop_scale' in str(info.value)


def test_generation_settings_are_refused_by_name():
  config = shipped_config('digits_dit_dblock.py')
  config.model.hidden_size, config.model.num_heads = 18, 2
  config.eval.num_samples, config.eval.solver = -1, 'rk4'
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  for field in ('config.model.hidden_size=18', 'config.eval.num_samples=-1', "config.eval.solver='rk4'"):
    assert field in str(e.value), str(e.value)


def test_language_settings_are_refused_by_name():
  config = shipped_config('text_ar_dblock.py')
  config.data.source, config.data.seq_len, config.eval.temperature = 'digits', 1, 0.0
  config.model.hidden_size, config.model.num_heads = 12, 4  # Head width 3: odd.
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  for field in ("config.data.source='digits'", 'config.data.seq_len=1', 'config.eval.temperature=0.0',
                'must be even'):
    assert field in str(e.value), str(e.value)
  image = shipped_config('digits_vit.py')
  image.data.source = 'pydoc'
  with pytest.raises(config_lib.ConfigError, match="needs image data"):
    config_lib.validate(image)
  masked = shipped_config('text_mdm_dblock.py')
  masked.eval.solver = 'ancestral'
  with pytest.raises(config_lib.ConfigError, match=r"config.eval.solver='ancestral' is not one of .* for "
                                                  "model.kind='mdm_dblock'"):
    config_lib.validate(masked)


def test_noise_plan_and_validation_fraction_are_refused_by_name():
  config = tiny_config(diffusion__noise_plan='tuned')
  config.data.validation_fraction = 1.0
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert 'config.diffusion.noise_plan' in str(e.value) and 'config.data.validation_fraction' in str(e.value)
  vit = tiny_config('vit', diffusion__noise_plan='matched')
  # The kinds named are the registry's (a new kind joins the message without this test changing).
  matched = registry.kinds_where(lambda k: 'matched' in k.noise_plans)
  assert {'dblock', 'ar_dblock'} <= set(matched) and 'vit' not in matched
  with pytest.raises(config_lib.ConfigError, match=r"noise_plan='matched' is not one of \('release',\) for "
                     r"model.kind='vit' \('matched' is for a diffused embedding: kinds " + re.escape(f'{matched})')):
    config_lib.validate(vit)
  config_lib.validate(tiny_config(diffusion__noise_plan='matched'))
  folder = tiny_config()
  folder.data.update(source='folder', validation_fraction=0.1)
  with pytest.raises(config_lib.ConfigError, match='validation_fraction=0.1 needs config.data.source'):
    config_lib.validate(folder)
  config_lib.validate(tiny_config('ar', data='text', data__validation_fraction=0.1))  # Text takes a validation split.


@pytest.mark.parametrize('overrides, says', [
    (dict(model__kind='vit'), "config.model.weight_tied=True needs a block-wise config.model.kind"),
    (dict(model__num_layers=6, model__layers_per_block=(3, 2, 1)),
     'config.model.weight_tied=True needs blocks of equal depth: config.model.layers_per_block=(3, 2, 1)'),
    (dict(model__independent_blocks=True), 'set config.model.independent_blocks=False'),
    (dict(model__independent_blocks=True, parallel_blocks=True), 'set config.parallel_blocks=False'),
    (dict(eval__num_inference_steps=-1), 'config.eval.num_inference_steps=-1 must be >= 0 (0 = B)'),
])
def test_weight_tied_refusals_name_the_field_and_the_rule(overrides, says):
  """Each in one line of its own, before anything loads; any N >= 1 sampler steps (0 = B) is accepted."""
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(tiny_config(model__weight_tied=True, **overrides))
  lines = [line.strip() for line in str(e.value).splitlines()[1:]]
  assert any(line.startswith('config.') and says in line for line in lines), lines
  for n in (1, 2, 7):
    config_lib.validate(tiny_config(model__weight_tied=True, eval__num_inference_steps=n))
