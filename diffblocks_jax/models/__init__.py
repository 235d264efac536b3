"""Model construction from a config: classification (ViT, DiffusionBlocks ViT-DiT), image generation (DiT) or
language modelling (masked diffusion DiT, autoregressive Llama)."""

import jax.numpy as jnp
from flax import nnx

from diffblocks_jax.models.dblock import DiffusionBlocksViT, partition_layers
from diffblocks_jax.models.dit import DiffusionBlocksDiT, DiT
from diffblocks_jax.models.text import ARLM, DiffusionBlocksAR, DiffusionBlocksMaskedDiT, MaskedDiT
from diffblocks_jax.models.vit import ViT

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

_IMAGE_DIMS = ('image_size', 'channels', 'num_classes')
_TEXT_DIMS = ('vocab_size', 'seq_len')
# model.kind -> the data dimensions its constructor needs (what `build` checks before building).
KIND_DIMS = {'vit': _IMAGE_DIMS, 'dblock': _IMAGE_DIMS, 'dit': _IMAGE_DIMS, 'dit_dblock': _IMAGE_DIMS,
             'mdm': _TEXT_DIMS, 'mdm_dblock': _TEXT_DIMS, 'ar': _TEXT_DIMS, 'ar_dblock': _TEXT_DIMS}


def build(model_config, *, seed: int = 0, sigma_data: float = 0.5, image_size: int | None = None,
          channels: int | None = None, num_classes: int | None = None, vocab_size: int | None = None,
          seq_len: int | None = None) -> nnx.Module:
  """A model with initialised parameters; wrap in `nnx.eval_shape` to get shapes only.

  The data dimensions a kind needs (KIND_DIMS) come from the data; the others are ignored. `sigma_data` is EDM's
  data scale, which the EDM-preconditioned models (DiT, the autoregressive DiffusionBlocks LM) need.
  """
  kind = model_config.kind
  if kind not in KIND_DIMS:
    raise ValueError(f'model.kind must be one of {", ".join(map(repr, KIND_DIMS))}, got {kind!r}')
  if model_config.compute_dtype not in DTYPES:
    raise ValueError(f'model.compute_dtype must be one of {sorted(DTYPES)}, got {model_config.compute_dtype!r}')
  given = dict(image_size=image_size, channels=channels, num_classes=num_classes, vocab_size=vocab_size,
               seq_len=seq_len)
  missing = [name for name in KIND_DIMS[kind] if given[name] is None]
  if missing:
    raise ValueError(f'model.kind={kind!r} needs the data dimensions {", ".join(KIND_DIMS[kind])}; missing: '
                     f'{", ".join(missing)} (kinds: {", ".join(KIND_DIMS)})')
  kwargs = {name: given[name] for name in KIND_DIMS[kind]}
  kwargs.update(rngs=nnx.Rngs(seed), dtype=DTYPES[model_config.compute_dtype])
  if kind.endswith('_dblock'):
    counts = partition_layers(model_config.num_layers, model_config.num_blocks, model_config.layers_per_block)
  if kind == 'vit':
    return ViT(model_config, **kwargs)
  if kind == 'dblock':
    return DiffusionBlocksViT(model_config, **kwargs)
  if kind == 'dit':
    return DiT(model_config, sigma_data=sigma_data, **kwargs)
  if kind == 'dit_dblock':
    return DiffusionBlocksDiT(model_config, counts, sigma_data=sigma_data, **kwargs)
  if kind == 'mdm':
    return MaskedDiT(model_config, **kwargs)
  if kind == 'mdm_dblock':
    return DiffusionBlocksMaskedDiT(model_config, counts, **kwargs)
  if kind == 'ar':
    return ARLM(model_config, **kwargs)
  return DiffusionBlocksAR(model_config, counts, sigma_data=sigma_data, **kwargs)  # 'ar_dblock'


def split(model: nnx.Module):
  """(graphdef, params as a pure nested dict): the functional form the jitted steps use."""
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


__all__ = ['ARLM', 'DTYPES', 'DiT', 'DiffusionBlocksAR', 'DiffusionBlocksDiT',
           'DiffusionBlocksMaskedDiT', 'DiffusionBlocksViT', 'KIND_DIMS', 'MaskedDiT', 'ViT', 'build',
           'partition_layers', 'split']
