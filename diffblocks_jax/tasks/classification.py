"""Classification as a DiffusionBlocks task: the class label's embedding is what is diffused (SPEC §3, §5, §7).

Target: the row of the label table E for the true class, L2-normalised. A block's output is class logits;
its loss is the cross-entropy weighted by w(σ); its estimate of the clean target is x̂ = softmax(logits)·E.
Unconditional (guidance): the image zeroed. The baseline ViT is the end-to-end form of the same task.

Evaluation: test accuracy of the sampler's final logits over the whole test split (`eval/accuracy`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from diffblocks_jax import config as config_lib
from diffblocks_jax.core import blocks, partitions, sampler, steps
from diffblocks_jax.data import dataset, input_pipeline
from diffblocks_jax.tasks import registry

UNIT = 'img'  # Progress lines count images per second.


def label_table(model, block) -> jax.Array:
  """The raw label table E (num_classes, hidden) in the outer parts that block `block` runs between."""
  return model.outer(model.block(block)).label_embed[...]


@dataclasses.dataclass(frozen=True)
class Classification:
  """What the core asks of a task, for image classification. Inputs are NHWC images, targets int labels."""
  sigma_data: float = 0.5
  loss_weighting: str = 'batch_mean'  # 'batch_mean' = mean(w)·mean(ce) (release) | 'per_sample' = mean(w·ce).
  normalized_embeddings: bool = False  # Sampler: x̂ from raw rows of E (release) or the normalised rows.

  @classmethod
  def from_config(cls, config) -> Classification:
    return cls(float(config.diffusion.sigma_data), config.diffusion.loss_weighting,
               bool(config.eval.normalized_embeddings))

  def target(self, model, labels, block) -> jax.Array:
    z = label_table(model, block).astype(jnp.float32)[labels]
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

  def target_shape(self, model, images) -> tuple[int, int]:
    return (images.shape[0], label_table(model, 0).shape[-1])

  def denoise(self, model, images, z_t, sigmas, block, key):
    return model.denoise(images, z_t, sigmas, block=block, key=key)

  def loss(self, logits, labels, sigmas):
    """Weighted denoising cross-entropy (SPEC §5.5-5.6); aux: the plain cross-entropy."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    w = partitions.loss_weight(sigmas, self.sigma_data)
    if self.loss_weighting == 'per_sample':
      return jnp.mean(w * ce), {'ce': ce.mean()}
    return jnp.mean(w) * jnp.mean(ce), {'ce': ce.mean()}  # What the release computes, through a broadcast.

  def estimate(self, model, logits, block) -> jax.Array:
    table = label_table(model, block).astype(jnp.float32)
    if self.normalized_embeddings:
      table = table / jnp.linalg.norm(table, axis=-1, keepdims=True)
    return jax.nn.softmax(logits, axis=-1) @ table

  def unconditional(self, images):
    return jnp.zeros_like(images)

  def drop_condition(self, key, images, prob: float):
    """Classifier-free guidance training: zero the image for a random `prob` of the batch (SPEC §7)."""
    if not prob:
      return images
    drop = jax.random.bernoulli(key, prob, (images.shape[0],))
    return jnp.where(drop[:, None, None, None], jnp.zeros_like(images), images)

  def end_to_end_loss(self, model, images, labels, key):
    ce = optax.softmax_cross_entropy_with_integer_labels(model(images, key=key), labels).mean()
    return ce, {'ce': ce}


# ----------------------------------------------------------------------------------- from a config

def make_task(config, data=None) -> Classification:
  del data  # The label table lives in the model.
  return Classification.from_config(config)


def partition(config, data=None) -> partitions.LogNormalPartition:
  del data  # The EDM plan needs nothing from the data.
  return partitions.LogNormalPartition.from_config(config_lib.num_blocks(config), config.diffusion)


def train_batch(key, rows, data_config):
  """(inputs, targets) of a step from gathered uint8 images and labels: the augmented image conditions, the
  label is the target."""
  images, labels = rows
  return input_pipeline.augment(key, images, data_config), labels


def make_train_step(graphdef, config, schedule, *, data=None, block: int | None = None,
                    placement: blocks.Placement = blocks.ON_DEVICE):
  """The config's step: end to end for the baseline, block-wise for DiffusionBlocks (`block` fixes the block)."""
  task = make_task(config, data)
  if not registry.kind(config.model.kind).blockwise:
    return steps.make_end_to_end_step(graphdef, task, config.optim, schedule)
  return steps.make_block_step(graphdef, task, partition(config), config.optim, schedule,
                              condition_dropout=config.diffusion.class_dropout_prob, block=block,
                               placement=placement)


def sample(model, images, key, *, num_steps: int, edm: partitions.EDM = partitions.DEFAULT_EDM,
           normalized_embeddings: bool = False, cfg_scale: float = 1.0, return_trajectory: bool = False):
  """Final logits of the Euler sampler; with `return_trajectory`, also the class probabilities per step."""
  task = Classification(edm.sigma_data, normalized_embeddings=normalized_embeddings)
  plan = partitions.LogNormalPartition(model.num_blocks, edm=edm)
  out = sampler.sample(task, model, images, key, partition=plan, num_steps=num_steps, cfg_scale=cfg_scale,
                       return_trajectory=return_trajectory)
  if not return_trajectory:
    return out
  logits, outputs = out
  return logits, jnp.stack([jax.nn.softmax(o, axis=-1) for o in outputs], axis=1)


def guided_logits(model, images, z, sigma: float, block: int, cfg_scale: float):
  """l(0) + s·(l(x) − l(0)) with the unconditional pass batched alongside; s = 1 is the plain pass."""
  return sampler.guided(Classification(), model, images, z, sigma, block, cfg_scale)


def make_predict_fn(graphdef, config, *, num_steps: int | None = None, cfg_scale: float | None = None,
                    normalized_embeddings: bool | None = None) -> Callable:
  """`predict(params, images, key) -> logits` for either model kind; jit it once per batch shape."""
  if not registry.kind(config.model.kind).blockwise:
    return lambda params, images, key: nnx.merge(graphdef, params)(images)
  n = num_steps or inference_steps(config)
  s = config.eval.cfg_scale if cfg_scale is None else cfg_scale
  norm = config.eval.normalized_embeddings if normalized_embeddings is None else normalized_embeddings
  edm = partitions.EDM.from_config(config.diffusion)

  def predict(params, images, key):
    return sample(nnx.merge(graphdef, params), images, key, num_steps=n, edm=edm, normalized_embeddings=norm,
                  cfg_scale=s)

  return predict


def inference_steps(config) -> int:
  """The sampler's steps: config.eval.num_inference_steps, 0 meaning B (each block runs once, SPEC §7)."""
  return config.eval.num_inference_steps or config_lib.num_blocks(config)


def predict_split(predict: Callable, params, images: np.ndarray, batch_size: int, key: jax.Array,
                  preprocess: Callable = lambda x: x) -> np.ndarray:
  """Logits for every example of a split (uint8 on the host): the last partial batch is padded, not dropped.

  `predict` must already be jitted; padding keeps one batch shape so it compiles once.
  """
  out = [np.asarray(predict(params, preprocess(batch), jax.random.fold_in(key, i)))[:real]
         for i, (batch, real) in enumerate(dataset.padded_batches(images, batch_size))]
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(logits, axis=-1) == labels))


# ----------------------------------------------------------------------------------- evaluation of a run

def make_eval_fn(exp, **sampler_overrides):
  """(params) → test logits for the whole split of the experiment `exp` (padded last batch, nothing dropped)."""
  predict = make_predict_fn(exp.graphdef, exp.config, **sampler_overrides)
  data_config, batches = exp.config.data, exp.eval_batches()
  # Logits replicated: every process can read them (multi-host) and score the split. The parameters come as
  # they are (block-parallel: each block on its group; XLA moves what the sampler needs).
  jitted = jax.jit(lambda p, x, k: predict(p, input_pipeline.normalize(x, data_config), k),
                   in_shardings=(None, batches, None), out_shardings=exp.replicated())
  # Every process holds the whole test split: each places its devices' rows of a batch.
  to_global = lambda batch: jax.make_array_from_callback(batch.shape, batches, lambda index: batch[index])
  key = exp.key('eval')
  return lambda params: predict_split(jitted, exp.on_device(params), exp.data.test_images, exp.eval_batch_size,
                                      key, preprocess=to_global)


def evaluate_params(exp, params, **sampler_overrides) -> float:
  """Test accuracy of `params` (sampler settings overridable: num_steps, cfg_scale, normalized_embeddings)."""
  return accuracy(make_eval_fn(exp, **sampler_overrides)(params), exp.data.test_labels)


def make_evaluator(exp, workdir: str):
  """(params, step) -> ({'eval/accuracy': ...}, log line)."""
  del workdir  # Nothing is written beside the metrics.
  eval_fn = make_eval_fn(exp)

  def evaluate(params, step):
    del step
    acc = accuracy(eval_fn(params), exp.data.test_labels)
    return {'eval/accuracy': acc}, f'test accuracy {acc:.4f} on {len(exp.data.test_labels)} images'

  return evaluate


def noise_plan_lines(config) -> list[str]:
  """Where each block trains against where the sampler calls it (`partitions.noise_plan`); a resolved noise plan
  says so first."""
  edm = partitions.EDM.from_config(config.diffusion)
  lines = partitions.noise_plan(config_lib.num_blocks(config), inference_steps(config), edm,
                                config.diffusion.overlap)
  if config.diffusion.noise_plan != 'release':
    lines.insert(0, f'noise plan {config.diffusion.noise_plan!r}: P_mean {edm.p_mean:.4f} (config.diffusion.p_mean '
                 f'{config.diffusion.p_mean} unused); σ_max = {edm.sigma_max:g} lies '
                 f'{(math.log(edm.sigma_max) - edm.p_mean) / edm.p_std:.2f} P_std above P_mean')
  return lines


def start_lines(exp) -> list[str]:
  """Logged when a block-wise run starts: the noise plan per block (docs/results.md: why it matters)."""
  return noise_plan_lines(exp.config) if exp.blockwise else []
