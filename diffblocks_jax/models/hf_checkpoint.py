"""Hugging Face checkpoint folders read without torch: config.json → this project's model fields, and the tensors
of *.safetensors (headers first, arrays after every name and shape is checked) → a `Pretrained`, the neutral form
models/pretrained.py writes into a model's parameter tree.

Llama-family decoders (Llama, SmolLM, Qwen2) and ViT (ViTForImageClassification, ViTModel). Every mismatch is a
ValueError of one line naming the file and the tensor or field.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

from diffblocks_jax.tasks import registry

TEXT_ARCHITECTURES = ('LlamaForCausalLM', 'Qwen2ForCausalLM')
IMAGE_ARCHITECTURES = ('ViTForImageClassification', 'ViTModel')
_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16}
# Buffers some checkpoints carry that the forward recomputes.
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)


@dataclasses.dataclass
class Pretrained:
  """A checkpoint in this project's layer layout: `layers[i]` a plain layer's pure tree (as ARLM or ViT hold
  it), `outer` the embeddings, final norm and head (text: token_embed (V, h) without a BOS row, norm (h,), head
  kernel (h, V) or None when tied; ViT: patch, cls_token, pos_embed, norm)."""
  family: str  # 'text' or 'image' (registry.DATA_DIMS).
  layers: list[dict]
  outer: dict


# ------------------------------------------------------------------ safetensors, header first

class SafetensorsFolder:
  """The tensors of a folder's *.safetensors files: names, dtypes and shapes from the headers alone;
  `array(name)` reads one tensor."""

  def __init__(self, folder: str):
    self.folder = folder
    files = sorted(glob.glob(os.path.join(folder, '*.safetensors')))
    if not files:
      raise ValueError(f'{folder}: no *.safetensors weights in the folder (a config.json alone is not a checkpoint)')
    self.index: dict[str, tuple[str, str, tuple[int, ...], int, int, int]] = {}
    for path in files:
      with open(path, 'rb') as f:
        raw = f.read(8)
        if len(raw) < 8:
          raise ValueError(f'{path}: not a safetensors file (shorter than its 8-byte header length)')
        (length,) = struct.unpack('<Q', raw)
        try:
          header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError) as e:
          raise ValueError(f'{path}: not a safetensors file (its header is not JSON: {e})') from None
      size = os.path.getsize(path)
      for name, info in header.items():
        if name == '__metadata__':
          continue
        if info['dtype'] not in _DTYPES:
          raise ValueError(f'{path}: tensor {name} has dtype {info["dtype"]}; only {", ".join(_DTYPES)} are read')
        start, end = info['data_offsets']
        if 8 + length + end > size:
          raise ValueError(f'{path}: tensor {name} lies past the end of the file (a truncated copy?)')
        self.index[name] = (path, info['dtype'], tuple(info['shape']), 8 + length + start, end - start, length)

  def names(self) -> set[str]:
    return set(self.index)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.index[name][2]

  def where(self, name: str) -> str:
    return os.path.basename(self.index[name][0])

  def array(self, name: str) -> np.ndarray:
    """Tensor `name` as float32; NaN or infinite weights are refused."""
    path, dtype, shape, offset, nbytes, _ = self.index[name]
    with open(path, 'rb') as f:
      f.seek(offset)
      x = np.frombuffer(f.read(nbytes), dtype=_DTYPES[dtype]).reshape(shape).astype(np.float32)
    if not np.isfinite(x).all():
      raise ValueError(f'{path}: tensor {name} holds NaN or infinite weights')
    return x


def read_hf_config(folder: str) -> dict:
  path = os.path.join(folder, 'config.json')
  if not os.path.isdir(folder):
    raise ValueError(f'{folder}: no such folder (init_from=hf:FOLDER wants a folder with config.json and '
                     '*.safetensors)')
  if not os.path.isfile(path):
    raise ValueError(f'{path}: no such file (a Hugging Face checkpoint folder holds config.json)')
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise ValueError(f'{path}: not JSON ({e})') from None


def architecture(hf: dict, folder: str) -> str:
  names = hf.get('architectures') or []
  for name in names:
    if name in TEXT_ARCHITECTURES + IMAGE_ARCHITECTURES:
      return name
  raise ValueError(f'{os.path.join(folder, "config.json")}: architectures={names} is not supported; supported: '
                   f'{", ".join(TEXT_ARCHITECTURES + IMAGE_ARCHITECTURES)}')


# ------------------------------------------------------------------ config.json → model fields

def hf_model_fields(folder: str) -> dict[str, Any]:
  """The `config.model` fields a checkpoint folder's config.json implies (read alone: cheap). Configs may apply
  them (`configs/text_ar_hf.py`); `load_hf` checks a config against them."""
  hf = read_hf_config(folder)
  arch = architecture(hf, folder)
  where = os.path.join(folder, 'config.json')
  if arch in IMAGE_ARCHITECTURES:
    if hf.get('hidden_act', 'gelu') != 'gelu':
      raise ValueError(f'{where}: hidden_act={hf["hidden_act"]!r} is not supported (the ViT uses exact GELU)')
    return dict(hidden_size=hf['hidden_size'], num_layers=hf['num_hidden_layers'],
                num_heads=hf['num_attention_heads'], mlp_dim=hf['intermediate_size'], patch_size=hf['patch_size'],
                layer_norm_eps=hf.get('layer_norm_eps', 1e-12))
  heads, hidden = hf['num_attention_heads'], hf['hidden_size']
  if hf.get('head_dim') not in (None, hidden // heads):
    raise ValueError(f'{where}: head_dim={hf["head_dim"]} differs from hidden_size / num_attention_heads; not '
                     'supported')
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ValueError(f'{where}: hidden_act={hf["hidden_act"]!r} is not supported (SwiGLU with SiLU only)')
  if hf.get('mlp_bias'):
    raise ValueError(f'{where}: mlp_bias=true is not supported')
  if hf.get('use_sliding_window'):
    raise ValueError(f'{where}: use_sliding_window=true is not supported')
  fields = dict(hidden_size=hidden, num_layers=hf['num_hidden_layers'], num_heads=heads,
                num_kv_heads=hf.get('num_key_value_heads') or heads, mlp_width=hf['intermediate_size'],
                norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
                tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
                # The end-to-end LM's first input token; a checkpoint without one starts sequences with token 0.
                bos_token=hf['bos_token_id'] if hf.get('bos_token_id') is not None else 0,
                attention_bias=arch == 'Qwen2ForCausalLM' or bool(hf.get('attention_bias')),
                attention_out_bias=arch == 'LlamaForCausalLM' and bool(hf.get('attention_bias')),
                rope_scaling='', rope_factor=1.0)
  # transformers < 5 writes rope_theta and rope_scaling; 5 writes rope_parameters (theta, type and factors).
  scaling = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  fields['rope_theta'] = float(scaling.get('rope_theta', hf.get('rope_theta', 10000.0)))
  kind = scaling.get('rope_type', scaling.get('type', 'default'))
  if kind == 'linear':
    fields.update(rope_scaling='linear', rope_factor=float(scaling['factor']))
  elif kind == 'llama3':
    fields.update(rope_scaling='llama3', rope_factor=float(scaling['factor']),
                  rope_low_freq_factor=float(scaling['low_freq_factor']),
                  rope_high_freq_factor=float(scaling['high_freq_factor']),
                  rope_original_max_positions=int(scaling['original_max_position_embeddings']))
  elif kind != 'default':
    raise ValueError(f"{where}: rope_scaling type {kind!r} is not supported (only 'linear' and 'llama3')")
  return fields


def _check_fields(folder: str, fields: dict, model_config):
  wrong = [f'config.model.{k}={model_config[k]!r} but the checkpoint has {v!r}' for k, v in fields.items()
           if k in model_config and not _same(model_config[k], v)]
  if wrong:
    raise ValueError(f'{os.path.join(folder, "config.json")}: ' + '; '.join(wrong))


def _same(a, b) -> bool:
  return math.isclose(a, b, rel_tol=1e-9) if isinstance(b, float) else a == b


# ------------------------------------------------------------------ checkpoint → Pretrained

def _linear(ckpt, name, bias: bool) -> dict:
  out = {'kernel': ckpt(name + '.weight').T}
  if bias:
    out['bias'] = ckpt(name + '.bias')
  return out


def _llama(files: SafetensorsFolder, fields: dict) -> Pretrained:
  qkv, o = fields['attention_bias'], fields['attention_out_bias']
  layers = []
  for i in range(fields['num_layers']):
    p = f'model.layers.{i}.'
    layers.append({
        'norm1': {'scale': files.array(p + 'input_layernorm.weight')},
        'norm2': {'scale': files.array(p + 'post_attention_layernorm.weight')},
        'attn': {ours: _linear(files.array, p + f'self_attn.{theirs}_proj', bias)
                 for ours, theirs, bias in (('query', 'q', qkv), ('key', 'k', qkv), ('value', 'v', qkv),
                                            ('out', 'o', o))},
        'mlp': {name: _linear(files.array, p + f'mlp.{name}_proj', False) for name in ('gate', 'up', 'down')},
    })
  embed = files.array('model.embed_tokens.weight')
  head = None if fields['tie_embeddings'] else files.array('lm_head.weight').T
  return Pretrained('text', layers, {'token_embed': embed, 'norm': files.array('model.norm.weight'), 'head': head})


def _llama_names(fields: dict, hidden: int) -> dict[str, tuple[int, ...]]:
  """Every tensor name a Llama-family checkpoint of these fields holds, with its shape ('?' rows: the vocabulary)."""
  h, kv, width = hidden, fields['num_kv_heads'] * (hidden // fields['num_heads']), fields['mlp_width']
  names = {'model.embed_tokens.weight': (-1, h), 'model.norm.weight': (h,)}
  if not fields['tie_embeddings']:
    names['lm_head.weight'] = (-1, h)
  for i in range(fields['num_layers']):
    p = f'model.layers.{i}.'
    names.update({p + 'input_layernorm.weight': (h,), p + 'post_attention_layernorm.weight': (h,),
                  p + 'self_attn.q_proj.weight': (h, h), p + 'self_attn.k_proj.weight': (kv, h),
                  p + 'self_attn.v_proj.weight': (kv, h), p + 'self_attn.o_proj.weight': (h, h),
                  p + 'mlp.gate_proj.weight': (width, h), p + 'mlp.up_proj.weight': (width, h),
                  p + 'mlp.down_proj.weight': (h, width)})
    if fields['attention_bias']:
      names.update({p + 'self_attn.q_proj.bias': (h,), p + 'self_attn.k_proj.bias': (kv,),
                    p + 'self_attn.v_proj.bias': (kv,)})
    if fields['attention_out_bias']:
      names[p + 'self_attn.o_proj.bias'] = (h,)
  return names


def _vit_prefix(files: SafetensorsFolder) -> str:
  return 'vit.' if 'vit.embeddings.cls_token' in files.names() else ''


def _vit_names(fields: dict, channels: int, prefix: str, qkv_bias: bool) -> dict[str, tuple[int, ...]]:
  h, width, p = fields['hidden_size'], fields['mlp_dim'], fields['patch_size']
  names = {prefix + 'embeddings.cls_token': (1, 1, h), prefix + 'embeddings.position_embeddings': (1, -1, h),
           prefix + 'embeddings.patch_embeddings.projection.weight': (h, channels, p, p),
           prefix + 'embeddings.patch_embeddings.projection.bias': (h,),
           prefix + 'layernorm.weight': (h,), prefix + 'layernorm.bias': (h,)}
  for i in range(fields['num_layers']):
    q = f'{prefix}encoder.layer.{i}.'
    for name in ('query', 'key', 'value'):
      names[q + f'attention.attention.{name}.weight'] = (h, h)
      if qkv_bias:
        names[q + f'attention.attention.{name}.bias'] = (h,)
    names.update({q + 'attention.output.dense.weight': (h, h), q + 'attention.output.dense.bias': (h,),
                  q + 'intermediate.dense.weight': (width, h), q + 'intermediate.dense.bias': (width,),
                  q + 'output.dense.weight': (h, width), q + 'output.dense.bias': (h,)})
    for name in ('layernorm_before', 'layernorm_after'):
      names.update({q + name + '.weight': (h,), q + name + '.bias': (h,)})
  return names


def _vit(files: SafetensorsFolder, fields: dict, prefix: str, qkv_bias: bool) -> Pretrained:
  a, h = files.array, fields['hidden_size']

  def dense(name, bias=True):
    return {'kernel': a(name + '.weight').T, 'bias': a(name + '.bias') if bias else np.zeros(h, np.float32)}

  def norm(name):
    return {'scale': a(name + '.weight'), 'bias': a(name + '.bias')}

  layers = []
  for i in range(fields['num_layers']):
    q = f'{prefix}encoder.layer.{i}.'
    layers.append({
        'norm1': norm(q + 'layernorm_before'), 'norm2': norm(q + 'layernorm_after'),
        'attn': {'query': dense(q + 'attention.attention.query', qkv_bias),
                 'key': dense(q + 'attention.attention.key', qkv_bias),
                 'value': dense(q + 'attention.attention.value', qkv_bias),
                 'out': dense(q + 'attention.output.dense')},
        'mlp': {'fc1': dense(q + 'intermediate.dense'), 'fc2': dense(q + 'output.dense')},
    })
  e = prefix + 'embeddings.'
  patch = {'kernel': a(e + 'patch_embeddings.projection.weight').transpose(2, 3, 1, 0),
           'bias': a(e + 'patch_embeddings.projection.bias')}
  return Pretrained('image', layers, {'patch': {'proj': patch}, 'cls_token': a(e + 'cls_token'),
                                      'pos_embed': a(e + 'position_embeddings'), 'norm': norm(prefix + 'layernorm')})


def _check_names(files: SafetensorsFolder, expected: dict[str, tuple[int, ...]], ignored_prefixes=()):
  """Every expected tensor present with its shape (-1: any size), nothing else but known extras."""
  names = files.names()
  missing = sorted(set(expected) - names)
  if missing:
    raise ValueError(f'{files.folder}: the checkpoint lacks tensor {missing[0]}'
                     + (f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''))
  unexpected = sorted(n for n in names - set(expected)
                      if not n.endswith(_IGNORED_SUFFIXES) and not n.startswith(tuple(ignored_prefixes)))
  if unexpected:
    raise ValueError(f'{files.folder}/{files.where(unexpected[0])}: unexpected tensor {unexpected[0]}'
                     + (f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else '')
                     + ' for the architecture config.json names')
  for name, shape in expected.items():
    got = files.shape(name)
    if len(got) != len(shape) or any(s not in (-1, g) for s, g in zip(shape, got)):
      raise ValueError(f'{files.folder}/{files.where(name)}: tensor {name} has shape {got}, config.json implies '
                       f'{tuple("?" if s < 0 else s for s in shape)}')


def read_hf(folder: str, model_config) -> Pretrained:
  """A Hugging Face checkpoint folder as a `Pretrained`, after config.json and every tensor's name and shape
  agree with `model_config` (nothing is read before that)."""
  fields = hf_model_fields(folder)
  hf = read_hf_config(folder)
  arch = architecture(hf, folder)
  family = 'image' if arch in IMAGE_ARCHITECTURES else 'text'
  if registry.kind(model_config.kind).data != family:
    raise ValueError(f'{os.path.join(folder, "config.json")}: architectures={hf["architectures"]} is a {family} '
                     f'model; config.model.kind={model_config.kind!r} reads {registry.kind(model_config.kind).data}')
  _check_fields(folder, fields, model_config)
  files = SafetensorsFolder(folder)
  if family == 'text':
    _check_names(files, _llama_names(fields, fields['hidden_size']))
    vocab = files.shape('model.embed_tokens.weight')[0]
    if not fields['tie_embeddings'] and files.shape('lm_head.weight')[0] != vocab:
      raise ValueError(f'{folder}/{files.where("lm_head.weight")}: tensor lm_head.weight has '
                       f'{files.shape("lm_head.weight")[0]} rows, model.embed_tokens.weight {vocab}')
    return _llama(files, fields)
  prefix, qkv_bias = _vit_prefix(files), bool(hf.get('qkv_bias', True))
  channels = hf.get('num_channels', 3)
  _check_names(files, _vit_names(fields, channels, prefix, qkv_bias),
               ignored_prefixes=('classifier.', 'pooler.', prefix + 'embeddings.mask_token'))
  return _vit(files, fields, prefix, qkv_bias)
