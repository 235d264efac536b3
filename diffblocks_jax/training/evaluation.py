"""--mode=eval and --mode=sample: a trained run's checkpoint scored, or sampled, by its task (tasks/).

Both print only their answer. Neither branches on the task: each task module says how it evaluates
(`make_evaluator`) and what its samples are (`write_samples`).
"""

from __future__ import annotations

import json
import os

import jax

from diffblocks_jax import config as config_lib
from diffblocks_jax.tasks import registry
from diffblocks_jax.training.experiment import load_trained


def evaluate(config, workdir: str) -> tuple[dict[str, float], str]:
  """The task's test figures for the latest (or config.eval.step) checkpoint: (metrics with 'step', one line).

  The figures are also written to WORKDIR/eval.json.
  """
  exp, state = load_trained(config, workdir, config.eval.step)
  step = int(state.step)
  metrics, line = exp.task.make_evaluator(exp, workdir)(state.params, step)
  result = {'step': step, **metrics}
  answer = f'Checkpoint step {step}: {line}.'
  if jax.process_index() == 0:
    path = os.path.join(workdir, 'eval.json')
    try:
      with open(path, 'w') as f:
        json.dump(result, f)
    except OSError as e:  # A read-only or full disk: the answer stands, the file is what is missing.
      answer += f' (Could not write {path}: {os.strerror(e.errno).lower() if e.errno else e}.)'
  return result, answer


def sample(config, workdir: str, num_samples: int = 100) -> str:
  """`num_samples` samples of the latest (or config.eval.step) checkpoint, written by the task; returns the line
  that says where they are."""
  if num_samples < 1:
    raise config_lib.ConfigError(f'--num_samples={num_samples} must be >= 1')
  task = registry.task_module(config.model.kind)
  if not hasattr(task, 'write_samples'):
    able = registry.kinds_where(lambda k: hasattr(registry.task_module_named(k.task), 'write_samples'))
    raise config_lib.ConfigError(f'--mode=sample needs a config whose task draws samples (model.kind in {able}), '
                                 f'not model.kind={config.model.kind!r}')
  exp, state = load_trained(config, workdir, config.eval.step)
  step = int(state.step)
  return f'Checkpoint step {step}: ' + task.write_samples(exp, workdir, state.params, step, num_samples) + '.'
