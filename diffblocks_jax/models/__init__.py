"""Model construction from a config: the network of `config.model.kind`, as the kind registry names it
(tasks/registry.py): classification (ViT, DiffusionBlocks ViT-DiT), image generation (DiT) or language modelling
(masked diffusion DiT, autoregressive Llama)."""

import inspect

import jax.numpy as jnp
from flax import nnx

from diffblocks_jax.models.dblock import DiffusionBlocksViT, partition_layers
from diffblocks_jax.models.dit import DiffusionBlocksDiT, DiT
from diffblocks_jax.models.text import ARLM, DiffusionBlocksAR, DiffusionBlocksMaskedDiT, MaskedDiT
from diffblocks_jax.models.vit import ViT
from diffblocks_jax.tasks import registry

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def build(model_config, *, seed: int = 0, sigma_data: float = 0.5, **data_dims: int | None) -> nnx.Module:
  """A model with initialised parameters; wrap in `nnx.eval_shape` to get shapes only.

  `data_dims` are the data's dimensions (image_size, channels, num_classes; vocab_size, seq_len): the kind's data
  family says which its constructor takes (registry.DATA_DIMS), the others are ignored. `sigma_data` is EDM's data
  scale, for the networks that precondition with it (DiT, the autoregressive DiffusionBlocks LM); a block-wise
  network that takes `layer_counts` gets the config's cut (`partition_layers`).
  """
  kind = registry.kind(model_config.kind)
  if model_config.compute_dtype not in DTYPES:
    raise ValueError(f'model.compute_dtype must be one of {sorted(DTYPES)}, got {model_config.compute_dtype!r}')
  needed = registry.DATA_DIMS[kind.data]
  unknown = set(data_dims) - {d for dims in registry.DATA_DIMS.values() for d in dims}
  missing = [name for name in needed if data_dims.get(name) is None]
  if unknown or missing:
    raise ValueError(f'model.kind={model_config.kind!r} needs the data dimensions {", ".join(needed)}; missing: '
                     f'{", ".join(missing) or "none"}; unknown: {", ".join(sorted(unknown)) or "none"}')
  kwargs = {name: data_dims[name] for name in needed}
  kwargs.update(rngs=nnx.Rngs(seed), dtype=DTYPES[model_config.compute_dtype])
  cls = registry.model_class(model_config.kind)
  # What a constructor names, it is given: EDM's data scale, and a block-wise network's layers per block.
  takes = inspect.signature(cls.__init__).parameters
  if 'sigma_data' in takes:
    kwargs['sigma_data'] = sigma_data
  if 'layer_counts' in takes:
    kwargs['layer_counts'] = partition_layers(model_config.num_layers, model_config.num_blocks,
                                              model_config.layers_per_block)
  model = cls(model_config, **kwargs)
  # A block-wise network passes model.weight_tied on to core.blocks.DiffusionBlocks, as it does independent_blocks;
  # one that does not would train B untied blocks under a weight-tied config.
  if model_config.get('weight_tied') and not getattr(model, 'weight_tied', False):
    raise ValueError(f'model.kind={model_config.kind!r}: {cls.__name__} does not pass model.weight_tied to '
                     'DiffusionBlocks (weight_tied=cfg.weight_tied)')
  return model


def split(model: nnx.Module):
  """(graphdef, params as a pure nested dict): the functional form the jitted steps use."""
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


__all__ = ['ARLM', 'DTYPES', 'DiT', 'DiffusionBlocksAR', 'DiffusionBlocksDiT',
           'DiffusionBlocksMaskedDiT', 'DiffusionBlocksViT', 'MaskedDiT', 'ViT', 'build',
           'partition_layers', 'split']
