"""Pretrained weights: Hugging Face checkpoints (Llama family, ViT) and end-to-end runs as a model's start.

  params = load_hf(folder, config.model, abstract_params)        # 'hf:FOLDER' (config.json + *.safetensors)
  params = from_end_to_end(params, source.model, config.model, abstract_params)   # an end-to-end LM or ViT run

Both go through one neutral form, a `Pretrained` (embeddings, a list of plain layers, the final norm and head, in
this project's layer layout), and `assemble` writes it into the tree of the config's kind: end to end, every layer
as it is; block-wise, block b gets the checkpoint's layers of its slice (layers are cut into B blocks in order)
and its adaLN modulation starts as the imported layer itself: kernel zero, bias giving shift 0, scale (norm
weight − 1) on the scale-free norms and gate 1, so at initialisation each block's layers compute the imported
layers' function on any input (`tests/test_hf_import.py`). What the checkpoint lacks (the time embedder, the
noisy-slot projection, label embeddings, a classifier for the new label set) is a fresh model's draw (seed 0).

Checkpoint folders are read by models/hf_checkpoint.py (safetensors headers first, then arrays), so neither torch
nor the `safetensors` package is needed at run time. Every mismatch is a ValueError of one line naming the file
and the tensor or field.
"""

from __future__ import annotations

import math

import numpy as np
from flax import nnx

from diffblocks_jax.core import blocks
from diffblocks_jax.models.hf_checkpoint import (  # pylint: disable=unused-import  (the importers' public names)
    IMAGE_ARCHITECTURES, TEXT_ARCHITECTURES, Pretrained, SafetensorsFolder, hf_model_fields, read_hf)
from diffblocks_jax.tasks import registry


# ------------------------------------------------------------------ end-to-end params → Pretrained

def _from_params(params, source_model_config) -> Pretrained:
  cls = registry.model_class(source_model_config.kind)
  params = _numpy(params)
  if cls.__name__ == 'ARLM':
    parts = params['parts']
    embed = parts['token_embed']
    outer = {'token_embed': embed[:-1] if source_model_config.bos_token < 0 else embed,
             'bos_row': embed[-1:] if source_model_config.bos_token < 0 else None,
             'norm': parts['norm']['scale'], 'head': parts['head']['kernel'] if 'head' in parts else None}
    layers = [params['layers']['layers'][i] for i in sorted(params['layers']['layers'])]
    return Pretrained('text', layers, outer)
  if cls.__name__ == 'ViT':
    outer = {k: params[k] for k in ('patch', 'cls_token', 'pos_embed', 'norm')}
    return Pretrained('image', [params['layers'][i] for i in sorted(params['layers'])], outer)
  raise ValueError(f'an end-to-end run of model.kind={source_model_config.kind!r} cannot start another kind; '
                   'only the Llama-style LM and the ViT can')


def _numpy(tree):
  return {k: _numpy(v) for k, v in tree.items()} if isinstance(tree, dict) else np.asarray(tree)


# ------------------------------------------------------------------ Pretrained → a model's tree

def _fresh(model_config, abstract_params) -> dict:
  """A fresh model's parameters (seed 0) for the parts a checkpoint lacks, its data dims read off the tree."""
  from diffblocks_jax import models  # pylint: disable=g-import-not-at-top  (models/__init__ does not import us)
  flat = blocks.unstack(abstract_params)
  family = registry.kind(model_config.kind).data
  if family == 'text':
    outer = flat.get('parts') or flat.get('shared') or flat['blocks'][0]['shared']
    vocab = outer['token_embed'].shape[0] - ('parts' in flat and model_config.bos_token < 0)
    dims = dict(vocab_size=vocab, seq_len=1 << 30)  # seq_len only bounds inputs; no parameter depends on it.
  else:
    outer = flat.get('shared') or (flat['blocks'][0]['shared'] if 'blocks' in flat else flat)
    kernel = outer['patch']['proj']['kernel']
    tokens = outer['pos_embed'].shape[1] - 1 - (model_config.label_token == 'concat' and 'blocks' in flat)
    dims = dict(image_size=math.isqrt(tokens) * kernel.shape[0], channels=kernel.shape[2],
                num_classes=outer['head']['kernel'].shape[1])
  model = models.build(model_config, seed=0, **dims)
  return _numpy(nnx.to_pure_dict(nnx.state(model)))


def interpolate_positions(pos: np.ndarray, tokens: int) -> np.ndarray:
  """(1, 1 + n², h) position embeddings → (1, tokens, h): the grid resized as Hugging Face's ViT does
  (`interpolate_pos_encoding`: torch bicubic, a = −0.75, align_corners=False, edges clamped), CLS kept."""
  n, m = math.isqrt(pos.shape[1] - 1), math.isqrt(tokens - 1)
  if n * n != pos.shape[1] - 1 or m * m != tokens - 1:
    raise ValueError(f'position embeddings of {pos.shape[1]} tokens cannot become {tokens}: not 1 + a square grid')
  grid = pos[0, 1:].reshape(n, n, -1).astype(np.float64)
  weights = _bicubic_matrix(n, m)
  grid = np.einsum('ai,bj,ijh->abh', weights, weights, grid)
  return np.concatenate([pos[:, :1], grid.reshape(1, m * m, -1).astype(pos.dtype)], axis=1)


def _bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in): torch's 1-D bicubic resampling (A = −0.75, half-pixel centres, clamped borders)."""
  a, scale = -0.75, size_in / size_out
  cubic1 = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
  cubic2 = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
  out = np.zeros((size_out, size_in))
  for i in range(size_out):
    src = (i + 0.5) * scale - 0.5
    x0 = math.floor(src)
    t = src - x0
    for k, w in zip(range(-1, 3), (cubic2(t + 1), cubic1(t), cubic1(1 - t), cubic2(2 - t))):
      out[i, min(max(x0 + k, 0), size_in - 1)] += w
  return out


def _conditioned_text_layer(plain: dict, fresh: dict) -> dict:
  """An adaLN-Zero Llama layer whose start is the plain layer: modulation kernel 0, bias (shift 0, scale w − 1,
  gate 1) per branch, w the plain layer's RMSNorm weight (the conditioned norms are scale-free)."""
  ones = np.ones_like(plain['norm1']['scale'])
  bias = np.concatenate([0 * ones, plain['norm1']['scale'] - 1, ones, 0 * ones, plain['norm2']['scale'] - 1, ones])
  return dict(fresh, attn=plain['attn'], mlp=plain['mlp'],
              modulation={'kernel': np.zeros_like(fresh['modulation']['kernel']), 'bias': bias})


# silu(b) = 1: the ViT layer applies SiLU after its modulation (vit.Layer), so gate 1 needs this bias.
_SILU_ONE = 1.2784645427610738


def _conditioned_vit_layer(plain: dict, fresh: dict) -> dict:
  h = plain['norm1']['scale'].shape[0]
  bias = np.zeros(6 * h, np.float32)
  bias[2 * h:3 * h] = bias[5 * h:] = _SILU_ONE
  return dict(plain, modulation={'kernel': np.zeros_like(fresh['modulation']['kernel']), 'bias': bias})


def _text_outer(pre: Pretrained, fresh: dict, end_to_end: bool, model_config, where: str) -> dict:
  extra_row = end_to_end and model_config.bos_token < 0  # ARLM with its own BOS row V.
  vocab = fresh['token_embed'].shape[0] - extra_row
  embed = pre.outer['token_embed']
  if embed.shape[0] != vocab:
    raise ValueError(f'{where}: the token embedding has {embed.shape[0]} rows; the data\'s vocabulary has {vocab} '
                     "tokens: read the data with the checkpoint's tokenizer (config.data.vocab='tokenizer', "
                     f'data.tokenizer=its folder, data.vocab_size={embed.shape[0]}; configs/text_hf.py does)')
  head = pre.outer['head']
  if head is None and not model_config.tie_embeddings:
    head = embed.T  # A tied checkpoint into an untied model: the head starts as the embedding.
  if end_to_end:
    if extra_row:  # The source's BOS row, or a fresh one for a vocabulary that had none.
      bos = pre.outer.get('bos_row')
      embed = np.concatenate([embed, fresh['token_embed'][vocab:] if bos is None else bos])
    out = dict(fresh, token_embed=embed, norm={'scale': pre.outer['norm']})
  else:
    ones = np.ones_like(pre.outer['norm'])
    out = dict(fresh, token_embed=embed, final_modulation={
        'kernel': np.zeros_like(fresh['final_modulation']['kernel']),
        'bias': np.concatenate([0 * ones, pre.outer['norm'] - 1])})
  if not model_config.tie_embeddings:
    out['head'] = {'kernel': head}
  return out


def _image_outer(pre: Pretrained, fresh: dict, end_to_end: bool) -> dict:
  out = dict(fresh, patch=pre.outer['patch'])
  if end_to_end or 'cls_token' in fresh:
    out['cls_token'] = pre.outer['cls_token']
  pos = pre.outer['pos_embed']
  grid_tokens = fresh['pos_embed'].shape[1] - (not end_to_end and 'cls_token' in fresh)  # 'concat': a label slot.
  if pos.shape[1] != grid_tokens:
    pos = interpolate_positions(pos, grid_tokens)
  if grid_tokens != fresh['pos_embed'].shape[1]:
    pos = np.concatenate([pos, fresh['pos_embed'][:, grid_tokens:]], axis=1)  # The label token's own position.
  out['pos_embed'] = pos
  out['norm'] = pre.outer['norm']
  return out


def assemble(pre: Pretrained, model_config, abstract_params, where: str) -> dict:
  """`pre` written into the parameter tree of `model_config`'s kind (end to end or cut into blocks)."""
  fresh = _fresh(model_config, abstract_params)
  if len(pre.layers) != model_config.num_layers:
    raise ValueError(f'{where}: the checkpoint has {len(pre.layers)} layers, config.model.num_layers='
                     f'{model_config.num_layers}')
  text = pre.family == 'text'
  if 'blocks' not in fresh:  # End to end.
    if text:
      layers = {i: dict(fresh['layers']['layers'][i], **pre.layers[i]) for i in range(len(pre.layers))}
      out = dict(fresh, layers={'layers': layers}, parts=_text_outer(pre, fresh['parts'], True, model_config, where))
    else:
      out = dict(_image_outer(pre, fresh, True), layers={i: l for i, l in enumerate(pre.layers)})
      out['head'] = fresh['head']  # A new label set: the classifier is drawn afresh.
    return _checked(out, abstract_params, where)
  if model_config.weight_tied:
    raise ValueError(f'{where}: config.model.weight_tied=True: one block cannot hold the checkpoint\'s '
                     f'{len(pre.layers)} different layers; import into untied blocks')
  stacked = blocks.is_stacked(fresh['blocks'])
  tree = blocks.unstack(fresh)
  convert = _conditioned_text_layer if text else _conditioned_vit_layer
  start = 0
  for b in sorted(tree['blocks']):
    block = dict(tree['blocks'][b])
    count = len(block['layers'])
    block['layers'] = {j: convert(pre.layers[start + j], block['layers'][j]) for j in range(count)}
    start += count
    if 'shared' in block:
      block['shared'] = (_text_outer(pre, block['shared'], False, model_config, where) if text
                         else _image_outer(pre, block['shared'], False))
    tree['blocks'][b] = block
  if 'shared' in tree:
    tree['shared'] = (_text_outer(pre, tree['shared'], False, model_config, where) if text
                      else _image_outer(pre, tree['shared'], False))
  return _checked(_numpy(blocks.restack(tree)) if stacked else tree, abstract_params, where)


def _checked(tree, abstract_params, where: str) -> dict:
  """`tree` as numpy arrays of exactly `abstract_params`' structure, shapes and dtypes."""
  def walk(t, a, path):
    if isinstance(a, dict):
      if not isinstance(t, dict) or set(t) != set(a):
        raise ValueError(f'{where}: the imported tree differs from the model\'s at {path or "the root"}: '
                         f'{sorted(map(str, set(t) ^ set(a))) if isinstance(t, dict) else type(t).__name__}')
      return {k: walk(t[k], a[k], f'{path}/{k}') for k in a}
    x = np.asarray(t)
    if x.shape != tuple(a.shape):
      raise ValueError(f'{where}: {path} has shape {x.shape} from the checkpoint, the model wants {tuple(a.shape)}')
    return x.astype(a.dtype)

  return walk(tree, abstract_params, '')


# ------------------------------------------------------------------ the entry points

def load_hf(folder: str, model_config, abstract_params) -> dict:
  """A Hugging Face checkpoint folder (config.json + *.safetensors: Llama, SmolLM, Qwen2; ViT) as the parameters of
  `model_config`'s kind (end to end, or cut into blocks), a nested dict of numpy arrays shaped as
  `abstract_params`. ValueError (one line, naming the file and the tensor) on any mismatch."""
  return assemble(read_hf(folder, model_config), model_config, abstract_params, folder)


def from_end_to_end(params, source_model_config, model_config, abstract_params) -> dict:
  """An end-to-end run's parameters (the Llama-style LM → its DiffusionBlocks form, the ViT → the DiffusionBlocks
  ViT) as the start of `model_config`'s."""
  for field in ('hidden_size', 'num_layers', 'num_heads'):
    if source_model_config[field] != model_config[field]:
      raise ValueError(f'the source run has model.{field}={source_model_config[field]}, this config '
                       f'{model_config[field]}')
  return assemble(_from_params(params, source_model_config), model_config, abstract_params, 'the source run')
