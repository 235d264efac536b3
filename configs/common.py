"""What the configs in this folder share: the data sets' fields, the small offline settings, the CIFAR recipes,
and the parser of a config's argument (`--config=configs/cifar100_dblock.py:recipe=paper`).

Not a config itself (it has no get_config). The base (`diffblocks_jax.config.get_base_config`) names no data set
and no model kind: each helper here sets every data field its setting relies on, and `base` sets the kind.
"""

import types

from diffblocks_jax import config as config_lib

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # Per-channel statistics of CIFAR-100's training images.
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # CIFAR-10's.
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # ImageNet's (torchvision), as the release normalises Tiny-ImageNet.
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_arg(arg: str | None, **choices: tuple[str, ...]) -> types.SimpleNamespace:
  """A config's argument, 'key=value,key=value', checked against `choices` (key -> its allowed values, the
  first the default): `parse_arg('recipe=paper', recipe=('release', 'paper')).recipe == 'paper'`. No argument
  (None or '') gives the defaults; an unknown key or value is a ConfigError that lists what is allowed."""
  allowed = ', '.join(f'{key}={"|".join(values)} (default {values[0]})' for key, values in choices.items())
  values = {key: options[0] for key, options in choices.items()}
  for item in (arg or '').split(','):
    if not item.strip():
      continue
    key, eq, value = (part.strip() for part in item.partition('='))
    if not eq:
      raise config_lib.ConfigError(f'config argument {item!r} is not key=value; this config takes {allowed}')
    if key not in choices:
      raise config_lib.ConfigError(f'config argument {item!r}: unknown key {key!r}; this config takes {allowed}')
    if value not in choices[key]:
      raise config_lib.ConfigError(f'config argument {item!r}: {key}={value!r} is not one of '
                                   f'{"|".join(choices[key])} (default {choices[key][0]})')
    values[key] = value
  return types.SimpleNamespace(**values)


def base(kind: str):
  """The base config with its model kind set (every config names one; the base leaves it empty)."""
  config = config_lib.get_base_config()
  config.model.kind = kind
  return config


def tfds_images(config, name: str, mean: tuple[float, ...], std: tuple[float, ...]):
  """Images from the TFDS data set `name`, normalised per channel with `mean` and `std`."""
  config.data.source = 'tfds'
  config.data.name = name
  config.data.mean, config.data.std = mean, std
  return config


def cifar100(kind: str):
  """CIFAR-100 at the release's defaults for `kind` (model, optimiser and training fields as the base has them)."""
  return tfds_images(base(kind), 'cifar100', CIFAR100_MEAN, CIFAR100_STD)


def paper_recipe(config):
  """The paper's CIFAR-100 training recipe: AdamW lr 5e-4 with cosine decay to 5e-5 after a 10-epoch warm-up,
  RandAugment (2 ops, magnitude 9) on top of flips and crops; 500 epochs (the base's)."""
  config.optim.lr = 5e-4
  config.optim.schedule = 'cosine_with_min_lr'
  config.optim.min_lr = 5e-5
  config.optim.warmup_epochs = 10.0  # Scaled by B with the epochs (train.scale_epochs_by_blocks).
  config.data.randaugment = True
  return config


def tuned(config):
  """The classification recipe validated on digits (configs/digits_dblock.py), on top of any DiffusionBlocks
  classification config."""
  config.diffusion.noise_plan = 'matched'  # P_mean = ln σ_max − 3·P_std = 0.782: block 0 trains at σ_max.
  config.model.label_token = 'concat'  # The paper's layout.
  config.eval.normalized_embeddings = True
  return config


def digits(kind: str):
  """scikit-learn's digits (8x8 grayscale, 10 classes, offline): the small classification setting."""
  config = base(kind)
  config.data.source = 'digits'
  config.data.mean = (0.305,)  # Pixel statistics of the digits images scaled to [0, 1].
  config.data.std = (0.375,)
  config.data.pad_crop = 1  # An 8x8 image tolerates a 1-pixel shift, not 4.
  config.data.flip = False  # Mirrored digits are other digits.
  config.model.patch_size = 2  # 16 patches (patch 1 trained far worse in a 50-epoch trial: 59 %).
  config.model.hidden_size = 64
  config.model.num_layers = 6
  config.model.num_heads = 4
  config.model.mlp_dim = 128
  config.model.dropout = 0.0  # 1,437 training images: short runs gain nothing from dropout.
  config.model.attention_dropout = 0.0
  config.model.num_blocks = 3
  config.optim.lr = 2e-3
  config.optim.schedule = 'cosine_with_min_lr'  # Decays to 0 (optim.min_lr).
  config.optim.warmup_epochs = 2.0
  config.train.batch_size = 64
  config.train.num_epochs = 150
  config.train.steps_per_call = 22  # One epoch (1437 // 64 = 22 steps) per compiled call.
  config.train.log_every_steps = 110
  config.train.checkpoint_every_steps = 440
  config.train.eval_every_epochs = 10.0
  config.eval.batch_size = 360
  return config


def digits_generation(kind: str):
  """Class-conditional generation on the digits, judged by a digits_vit.py classifier: a small DiT in EDM."""
  config = digits(kind)
  config.data.mean, config.data.std = (0.5,), (0.5,)  # Pixels to [-1, 1]: EDM's sigma_data = 0.5 scale.
  config.data.pad_crop = 0  # The image itself is the target: no crops.
  config.model.hidden_size = 128
  config.model.num_heads = 4
  config.model.num_layers = 6
  config.model.patch_size = 2  # 16 tokens.
  config.diffusion.class_dropout_prob = 0.1  # Null class 10 % of the time, for guidance (paper).
  config.optim.lr = 1e-3
  config.optim.weight_decay = 0.0
  config.optim.warmup_epochs = 5.0
  config.train.batch_size = 128
  config.train.num_epochs = 400
  config.train.steps_per_call = 11  # One epoch (1437 // 128 = 11 steps) per compiled call.
  config.train.log_every_steps = 220
  config.train.checkpoint_every_steps = 1100
  config.train.eval_every_epochs = 100.0
  config.eval.batch_size = 360
  config.eval.num_inference_steps = 50  # Euler on the release's quantile grid (paper).
  config.eval.cfg_scale = 2.0  # Paper.
  config.eval.classifier_workdir = 'workdirs/digits_vit'
  return config


def cifar10_generation(kind: str):
  """CIFAR-10 class-conditional generation at the paper's Table 2 setting: DiT-S/2 in EDM, judged by a
  cifar10_vit.py classifier."""
  config = tfds_images(base(kind), 'cifar10', (0.5,), (0.5,))  # Pixels to [-1, 1].
  config.data.pad_crop = 0  # The image is the target: flips only.
  config.model.hidden_size = 384  # DiT-S/2: 12 layers, hidden 384, 6 heads, patch 2.
  config.model.num_layers = 12
  config.model.num_heads = 6
  config.model.patch_size = 2
  config.model.num_blocks = 3  # B = 3 (paper).
  config.diffusion.overlap = 0.05  # gamma (paper).
  config.diffusion.class_dropout_prob = 0.1  # Null class for guidance (paper).
  config.optim.lr = 1e-4  # AdamW, batch 512, lr 1e-4, 100 epochs (paper); DiT's zero weight decay.
  config.optim.weight_decay = 0.0
  config.train.batch_size = 512
  config.train.num_epochs = 100
  config.train.log_every_steps = 100
  config.train.checkpoint_every_steps = 1000
  config.train.eval_every_epochs = 10.0
  config.eval.batch_size = 500
  config.eval.num_inference_steps = 50  # Euler, 50 steps, guidance 2.0 (paper).
  config.eval.cfg_scale = 2.0
  config.eval.num_samples = 10000
  config.eval.classifier_workdir = 'workdirs/cifar10_vit'
  return config


def text(kind: str):
  """CPython's bundled documentation text (~465k characters, offline) as characters: the small language setting
  shared by the masked and autoregressive configs."""
  config = base(kind)
  config.data.source = 'pydoc'
  config.data.vocab = 'char'  # 103 characters.
  config.data.seq_len = 64
  config.data.test_fraction = 0.1  # The held-out split: the corpus's last 10 %.
  config.model.hidden_size = 128
  config.model.num_heads = 4
  config.model.num_layers = 6
  config.model.num_blocks = 3
  config.model.mlp_ratio = 8 / 3  # SwiGLU's three matrices: Llama's width, the parameters of a 4x GELU MLP.
  config.model.dropout = 0.0
  config.model.attention_dropout = 0.0
  config.optim.lr = 2e-3
  config.optim.weight_decay = 0.03  # Paper (text8).
  config.optim.schedule = 'cosine_with_min_lr'
  config.optim.warmup_epochs = 0.25
  config.train.batch_size = 32
  config.train.num_epochs = 6  # x B for DiffusionBlocks: equal layer-updates.
  config.train.steps_per_call = 20
  config.train.log_every_steps = 100
  config.train.checkpoint_every_steps = 500
  config.train.eval_every_epochs = 2.0
  config.eval.batch_size = 128
  config.eval.num_samples = 16
  return config


def text_autoregressive(kind: str):
  """The autoregressive pair on the same text: 8 layers; DiffusionBlocks as B = 4 blocks of 2, γ = 0.1."""
  config = text(kind)
  config.model.num_layers = 8
  config.model.num_blocks = 4  # Paper (LM1B): B = 4, γ = 0.1.
  config.diffusion.overlap = 0.1
  config.diffusion.max_loss_weight = 20.0  # w(σ) reaches 10⁵ at σ_min; public attempts clamp it at 20.
  config.eval.scorer_workdir = 'workdirs/text_ar'
  config.train.num_epochs = 4  # x B = 16 for DiffusionBlocks, whose sequences are twice as long ([clean | noisy]).
  return config
