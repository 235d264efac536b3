"""Configuration: the shared defaults of every experiment (SPEC §2-§8) and their validation.

Experiment files (configs/) import `get_base_config()` and override what differs; the base names no dataset and
no model kind, so a run's saved config says what it trained. Every field is documented here once. What each
model kind needs is read from the kind registry (tasks/registry.py), not restated here.
"""

import math
import os

import ml_collections

from diffblocks_jax.tasks import registry


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameters, data order, noise, dropout; a resumed run redraws the same numbers.

  # --- data (SPEC §8) ---
  c.data = d = ml_collections.ConfigDict()
  d.source = 'tfds'  # registry.SOURCES. Images: 'tfds' | 'digits' (scikit-learn, offline) | 'npz' | 'folder'.
  # Text: 'text' (a UTF-8 file at data.path, or the TFDS text dataset data.name when data.path is '') | 'pydoc'
  # (CPython's bundled documentation text, ~465k characters, offline).
  d.name = ''  # TFDS dataset name, e.g. 'cifar100' (any image-classification dataset with image/label features).
  d.tfds_data_dir = ''  # Folder holding prepared TFDS data ('' = TFDS default, ~/tensorflow_datasets).
  d.tfds_download = True  # Try download_and_prepare when the data is missing (False: fail at once, offline).
  d.split_seed = 0  # Seeds the digits 80/20 split and the folder source's training-file order.
  d.validation_fraction = 0.0  # > 0: evaluate on this seeded, stratified share of TRAIN (train shrinks) and
  # never load the test split (sources 'digits', 'npz', 'tfds'; text: the train text's tail): for choosing
  # settings (tools/noise_plan.py, the autoregressive sampler).
  d.label_key = 'label'  # Feature holding the class (CIFAR-100: 'label', the fine labels).
  d.train_split = 'train'
  d.test_split = 'test'
  d.path = ''  # .npz file (x_train/y_train/x_test/y_test) or image-folder root, for those sources.
  d.on_corrupt = 'error'  # Folder source: 'error' or 'skip' an unreadable image (always reported by path).
  d.mean = (0.5,)  # Per-channel normalisation (one entry: every channel); configs/common.py has CIFAR-100's.
  d.std = (0.5,)
  d.pad_crop = 4  # Random crop with this much zero padding (0 = off).
  d.random_resized_crop = False  # torchvision RandomResizedCrop to the image size instead (release: Tiny-ImageNet).
  d.resized_crop_scale = (0.08, 1.0)  # Its range of box area / image area.
  d.resized_crop_ratio = (3 / 4, 4 / 3)  # Its range of box width / height (drawn log-uniformly).
  d.flip = True  # Random horizontal flip, p = 0.5.
  d.randaugment = False  # torchvision RandAugment on the device (paper recipe).
  d.randaugment_num_ops = 2
  d.randaugment_magnitude = 9
  # Text (sources 'text' and 'pydoc'):
  d.vocab = 'char'  # 'char' (the corpus's characters, sorted), 'byte' (UTF-8 bytes, 256 tokens) or 'tokenizer'.
  d.tokenizer = ''  # vocab 'tokenizer': a Hugging Face tokenizer.json, or the checkpoint folder holding one.
  d.vocab_size = 0  # vocab 'tokenizer': the model's token rows (0 = the tokenizer's size; a checkpoint's, e.g.
  # Qwen2.5's 151,936 for 151,665 tokens, where it rounds its vocabulary up).
  d.seq_len = 128  # Tokens per training and held-out sequence (non-overlapping windows of the stream).
  d.test_fraction = 0.1  # Held-out split: this contiguous tail of the stream (a file or 'pydoc'; TFDS: test_split).
  d.text_key = 'text'  # TFDS feature holding the text (text8, lm1b: 'text').

  # --- model (SPEC §2, §3); image size, channels and classes come from the data ---
  c.model = m = ml_collections.ConfigDict()
  m.kind = ''  # A key of tasks/registry.KINDS: the task, the network and whether it is block-wise. Set by the config.
  m.patch_size = 4
  m.hidden_size = 128
  m.num_layers = 12
  m.num_heads = 4
  m.mlp_dim = 3072  # Hugging Face's default intermediate size, never overridden by the release.
  m.dropout = 0.1  # After position embeddings and on both residual branches.
  m.attention_dropout = 0.1  # On attention probabilities.
  m.layer_norm_eps = 1e-12
  m.num_blocks = 3  # B: blocks = diffusion steps (block-wise kinds only).
  m.layers_per_block = ()  # Explicit uneven partition, e.g. (5, 4, 3); () = num_layers / num_blocks each.
  m.label_token = 'replace'  # 'replace' the CLS token with c_in*z_t (release) or 'concat' it (paper).
  m.independent_blocks = False  # Each block owns a copy of the shared parts (needed for parallel_blocks).
  m.weight_tied = False  # Block-wise kinds: ONE block's parameters (and Adam state, updated every step) serve all
  # B noise slices; B still cuts the noise levels (training draws a slice, the default sampler has B steps) and
  # eval.num_inference_steps may be any N >= 1 (the block runs N times). Needs equal depths, shared outer parts.
  m.compute_dtype = 'float32'  # 'float32' (parity) or 'bfloat16'; parameters and optimizer stay fp32.
  m.mlp_ratio = 4.0  # DiT and language models: MLP width = mlp_ratio * hidden_size (mlp_dim is the ViT's).
  # The Llama-style language models' options, as a Hugging Face checkpoint's config.json sets them
  # (models/pretrained.hf_model_fields); the defaults are this project's own layout:
  m.mlp_width = 0  # SwiGLU width (Hugging Face's intermediate_size); 0 = mlp_ratio * hidden_size.
  m.num_kv_heads = 0  # Key/value heads; fewer than num_heads (dividing it) is grouped-query attention. 0 = num_heads.
  m.rope_theta = 10000.0  # Rotary base θ.
  m.rope_scaling = ''  # '' | 'linear' (frequencies / rope_factor) | 'llama3' (Llama 3.1's per-wavelength rescaling).
  m.rope_factor = 1.0  # Its factor.
  m.rope_low_freq_factor = 1.0  # 'llama3': wavelengths above original / low are divided by the factor,
  m.rope_high_freq_factor = 4.0  # those below original / high kept, the ones between blended.
  m.rope_original_max_positions = 8192  # 'llama3': the context length the checkpoint was pretrained at.
  m.attention_bias = False  # Biases on the q, k, v projections (Qwen2).
  m.attention_out_bias = False  # And on the output projection (Llama's attention_bias=true sets both).
  m.tie_embeddings = False  # The output head is the token embedding table (tie_word_embeddings).
  m.norm_eps = 1e-6  # RMSNorm epsilon (rms_norm_eps).
  m.bos_token = -1  # End-to-end LM: the first input token; -1 = an extra embedding row after the vocabulary,
  # >= 0 = that token of the vocabulary (an imported checkpoint's bos_token_id).
  m.remat = ''  # Rematerialise each layer in the backward pass (jax.checkpoint) with this policy of
  # jax.checkpoint_policies (REMAT_POLICIES; '' = off): less activation memory, one more forward pass per layer.

  # --- diffusion (SPEC §4, §5, §7) ---
  c.diffusion = f = ml_collections.ConfigDict()
  f.sigma_min = 0.002
  f.sigma_max = 80.0
  f.p_mean = -1.2
  f.p_std = 1.2
  f.noise_plan = 'release'  # 'release': P_mean as set | 'matched': P_mean = ln(sigma_max) - 3*p_std, so the
  # sampler's first sigma lies in the training log-normal's bulk (partitions.matched_p_mean; the kinds whose
  # registry entry lists it: a diffused embedding).
  f.sigma_data = 0.5
  f.overlap = 0.05  # gamma: each block's noise range widened by this fraction of its log-width per side.
  f.loss_weighting = 'batch_mean'  # 'batch_mean' = mean(w)*mean(ce) (release) | 'per_sample' = mean(w*ce).
  f.max_loss_weight = 0.0  # Autoregressive DiffusionBlocks: clamp w(σ) at this value (0 = no clamp; public code: 20).
  f.clean_ce_weight = 0.0  # Autoregressive DiffusionBlocks: λ >= 0; the loss adds λ × the next-token cross-entropy
  # of the clean half of [clean | noisy] through the block's layers and head (0 = the block-wise loss alone).
  f.class_dropout_prob = 0.0  # Guidance training: the condition (classification: the image; generation: the
  # class, replaced by the null class) is dropped for this share of a batch.

  # --- optimizer (SPEC §6) ---
  c.optim = o = ml_collections.ConfigDict()
  o.lr = 1e-3
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.weight_decay = 0.01  # On every parameter, biases, norms and embeddings included (PyTorch AdamW).
  o.grad_clip = 1.0  # Global L2 norm over the gradients that exist in the step (0 = off).
  o.schedule = 'constant_with_warmup'  # Or 'cosine_with_min_lr'.
  o.warmup_epochs = 0.0  # Linear warm-up length in (training) epochs.
  o.min_lr = 0.0  # Floor of 'cosine_with_min_lr'.

  # --- training ---
  c.train = t = ml_collections.ConfigDict()
  t.batch_size = 128  # Global batch, split over the 'data' mesh axis.
  t.num_epochs = 500  # Baseline epochs; DiffusionBlocks trains num_epochs * B (same block-updates each).
  t.scale_epochs_by_blocks = True  # Multiply num_epochs by B for dblock (SPEC §5.7).
  t.steps_per_call = 50  # Training steps fused into one compiled call (lax.scan); logs happen between.
  t.log_every_steps = 200
  t.checkpoint_every_steps = 2000
  t.keep_checkpoints = 3
  t.offload_idle_blocks = False  # Keep the blocks' parameters and Adam state in host memory; one block on the device.
  t.eval_every_epochs = 10.0  # Test-split evaluation cadence (0 = only at the end).
  t.resume_step = 0  # Resume from this checkpoint step (0 = the latest); later ones are moved aside, not deleted.
  t.allow_config_change = False  # Resume although fields beyond run length, logging and evaluation changed.
  t.blocks = ()  # One job per block (docs/block_jobs.md): train only these blocks of the block-parallel run, e.g.
  # (0,) or (1, 2), with their data orders and draws; the other blocks are never built. () = every block.
  t.init_from = ''  # Start from trained weights instead of random ones (a new run only; a resume reads its own
  # checkpoint): a WORKDIR of this project (the same kind, or the end-to-end counterpart of a block-wise kind:
  # `ar` into `ar_dblock`, `vit` into `dblock`), or 'hf:PATH' (a Hugging Face folder: config.json +
  # *.safetensors). The optimizer starts afresh. docs/block_jobs.md, docs/finetune.md.
  t.freeze_shared = False  # Keep the shared outer parts (embeddings, head) as train.init_from gave them: no
  # gradient, no Adam state. What lets block jobs share those parts (docs/block_jobs.md).

  # --- evaluation (SPEC §7) ---
  c.eval = e = ml_collections.ConfigDict()
  e.batch_size = 500
  e.num_inference_steps = 0  # 0 = num_blocks (classification: each block runs once); generation: 0 = 50.
  e.normalized_embeddings = False  # x_hat from raw rows of E (release) or the L2-normalised rows.
  e.cfg_scale = 1.0  # Classifier-free guidance scale; 1.0 = plain conditional logits (no extra pass).
  e.step = 0  # --mode=eval: checkpoint step to evaluate (0 = latest).
  # Image generation:
  e.solver = 'euler'  # 'euler' or 'heun' (one extra model call per step); autoregressive DiffusionBlocks also
  # 'ancestral' (each step draws a token and noises its embedding afresh: tasks/autoregressive.py).
  e.sigma_grid = 'quantile'  # 'quantile' (equal quantiles of the log-normal, the release's) or 'karras' (rho = 7).
  e.num_samples = 0  # Samples scored per evaluation (0 = as many as test images), class-balanced.
  e.classifier_workdir = ''  # Workdir of a classifier trained here on the same data: eval/fd, eval/sample_accuracy.
  e.feature_fn = ''  # 'module:function' mapping float [0, 1] NHWC images to features: eval/fd_external (e.g. FID).
  # Language models (masked diffusion and autoregressive); eval.num_samples 0 = 64 samples:
  e.elbo_draws = 4  # Masked diffusion: draws of t per held-out sequence and block for the bound (eval/bpc).
  e.temperature = 1.0  # Sampling temperature of the final logits.
  e.top_k = 0  # Sample among the k likeliest tokens (0 = all).
  e.scorer_workdir = ''  # Workdir of an end-to-end autoregressive run on the same data: scores samples (eval/gen_ppl).

  # --- devices (training/sharding.py) ---
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Devices on the 'data' axis (-1 = all).
  c.parallel_blocks = False  # Train the B independent blocks at once: the block axis sharded over B device groups.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = False  # Call jax.distributed.initialize() (auto-detected under SLURM).
  c.distributed.coordinator_address = ''  # host:port; '' = let JAX detect it (SLURM).
  c.distributed.num_processes = 0  # 0 = detect.
  c.distributed.process_id = -1  # -1 = detect.
  return c


def task_name(config) -> str:
  return registry.kind(config.model.kind).task


def uses_blocks(config) -> bool:
  return registry.kind(config.model.kind).blockwise


class ConfigError(ValueError):
  """An impossible or unknown setting; the message names the field."""


# config.model.remat: off, or a policy of jax.checkpoint_policies that takes no arguments (what a layer's
# rematerialisation keeps: nothing but its input; every matmul's output; those without batch dimensions).
REMAT_POLICIES = ('', 'nothing_saveable', 'dots_saveable', 'dots_with_no_batch_dims_saveable')

_CHOICES = {
    'data.source': tuple(registry.SOURCES),
    'data.vocab': ('char', 'byte', 'tokenizer'),
    'data.on_corrupt': ('error', 'skip'),
    'model.kind': tuple(registry.KINDS),
    'eval.solver': ('euler', 'heun', 'ancestral'),
    'eval.sigma_grid': ('quantile', 'karras'),
    'model.label_token': ('replace', 'concat'),
    'model.compute_dtype': ('float32', 'bfloat16'),
    'model.remat': REMAT_POLICIES,
    'model.rope_scaling': ('', 'linear', 'llama3'),
    'diffusion.loss_weighting': ('batch_mean', 'per_sample'),
    'diffusion.noise_plan': ('release', 'matched'),
    'optim.schedule': ('constant_with_warmup', 'cosine_with_min_lr'),
}


def num_blocks(config) -> int:
  """B for a DiffusionBlocks config (1 for the baseline)."""
  if not uses_blocks(config):
    return 1
  return len(config.model.layers_per_block) or config.model.num_blocks


def trained_blocks(config) -> tuple[int, ...]:
  """The blocks a run trains, in ascending order: config.train.blocks (a block job), else all B."""
  return tuple(sorted(config.train.blocks)) if config.train.blocks else tuple(range(num_blocks(config)))


def _block_job_errors(config, blockwise: bool) -> list[str]:
  """config.train.blocks: a block job is the block-parallel run restricted to its blocks (docs/block_jobs.md)."""
  owned = tuple(config.train.blocks)
  if not owned:
    return []
  field = f'config.train.blocks={owned}'
  if not all(isinstance(b, int) and not isinstance(b, bool) for b in owned):
    return [f'{field} must name blocks by number, e.g. --config.train.blocks=0 or --config.train.blocks="(1, 2)" '
            '(() trains every block)']
  if not blockwise:
    return [f'{field} needs a block-wise config.model.kind {registry.kinds_where(lambda k: k.blockwise)}, not '
            f'{config.model.kind!r} (an end-to-end model has no blocks)']
  errors = []
  if len(set(owned)) < len(owned):
    errors.append(f'{field} names a block twice: name each block once')
  if config.model.num_blocks >= 1 and not all(0 <= b < num_blocks(config) for b in owned):
    errors.append(f'{field} names a block outside 0..{num_blocks(config) - 1} (config.model.num_blocks='
                  f'{config.model.num_blocks})')
  if not config.parallel_blocks:  # (parallel_blocks without independent or frozen parts is refused, above.)
    errors.append(f'{field} (a block job: the block-parallel run restricted to these blocks) needs '
                  f'config.parallel_blocks=True and {_NO_PART_TRAINED_TWICE}')
  return errors


# What block-parallel training and block jobs need, said once: no parameter may be trained by two blocks at once.
_NO_PART_TRAINED_TWICE = (
    'either config.model.independent_blocks=True (each block its own copy of the outer parts) or the shared outer '
    'parts frozen from a trained run (config.train.init_from=WORKDIR and config.train.freeze_shared=True)')


def _init_from_errors(config, blockwise: bool) -> list[str]:
  """config.train.init_from and freeze_shared, as far as they can be checked without reading the source."""
  t, m = config.train, config.model
  errors = []
  source = t.init_from  # Whether it exists is checked when a new run starts (training/initialisation.py).
  if t.freeze_shared:
    if not blockwise:
      errors.append(f'config.train.freeze_shared=True needs a block-wise config.model.kind '
                    f'{registry.kinds_where(lambda k: k.blockwise)}, got {m.kind!r} (an end-to-end model has no '
                    'shared parts)')
    elif m.independent_blocks:
      errors.append('config.train.freeze_shared=True freezes the outer parts the blocks share; with '
                    'config.model.independent_blocks=True every block has its own copy and none is shared')
    if not source:
      errors.append('config.train.freeze_shared=True would freeze randomly initialised outer parts: name the run '
                    'to take them from, --config.train.init_from=WORKDIR')
  return errors


# Numeric fields and the range each must lie in: (test, the rule as the message states it); every value must
# also be a finite number. A value outside is refused before anything loads: many would otherwise fail deep
# inside (hidden_size=0, pad_crop<0) or train silently wrong (grad_clip<0 reverses the gradient, lr=nan).
_RANGES = {
    'model.hidden_size': (lambda v: v >= 1, '>= 1'),
    'model.num_heads': (lambda v: v >= 1, '>= 1'),
    'model.num_layers': (lambda v: v >= 1, '>= 1'),
    'model.mlp_dim': (lambda v: v >= 1, '>= 1'),
    'model.mlp_ratio': (lambda v: v > 0, '> 0'),
    'model.patch_size': (lambda v: v >= 1, '>= 1'),
    'model.num_blocks': (lambda v: v >= 1, '>= 1'),
    'model.dropout': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'model.attention_dropout': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'model.layer_norm_eps': (lambda v: v > 0, '> 0'),
    'diffusion.sigma_min': (lambda v: v > 0, '> 0'),
    'diffusion.sigma_max': (lambda v: v > 0, '> 0'),
    'diffusion.p_mean': (lambda v: True, 'any finite number'),
    'diffusion.p_std': (lambda v: v > 0, '> 0'),
    'diffusion.sigma_data': (lambda v: v > 0, '> 0'),
    'diffusion.overlap': (lambda v: v >= 0, '>= 0 (0 = no overlap)'),
    'diffusion.class_dropout_prob': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'optim.lr': (lambda v: v > 0, '> 0'),
    'optim.b1': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'optim.b2': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'optim.eps': (lambda v: v > 0, '> 0'),
    'optim.weight_decay': (lambda v: v >= 0, '>= 0'),
    'optim.grad_clip': (lambda v: v >= 0, '>= 0 (0 = off; a negative norm bound would reverse the gradient)'),
    'optim.warmup_epochs': (lambda v: v >= 0, '>= 0'),
    'optim.min_lr': (lambda v: v >= 0, '>= 0'),
    'data.pad_crop': (lambda v: v >= 0, '>= 0 (0 = off)'),
    'data.validation_fraction': (lambda v: 0 <= v < 1, 'in [0, 1) (0 = evaluate on the test split)'),
    'train.batch_size': (lambda v: v >= 1, '>= 1'),
    'train.num_epochs': (lambda v: v >= 1, '>= 1'),
    'train.steps_per_call': (lambda v: v >= 1, '>= 1'),
    'train.log_every_steps': (lambda v: v >= 1, '>= 1'),
    'train.checkpoint_every_steps': (lambda v: v >= 1, '>= 1'),
    'train.keep_checkpoints': (lambda v: v >= 1, '>= 1'),
    'train.eval_every_epochs': (lambda v: v >= 0, '>= 0 (0 = only at the end)'),
    'eval.batch_size': (lambda v: v >= 1, '>= 1'),
    'eval.num_inference_steps': (lambda v: v >= 0, '>= 0 (0 = B)'),
    'eval.num_samples': (lambda v: v >= 0, ">= 0 (0 = the test split's size)"),
    'eval.cfg_scale': (lambda v: v >= 0, '>= 0 (1 = no guidance)'),
    'eval.elbo_draws': (lambda v: v >= 1, '>= 1'),
    'eval.temperature': (lambda v: v > 0, '> 0'),
    'eval.top_k': (lambda v: v >= 0, '>= 0 (0 = all tokens)'),
    'diffusion.max_loss_weight': (lambda v: v >= 0, '>= 0 (0 = no clamp)'),
    'diffusion.clean_ce_weight': (lambda v: v >= 0, '>= 0 (0 = the block-wise loss alone)'),
    'model.mlp_width': (lambda v: v >= 0, '>= 0 (0 = mlp_ratio * hidden_size)'),
    'model.num_kv_heads': (lambda v: v >= 0, '>= 0 (0 = num_heads)'),
    'model.rope_theta': (lambda v: v > 0, '> 0'),
    'model.rope_factor': (lambda v: v > 0, '> 0'),
    'model.norm_eps': (lambda v: v > 0, '> 0'),
    'model.bos_token': (lambda v: v >= -1, '>= -1 (-1 = an extra row)'),
    'data.seq_len': (lambda v: v >= 2, '>= 2'),
    'data.test_fraction': (lambda v: 0 < v < 1, 'in (0, 1)'),
}


def _range_errors(config) -> dict[str, str]:
  """field -> its error, for the fields of _RANGES whose values are out of range."""
  errors = {}
  for field, (ok, rule) in _RANGES.items():
    section, name = field.split('.')
    value = config[section][name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      errors[field] = f'config.{field}={value!r} is not a finite number (it must be {rule})'
    elif not ok(value):
      errors[field] = f'config.{field}={value!r} must be {rule}'
  return errors


def _partition_errors(m) -> list[str]:
  """How the depth is cut into blocks (SPEC §3): the one statement of the rule (`models.partition_layers`
  only refuses what is no partition at all, pointing here)."""
  if m.layers_per_block:
    counts = tuple(m.layers_per_block)
    if len(counts) != m.num_blocks or sum(counts) != m.num_layers or min(counts) < 1:
      return [f'config.model.layers_per_block={counts} must have config.model.num_blocks={m.num_blocks} '
              f'positive entries summing to config.model.num_layers={m.num_layers}']
  elif m.num_blocks >= 1 and m.num_layers % m.num_blocks:
    return [f'config.model.num_layers={m.num_layers} is not divisible by config.model.num_blocks={m.num_blocks} '
            '(set config.model.layers_per_block for an uneven partition, e.g. (5, 4, 3))']
  return []


def validate(config, *, num_devices: int | None = None) -> None:
  """Names every impossible setting before anything is loaded or compiled (raises ConfigError).

  Runs once per run, where the experiment is built (training/experiment.py); what it accepts, nothing downstream
  checks again.
  """
  errors = []
  for field, allowed in _CHOICES.items():
    section, name = field.split('.')
    if config[section][name] not in allowed:
      errors.append(f'config.{field}={config[section][name]!r} is not one of {allowed}')
  out_of_range = _range_errors(config)
  errors += out_of_range.values()
  # The checks below combine fields: each runs only when the fields it reads are in range and known.
  valid = lambda *fields: not set(fields) & set(out_of_range)
  m, f, d = config.model, config.diffusion, config.data
  kind = registry.KINDS.get(m.kind)  # None: already named above.
  if valid('diffusion.sigma_min', 'diffusion.sigma_max') and f.sigma_min >= f.sigma_max:
    errors.append(f'config.diffusion.sigma_min={f.sigma_min} must be below config.diffusion.sigma_max={f.sigma_max}')
  heads_ok = valid('model.hidden_size', 'model.num_heads') and not m.hidden_size % m.num_heads
  if valid('model.hidden_size', 'model.num_heads') and m.hidden_size % m.num_heads:
    errors.append(f'config.model.hidden_size={m.hidden_size} is not divisible by config.model.num_heads={m.num_heads}')
  if heads_ok and valid('model.num_kv_heads') and m.num_kv_heads and m.num_heads % m.num_kv_heads:
    errors.append(f'config.model.num_heads={m.num_heads} is not a multiple of config.model.num_kv_heads='
                  f'{m.num_kv_heads} (grouped-query attention shares each key/value head among whole groups)')
  if m.rope_scaling == 'llama3' and m.rope_high_freq_factor <= m.rope_low_freq_factor:
    errors.append(f'config.model.rope_high_freq_factor={m.rope_high_freq_factor} must exceed '
                  f'config.model.rope_low_freq_factor={m.rope_low_freq_factor} (rope_scaling=\'llama3\')')
  if valid('diffusion.clean_ce_weight') and f.clean_ce_weight and kind is not None and not (
      kind.blockwise and kind.task == 'autoregressive'):
    errors.append(f'config.diffusion.clean_ce_weight={f.clean_ce_weight} is for the autoregressive DiffusionBlocks '
                  f'LM (its clean path); config.model.kind={m.kind!r} has none: set it to 0')
  if d.source == 'tfds' and not d.name:
    errors.append("config.data.name is empty: name the TFDS dataset (e.g. 'cifar100'), or pick another "
                  f'config.data.source from {tuple(registry.SOURCES)}')
  if d.source == 'text' and not d.path and not d.name:
    errors.append("config.data.source='text' needs config.data.path (a UTF-8 file) or config.data.name (a TFDS "
                  "text dataset, e.g. 'text8'); 'pydoc' is CPython's bundled text, offline")
  if d.validation_fraction and d.source not in registry.VALIDATION_SOURCES:
    errors.append(f'config.data.validation_fraction={d.validation_fraction} needs config.data.source in '
                  f'{registry.VALIDATION_SOURCES} (got {d.source!r}, which would evaluate on its test split)')
  if kind is not None:
    if kind.blockwise and valid('model.num_layers', 'model.num_blocks'):
      errors += _partition_errors(m)
    if heads_ok:
      errors += [e for rule in kind.model_rules if (e := rule(m))]
    if f.noise_plan not in kind.noise_plans:
      errors.append(f'config.diffusion.noise_plan={f.noise_plan!r} is not one of {kind.noise_plans} for '
                    f'model.kind={m.kind!r} (\'matched\' is for a diffused embedding: kinds '
                    f'{registry.kinds_where(lambda k: "matched" in k.noise_plans)})')
    if config.eval.solver not in kind.solvers:
      errors.append(f'config.eval.solver={config.eval.solver!r} is not one of {kind.solvers} for '
                    f'model.kind={m.kind!r}')
    source_family = registry.SOURCES.get(d.source)
    if source_family is not None and source_family != kind.data:
      sources = tuple(s for s, family in registry.SOURCES.items() if family == kind.data)
      errors.append(f'config.model.kind={m.kind!r} needs {kind.data} data: config.data.source={d.source!r} must '
                    f'be one of {sources}')
  if d.random_resized_crop:
    if d.pad_crop:
      errors.append(f'config.data.random_resized_crop=True and config.data.pad_crop={d.pad_crop}: choose one '
                    '(set config.data.pad_crop=0)')
    lo, hi = tuple(d.resized_crop_scale)
    if not 0 < lo <= hi <= 1:
      errors.append(f'config.data.resized_crop_scale={tuple(d.resized_crop_scale)} must satisfy 0 < lo <= hi <= 1')
    lo, hi = tuple(d.resized_crop_ratio)
    if not 0 < lo <= hi:
      errors.append(f'config.data.resized_crop_ratio={tuple(d.resized_crop_ratio)} must satisfy 0 < lo <= hi')
  uneven = len(set(m.layers_per_block)) > 1  # Equal depths are stacked on a block axis (core/blocks.py).
  blockwise = kind is not None and kind.blockwise
  if m.weight_tied:  # One block serves every slice (core/blocks.py, row_of).
    if kind is not None and not blockwise:
      errors.append(f'config.model.weight_tied=True needs a block-wise config.model.kind '
                    f'{registry.kinds_where(lambda k: k.blockwise)}, got {m.kind!r}')
    if uneven:
      errors.append(f'config.model.weight_tied=True needs blocks of equal depth: config.model.layers_per_block='
                    f'{tuple(m.layers_per_block)} is uneven (set it to () for num_layers / num_blocks each)')
    if m.independent_blocks:
      errors.append('config.model.weight_tied=True shares one block, so there are no blocks to make independent: '
                    'set config.model.independent_blocks=False')
    if config.parallel_blocks:
      errors.append('config.model.weight_tied=True has one block to train, not B at once: set '
                    'config.parallel_blocks=False')
  if config.parallel_blocks and (not blockwise or uneven):
    errors.append(f'config.parallel_blocks=True needs a block-wise config.model.kind '
                  f'{registry.kinds_where(lambda k: k.blockwise)} and blocks of equal depth (the block axis is '
                  'sharded)')
  elif config.parallel_blocks and not (m.independent_blocks or config.train.freeze_shared):
    errors.append(f'config.parallel_blocks=True trains the blocks at once, so it needs {_NO_PART_TRAINED_TWICE}')
  errors += _block_job_errors(config, blockwise)
  errors += _init_from_errors(config, blockwise)
  if config.train.offload_idle_blocks and (not blockwise or uneven or config.parallel_blocks):
    errors.append('config.train.offload_idle_blocks=True needs a block-wise config.model.kind with blocks of equal depth '
                  '(no uneven config.model.layers_per_block) and config.parallel_blocks=False')
  if num_devices is not None:
    data_devices = num_devices if config.mesh.data == -1 else config.mesh.data
    if config.parallel_blocks and kind is not None:
      data_devices = max(1, num_devices // (len(config.train.blocks) or num_blocks(config)))  # A group per block.
    if data_devices < 1 or data_devices > num_devices:
      errors.append(f'config.mesh.data={config.mesh.data} does not fit the {num_devices} available devices')
    elif config.train.batch_size % data_devices:
      errors.append(f'config.train.batch_size={config.train.batch_size} is not divisible by the {data_devices} '
                    "devices on the 'data' mesh axis")
  if errors:
    raise ConfigError('Invalid config:\n  ' + '\n  '.join(errors))


def validate_data(config, data) -> None:
  """Checks that need the dataset's shapes (known only after loading it)."""
  if not hasattr(data, 'image_size'):  # Text: the models take any vocabulary and length.
    return
  image_size, channels = data.image_size, data.channels
  if image_size % config.model.patch_size:
    raise ConfigError(f'image size {image_size} (from config.data) is not divisible by '
                      f'config.model.patch_size={config.model.patch_size}')
  for field in ('mean', 'std'):
    if len(config.data[field]) not in (1, channels):
      raise ConfigError(f'config.data.{field} has {len(config.data[field])} entries for {channels}-channel images')


# What a resumed run may change: how long it runs, what it logs and saves, how it evaluates, where it runs and
# where the data files live. Anything else (model, data content and split, seeds, noise plan, optimizer)
# would continue a run under other rules than it started with.
RESUMABLE_FIELDS = ('train.num_epochs', 'train.steps_per_call', 'train.log_every_steps',
                    'train.checkpoint_every_steps', 'train.keep_checkpoints', 'train.eval_every_epochs',
                    'train.resume_step', 'train.allow_config_change', 'data.tfds_data_dir', 'data.tfds_download')
RESUMABLE_SECTIONS = ('eval', 'mesh', 'distributed')


def _flat(tree, prefix='') -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def changed_fields(saved: dict, config) -> list[str]:
  """'field: saved -> new' for every field that differs from a run's saved config.json and may not change on
  resume (RESUMABLE_FIELDS and RESUMABLE_SECTIONS may). A field the saved config lacks counts as unchanged
  if it holds its default (a run saved before the field existed)."""
  import json  # pylint: disable=g-import-not-at-top
  old, new = _flat(saved), _flat(json.loads(config.to_json_best_effort()))
  defaults = _flat(json.loads(get_base_config().to_json_best_effort()))
  out = []
  for field in sorted(set(old) | set(new)):
    if field in RESUMABLE_FIELDS or field.split('.')[0] in RESUMABLE_SECTIONS:
      continue
    before, after = old.get(field, defaults.get(field)), new.get(field, defaults.get(field))
    if before != after:
      out.append(f'config.{field}: {before!r} -> {after!r}')
  return out


def load_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file; 'file.py:arg' passes `arg`, as `--config=file.py:arg` does."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = str(path).partition(':')
  spec = importlib.util.spec_from_file_location(f'_config_{abs(hash(path))}', path)
  if spec is None:
    raise ConfigError(f'config file {path!r} cannot be loaded')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


CONFIG_COPY = ('config', 'metadata')  # Each checkpoint keeps the run's config in <step>/config/metadata.


def read_saved(workdir: str) -> dict:
  """WORKDIR/config.json as a dict. A damaged file is a ConfigError naming it, where it is broken and the fix:
  the copy every checkpoint keeps (training/checkpointing.py), or the config file with allow_config_change."""
  import glob, json  # pylint: disable=g-import-not-at-top,multiple-imports
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: is {workdir!r} the workdir of a training run?')
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
    if not isinstance(saved, dict) or not isinstance(saved.get('model'), dict):
      raise ValueError('it is not a config (no model section)')
  except (ValueError, UnicodeDecodeError) as e:
    where = f' at line {e.lineno}, column {e.colno}' if isinstance(e, json.JSONDecodeError) else ''
    copies = sorted(glob.glob(os.path.join(workdir, 'checkpoints', '*', *CONFIG_COPY)),
                    key=lambda p: int(p.split(os.sep)[-3]) if p.split(os.sep)[-3].isdigit() else -1)
    fix = (f'restore it from the copy in the latest checkpoint: cp {copies[-1]} {path}' if copies else
           'no checkpoint keeps a copy of it')
    raise ConfigError(f'{path} is damaged ({getattr(e, "msg", e)}{where}): {fix}; or pass the config file that '
                      'started the run, --config=..., with --config.train.allow_config_change=True to write it '
                      'anew.') from None
  return saved


def load_workdir(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run saved in WORKDIR/config.json (for evaluation and notebooks). Fields added to the
  code after the run was saved hold their defaults, so that readers and `--config.<field>` overrides find them."""
  saved = read_saved(workdir)
  for section, defaults in get_base_config().to_dict().items():
    if isinstance(defaults, dict) and isinstance(saved.get(section), dict):
      saved[section] = {**defaults, **saved[section]}
  return ml_collections.ConfigDict(saved)
