"""Rematerialisation (`model.remat`, core/blocks.run_layers) and the memory planner (tools/memory.py).

Remat must change memory only: every kind's step puts each layer it runs under `jax.checkpoint`, and the loss and
gradients are those without it (to float tolerance). The planner's figures are checked against independent counts
(parameters × 4 bytes, Adam's two moments, a layer's input) and against what must hold (remat keeps fewer
activations of a model whose activations dominate). Every row, and the check against measured peaks, are long
(DIFFBLOCKS_LONG_TESTS=1).
"""

from __future__ import annotations

import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from diffblocks_jax import config as config_lib
from diffblocks_jax import models
from diffblocks_jax.data import input_pipeline
from diffblocks_jax.tasks import registry
from diffblocks_jax.tools import memory
from diffblocks_jax.training import experiment, sharding, train
from helpers import ROOT, shipped_config, subprocess_env, tiny_config



@pytest.fixture(scope='module')
def datasets():
  return {family: input_pipeline.load_dataset(tiny_config(data='text' if family == 'text' else 'digits').data)
          for family in ('image', 'text')}


def data_of(kind):
  return 'text' if registry.kind(kind).data == 'text' else 'digits'


def experiment_of(config, data):
  return experiment.experiment_from_data(config, data, mesh=sharding.make_mesh(config, jax.local_devices()[:1]))


@pytest.mark.slow  # Compiles a step of every kind.
@pytest.mark.parametrize('kind', list(registry.KINDS))
def test_every_kind_rematerialises_each_layer_its_step_runs(kind, datasets):
  """The traced training step (nothing compiled) holds one `jax.checkpoint` per layer it runs: every layer end
  to end, one block's layers block-wise."""
  config = tiny_config(kind, data=data_of(kind), model__remat='dots_saveable')
  exp = experiment_of(config, datasets[registry.kind(kind).data])
  jaxpr = str(jax.make_jaxpr(train.make_train_step(exp))(exp.abstract_state, *memory.step_batch(exp)))
  counts = models.partition_layers(config.model.num_layers, config.model.num_blocks, config.model.layers_per_block)
  expected = max(counts) if registry.kind(kind).blockwise else config.model.num_layers
  if 'recurrent' in config.model:  # Recurrent depth (models/recurrent.py) also runs its prelude and coda layers,
    r = config.model.recurrent     # and 'rd' traces its block twice: the no-gradient unrolls and the last k.
    expected = (expected if registry.kind(kind).blockwise else 2 * expected) + r.prelude_layers + r.coda_layers
  assert jaxpr.count('remat2[') == expected
  assert f'policy={jax.checkpoint_policies.dots_saveable!r}' in jaxpr


@pytest.mark.parametrize('kind', ['vit', 'mdm'])
def test_remat_changes_memory_not_the_loss_or_gradients(kind, datasets):
  """Loss and gradients of the end-to-end loss, each layer rematerialised or not, at random parameters (every
  layer's output matters, none starts at zero): the ViT runs its own layer list with dropout (the keys must
  agree), the masked DiT a `core.blocks.Block` with a condition, a mask and positions (what every other kind
  runs). Both are compiled as one program."""
  data = datasets[registry.kind(kind).data]
  rng = np.random.default_rng(0)
  losses = []
  for policy in ('', 'nothing_saveable'):
    config = tiny_config(kind, data=data_of(kind), model__remat=policy, model__dropout=0.1)
    exp = experiment_of(config, data)
    task = exp.task.make_task(config, data)
    rows = tuple(np.asarray(a[:config.train.batch_size], np.int32 if a.ndim == 1 else a.dtype)
                 for a in data.train_arrays())
    inputs, targets = exp.task.train_batch(jax.random.key(1), rows, config.data)
    losses.append(lambda p, graphdef=exp.graphdef, task=task, inputs=inputs, targets=targets: task.end_to_end_loss(
        nnx.merge(graphdef, p), inputs, targets, jax.random.key(2))[0])
  params = jax.tree.map(lambda a: rng.normal(0, 0.1, a.shape).astype(a.dtype), exp.abstract_state.params)
  both = jax.jit(lambda p: [jax.value_and_grad(loss)(p) for loss in losses])
  (loss, grads), (loss_remat, grads_remat) = both.lower(params).compile(memory.FAST_COMPILE)(params)
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
  chex.assert_trees_all_close(grads_remat, grads, atol=1e-6, rtol=1e-5)
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3  # Gradients that say something.


def test_a_bad_remat_policy_is_refused_by_name():
  config = tiny_config('vit', model__remat='save_everything')
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  [line] = [l for l in str(e.value).splitlines() if 'remat' in l]
  assert "config.model.remat='save_everything' is not one of" in line and 'nothing_saveable' in line


@pytest.mark.parametrize('text, expected', [('80GiB', 80 * 2**30), ('40GB', 40 * 10**9), ('24e9', 24 * 10**9),
                                            ('512 MiB', 512 * 2**20), ('1.5TB', 1.5e12)])
def test_sizes_parse_with_decimal_and_binary_units(text, expected):
  assert memory.parse_size(text) == expected


@pytest.mark.parametrize('text', ['lots', '80 GiBs', '-1GB', '0', ''])
def test_a_size_that_does_not_parse_is_named(text):
  with pytest.raises(ValueError, match='--device_memory=.* is not a memory size'):
    memory.parse_size(text)


def test_bad_device_memory_is_one_line_exit_2_before_any_work(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'diffblocks_jax.tools.memory', '--config=configs/digits_dblock.py',
                           '--device_memory=eighty', f'--json={tmp_path / "plan.json"}'],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: --device_memory='eighty' is not a memory size: write a positive number with a unit, e.g. 80GiB, "
      '40GB, 24e9 (bytes)']
  assert result.stdout == '' and not list(tmp_path.iterdir())  # Nothing planned, nothing written.


def test_paired_kinds_are_the_same_task_and_data():
  for name, k in registry.KINDS.items():
    pair = memory.paired_kinds(name)
    assert pair[k.blockwise] == name
    other = registry.kind(pair[not k.blockwise])
    assert (other.task, other.data, other.blockwise) == (k.task, k.data, not k.blockwise)


def activation_bound_config(num_layers: int = 6):
  """A DiffusionBlocks ViT whose activations dominate its state: 65 tokens of width 32, batch 64, B = 3."""
  return tiny_config('dblock', model__num_layers=num_layers, model__num_blocks=3, model__patch_size=1,
                     model__hidden_size=32, model__mlp_dim=64, train__batch_size=64)


@pytest.mark.slow  # Compiles a step of every kind.
def test_end_to_end_rows_against_independent_counts(datasets):
  """The parameters are 4 bytes each, Adam holds two moments of each, the total holds the state and the
  temporaries, and remat keeps a fraction of the plain step's activations: each layer's input, not its insides
  (65 tokens x 32 channels x batch 64 x 4 bytes, read off the traced step)."""
  config = activation_bound_config()
  e2e, remat = memory.plan(config, rows=memory.ROWS[:2])
  vit = config.copy_and_resolve_references()
  vit.model.kind = 'vit'
  abstract = jax.eval_shape(lambda: models.split(models.build(vit.model, **datasets['image'].model_dims))[1])
  num = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract))
  assert e2e['num_params'] == num and e2e['params_device_bytes'] == 4 * num
  assert 2 * 4 * num <= e2e['optimizer_device_bytes'] <= 2 * 4 * num + 64  # Plus Adam's step count.
  assert e2e['total_bytes'] >= e2e['params_device_bytes'] + e2e['optimizer_device_bytes'] + e2e['temp_bytes']
  assert remat['layer_input_bytes'] == 64 * 65 * 32 * 4
  assert remat['temp_bytes'] < 0.5 * e2e['temp_bytes'] and e2e['ratio'] == 1.0
  assert remat['total_bytes'] - remat['temp_bytes'] == e2e['total_bytes'] - e2e['temp_bytes']  # Same state.


@pytest.mark.long
def test_every_row_against_what_must_hold():
  """Every row of a 12-layer model: a block step (4 of 12 layers) keeps fewer activations than the whole depth's,
  remat fewer still; offload moves the block stacks to host memory; one block job holds one block."""
  records = {r['row']: r for r in memory.plan(activation_bound_config(12))}
  e2e, dblock = records['end to end'], records['DiffusionBlocks']
  assert dblock['temp_bytes'] < 0.6 * e2e['temp_bytes']
  assert records['DiffusionBlocks + remat']['temp_bytes'] < dblock['temp_bytes']
  offload, one = records['DiffusionBlocks + offload'], records['one block job']
  assert offload['host_state_bytes'] > 0 and dblock['host_state_bytes'] == 0
  assert offload['params_device_bytes'] + offload['optimizer_device_bytes'] + offload['host_state_bytes'] == \
      dblock['params_device_bytes'] + dblock['optimizer_device_bytes']
  assert offload['total_bytes'] == dblock['total_bytes'] - offload['host_state_bytes']
  assert one['num_params'] < dblock['num_params'] and one['num_blocks'] == 1
  assert dblock['ratio'] == dblock['total_bytes'] / e2e['total_bytes']


@pytest.mark.long
@pytest.mark.parametrize('name', ['digits_dblock.py', 'digits_dit_dblock.py'])
def test_planner_against_measured_peaks(name):
  """The planned total against the measured peak of one step on this CPU (`memory.measure_peak`, each row in its
  own process): within the error docs/memory.md states."""
  result = subprocess.run([sys.executable, '-m', 'diffblocks_jax.tools.memory', f'--config=configs/{name}',
                           '--measure'], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=3600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  errors = [float(line.rsplit('error', 1)[1].strip(' %')) for line in result.stdout.splitlines()
            if line.startswith('measured')]
  assert errors and all(abs(e) <= memory.MEASURED_ERROR_PERCENT for e in errors), result.stdout


def test_row_configs_keep_what_each_kind_accepts():
  """A weight-tied config's end-to-end rows untie (an end-to-end kind has no blocks); a kind tied by definition
  ('rd_dblock') stays tied in every block-wise row; the counterpart follows the model module ('cnn' for
  'cnn_dblock')."""
  tied = shipped_config('digits_dblock.py', model__weight_tied=True)
  for row in memory.ROWS:
    c = memory.row_config(tied, row)
    config_lib.validate(c)
    assert c.model.weight_tied == row.blockwise
  rd = shipped_config('text_rd_dblock.py', model__weight_tied=False)
  assert all(memory.row_config(rd, row).model.weight_tied for row in memory.ROWS if row.blockwise)
  assert memory.row_config(shipped_config('digits_cnn_dblock.py'), memory.ROWS[0]).model.kind == 'cnn'
