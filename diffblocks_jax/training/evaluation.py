"""Evaluation of a trained state, per task: test accuracy (classification), sample grids and the offline
quality figures (generation, through sampling.py); `--mode=eval` and `--mode=sample`.
"""

from __future__ import annotations

import json
import os

import jax
from absl import logging

from diffblocks_jax.training import language, sampling, sharding
from diffblocks_jax import config as config_lib
from diffblocks_jax.data import input_pipeline
from diffblocks_jax.training.experiment import Experiment, load_judge, load_trained
from diffblocks_jax.tasks import classification


def make_eval_fn(exp: Experiment, **sampler_overrides):
  """(params, key) → test logits for the whole split (padded last batch, nothing dropped)."""
  predict = classification.make_predict_fn(exp.graphdef, exp.config, **sampler_overrides)
  data_config = exp.config.data
  batches = sharding.eval_batch_sharding(exp.mesh)
  # Logits replicated: every process can read them (multi-host) and score the split. The parameters come as
  # they are (block-parallel: each block on its group; XLA moves what the sampler needs).
  jitted = jax.jit(lambda p, x, k: predict(p, input_pipeline.normalize(x, data_config), k),
                   in_shardings=(None, batches, None), out_shardings=sharding.replicated(exp.mesh))
  # Every process holds the whole test split: each places its devices' rows of a batch.
  to_global = lambda batch: jax.make_array_from_callback(batch.shape, batches, lambda index: batch[index])
  # Rounded up to a multiple of the devices (predict_split pads the batches, so nothing is scored twice).
  batch_size = -(-exp.config.eval.batch_size // exp.mesh.size) * exp.mesh.size
  key = jax.random.fold_in(jax.random.key(exp.config.seed), 0xe7a1)
  return lambda params: classification.predict_split(jitted, sharding.on_device(params), exp.data.test_images,
                                                     batch_size, key, preprocess=to_global)


def evaluate_params(exp: Experiment, params, **sampler_overrides) -> float:
  logits = make_eval_fn(exp, **sampler_overrides)(params)
  return classification.accuracy(logits, exp.data.test_labels)


def make_evaluator(exp: Experiment, workdir: str):
  """(params, step) -> (metrics, log line) of the config's task, built (and its inputs checked) up front."""
  if config_lib.task_name(exp.config) in config_lib.LANGUAGE_TASKS:
    return language.make_evaluator(exp, workdir)
  if config_lib.task_name(exp.config) == 'classification':
    eval_fn = make_eval_fn(exp)

    def classification_eval(params, step):
      del step
      accuracy = classification.accuracy(eval_fn(params), exp.data.test_labels)
      return {'eval/accuracy': accuracy}, f'test accuracy {accuracy:.4f} on {len(exp.data.test_labels)} images'

    return classification_eval
  e = exp.config.eval
  evaluator = sampling.GenerationEvaluator(exp, workdir, classifier=load_classifier(exp),
                                           feature_fn=sampling.load_feature_fn(e.feature_fn) if e.feature_fn else None)

  def generation_eval(params, step):
    metrics = evaluator(params, step)
    return metrics, sampling.describe(metrics, evaluator.num_samples)

  return generation_eval


def load_classifier(exp: Experiment) -> sampling.Classifier | None:
  """The classifier of config.eval.classifier_workdir (a finished run on the same data), checked up front."""
  path = exp.config.eval.classifier_workdir
  if not path:
    logging.warning('config.eval.classifier_workdir is empty: no eval/fd or eval/sample_accuracy, only sample '
                    'grids. Train a classifier on the same data first (e.g. configs/digits_vit.py) and pass '
                    'its workdir.')
    return None
  def kind_error(judge):
    if config_lib.task_name(judge) != 'classification':
      return f' holds a {judge.model.kind!r} run, not a classifier (model.kind vit or dblock)'
    if judge.model.kind != 'vit':
      return ": the features come from the end-to-end ViT (model.kind 'vit'), not 'dblock'"
    return None

  cls_config, cls_exp, state = load_judge(
      exp.config, 'classifier_workdir', kind_error=kind_error, why='FD needs the same dataset',
      data_fields=('source', 'name', 'path', 'split_seed', 'train_split', 'test_split', 'label_key'))
  logging.info('Quality features: the ViT classifier of %s (checkpoint step %d).', path, int(state.step))
  return sampling.Classifier(cls_exp.graphdef, sharding.on_device(state.params), cls_config.data, path)


def evaluate(config, workdir: str) -> dict[str, float]:
  """--mode=eval: the task's test figures for the latest (or config.eval.step) checkpoint, logged and returned."""
  exp, state = load_trained(config, workdir, config.eval.step)
  step = int(state.step)
  metrics, line = make_evaluator(exp, workdir)(state.params, step)
  logging.info('Checkpoint step %d: %s.', step, line)
  result = {'step': step, **metrics}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'eval.json'), 'w') as f:
      json.dump(result, f)
  return result


def sample(config, workdir: str, num_samples: int = 100) -> str:
  """--mode=sample: image generation writes the class grid and `num_samples` samples of the latest checkpoint;
  language models print `num_samples` samples and write them to a text file."""
  if config_lib.task_name(config) == 'classification':
    raise config_lib.ConfigError(f'--mode=sample needs an image-generation or language config (model.kind dit, '
                                 f'dit_dblock, mdm, mdm_dblock, ar, ar_dblock), not model.kind={config.model.kind!r}')
  exp, state = load_trained(config, workdir, config.eval.step)
  if config_lib.task_name(config) in config_lib.LANGUAGE_TASKS:
    return language.write_samples(exp, workdir, state.params, int(state.step), num_samples, config.seed)
  return sampling.write_samples(sampling.GenerationEvaluator(exp, workdir), state.params, int(state.step),
                                num_samples, config.seed)
