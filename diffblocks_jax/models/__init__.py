"""Model construction from a config: classification (ViT, DiffusionBlocks ViT-DiT) or generation (DiT)."""

import jax.numpy as jnp
from flax import nnx

from diffblocks_jax.models.dblock import DiffusionBlocksViT, partition_layers
from diffblocks_jax.models.dit import DiffusionBlocksDiT, DiT
from diffblocks_jax.models.vit import ViT

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def build(model_config, *, image_size: int, channels: int, num_classes: int, seed: int = 0,
          sigma_data: float = 0.5) -> nnx.Module:
  """A model with initialised parameters; wrap in `nnx.eval_shape` to get shapes only.

  `sigma_data` is EDM's data scale, which the DiT's preconditioning needs (the diffusion config's).
  """
  if model_config.compute_dtype not in DTYPES:
    raise ValueError(f'model.compute_dtype must be one of {sorted(DTYPES)}, got {model_config.compute_dtype!r}')
  kwargs = dict(image_size=image_size, channels=channels, num_classes=num_classes, rngs=nnx.Rngs(seed),
                dtype=DTYPES[model_config.compute_dtype])
  if model_config.kind == 'vit':
    return ViT(model_config, **kwargs)
  if model_config.kind == 'dblock':
    return DiffusionBlocksViT(model_config, **kwargs)
  if model_config.kind == 'dit':
    return DiT(model_config, sigma_data=sigma_data, **kwargs)
  if model_config.kind == 'dit_dblock':
    counts = partition_layers(model_config.num_layers, model_config.num_blocks, model_config.layers_per_block)
    return DiffusionBlocksDiT(model_config, counts, sigma_data=sigma_data, **kwargs)
  raise ValueError(f"model.kind must be 'vit', 'dblock', 'dit' or 'dit_dblock', got {model_config.kind!r}")


def split(model: nnx.Module):
  """(graphdef, params as a pure nested dict): the functional form the jitted steps use."""
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


__all__ = ['DTYPES', 'DiT', 'DiffusionBlocksDiT', 'DiffusionBlocksViT', 'ViT', 'build', 'partition_layers',
           'split']
