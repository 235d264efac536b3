"""Held-out next-character bits of a language run's clean path (issue 25, docs/finetune.md).

  python -m diffblocks_jax.tools.clean_path --workdir=workdirs/text_ar_dblock_ft_0.1 [--at_init]

For an autoregressive DiffusionBlocks run, each block's clean half of [clean | noisy] is a causal LM of its own
layers (what `diffusion.clean_ce_weight` trains): its cross-entropy of x_{i+1} given x_{<=i} on the held-out
windows, in bits per character, σ drawn from the block's own range as eval/ce_block{b} draws it. For an
end-to-end run, the same positions (1..L-1) under the plain LM, so the numbers compare. `--at_init`: the
parameters the run started from (its config.train.init_from), not its checkpoint. Prints one JSON line.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from diffblocks_jax import config as config_lib
from diffblocks_jax.tasks import autoregressive, language
from diffblocks_jax.training import experiment, initialisation


def clean_bits(exp, params, key) -> dict[str, float]:
  """{'clean_bpc_block{b}': bits} for a block-wise run, {'clean_bpc': bits} for an end-to-end one."""
  config, tokens = exp.config, exp.data.test_tokens
  if not exp.blockwise:
    nll = jax.jit(lambda p, x: autoregressive.token_nll(nnx.merge(exp.graphdef, p), x)[:, 1:].mean(-1))
    return {'clean_bpc': language.bits_per_char(
        language.mean_over_rows(lambda x, i: nll(params, x), tokens, exp.eval_batch_size), exp.data)}
  task, plan = autoregressive.make_task(config), autoregressive.partition(config)

  def per_block(p, x, k, b):
    model = nnx.merge(exp.graphdef, p)
    level_key, noise_key = jax.random.split(jax.random.fold_in(k, b))
    sigmas, _ = plan.sample(level_key, x.shape[0], block=b)
    z_t = plan.corrupt(noise_key, task.target(model, x, b), sigmas)
    _, clean = model.denoise(x.astype(jnp.int32), z_t, sigmas, b, clean=True)
    return optax.softmax_cross_entropy_with_integer_labels(clean[:, :-1], x[:, 1:].astype(jnp.int32)).mean(-1)

  fn = jax.jit(per_block, static_argnums=3)
  out = {}
  for b in range(plan.num_blocks):
    bits = language.mean_over_rows(lambda x, i: fn(params, x, jax.random.fold_in(key, i), b), tokens,
                                   exp.eval_batch_size)
    out[f'clean_bpc_block{b}'] = language.bits_per_char(bits, exp.data)
  return out


def main(argv):
  del argv
  workdir = flags.FLAGS.workdir
  config = config_lib.load_workdir(workdir)
  if flags.FLAGS.at_init:
    exp = experiment.build_experiment(config)
    params = initialisation.initial_params(config, exp.data)
    if params is None:
      raise SystemExit(f'{workdir}: config.train.init_from is empty; --at_init has nothing to read')
  else:
    exp, state = experiment.load_trained(config, workdir, step=flags.FLAGS.step or None)
    params = state.params
  print(json.dumps({'workdir': workdir, 'at_init': flags.FLAGS.at_init, **clean_bits(exp, params,
                                                                                     jax.random.key(0))}))


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'A trained autoregressive run (end to end or DiffusionBlocks).')
  flags.DEFINE_integer('step', 0, 'Checkpoint step (0 = the latest).')
  flags.DEFINE_bool('at_init', False, "The parameters the run started from (config.train.init_from).")
  flags.mark_flag_as_required('workdir')
  app.run(main)
