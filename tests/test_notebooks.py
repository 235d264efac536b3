"""The notebooks, executed headless against freshly trained tiny workdirs and a tiny benchmark JSON.

Every cell must run without error and the figures must render (`image/png` outputs). One test does all the
classification work, so that `pytest -n 2` does not train the workdirs twice; the benchmark runs in a subprocess
alongside the training and the first notebooks. generate.ipynb has its own test and its own tiny runs (a
classifier and a DiffusionBlocks DiT). The committed notebooks must carry no outputs.
"""

import json
import re
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from diffblocks_jax.training import reporting
from helpers import HANG_GUARD_S, ROOT, cached_env, subprocess_env

NOTEBOOKS = {name: str(ROOT / 'notebooks' / f'{name}.ipynb')
             for name in ('evaluate', 'generate', 'language', 'training_curves')}
CELL_TIMEOUT_S = HANG_GUARD_S

# Both tiny runs in one process (one JAX start-up). Fewer, larger steps than testing.py's defaults: the same
# compiled functions, fewer host round trips; an evaluation every half epoch gives the curves several points.
TINY_DIGITS = '''
import sys
from diffblocks_jax import config as config_lib
from diffblocks_jax.training import train

def tiny_digits(kind, eval_every_epochs):
  config = config_lib.load_file('configs/testing.py:' + kind)
  config.data.source, config.data.name = 'digits', ''  # As the digits configs (a judge's data must match).
  config.data.mean, config.data.std = (0.3,), (0.4,)
  config.model.patch_size = 2
  config.train.num_epochs = 1
  config.train.batch_size = 64
  config.train.steps_per_call = config.train.log_every_steps = 11
  config.train.checkpoint_every_steps = 10**6  # Only the final checkpoint.
  config.train.eval_every_epochs = eval_every_epochs
  config.eval.batch_size = 120
  return config
'''
TRAIN_SCRIPT = TINY_DIGITS + '''
for kind, workdir in zip(('dblock', 'vit'), sys.argv[1:]):
  train.train_and_evaluate(tiny_digits(kind, 0.5), workdir)
'''


def check_process(args, log_path, env, *, timeout, proc=None):
  """Runs (or waits for) a subprocess; on failure, raises with the tail of its log."""
  if proc is None:
    with open(log_path, 'w') as log:
      rc = subprocess.run(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                          timeout=timeout).returncode
  else:
    rc = proc.wait(timeout=timeout)
  if rc:
    with open(log_path) as f:
      raise AssertionError(f'{" ".join(args)} exited with {rc}:\n{f.read()[-4000:]}')


def execute(name: str, env: dict[str, str], **extra) -> nbformat.NotebookNode:
  """Runs every cell in a fresh kernel (cwd = repository root); raises CellExecutionError on any error."""
  nb = nbformat.read(NOTEBOOKS[name], as_version=4)
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                          resources={'metadata': {'path': str(ROOT)}})
  client.execute(env={**env, **extra})
  return nb


def outputs(nb):
  return [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs]


def num_figures(nb) -> int:
  return sum('image/png' in o.get('data', {}) for o in outputs(nb))


def text(nb) -> str:
  return '\n'.join(o.get('text', '') or o.get('data', {}).get('text/plain', '') for o in outputs(nb))


@pytest.mark.long  # Time budget: opt-in with the other notebooks.
@pytest.mark.slow
def test_notebooks_execute_and_draw(tmp_path):
  # One persistent XLA cache for training and the kernels: the notebooks' evaluation at the run's own settings
  # finds what training's evaluation compiled. (Not for the benchmark: it times compiles.)
  bench_env = subprocess_env()
  env = cached_env(tmp_path / 'xla_cache')
  dblock, vit = str(tmp_path / 'dblock'), str(tmp_path / 'vit')
  bench_json, bench_log = str(tmp_path / 'bench.json'), str(tmp_path / 'bench.log')
  bench_args = [sys.executable, '-m', 'diffblocks_jax.tools.bench', '--suite=tiny', f'--json={bench_json}',
                '--windows=1', '--steps_per_window=1']
  with open(bench_log, 'w') as log:
    bench = subprocess.Popen(bench_args, cwd=ROOT, env=bench_env, stdout=log, stderr=subprocess.STDOUT)
  try:
    check_process([sys.executable, '-c', TRAIN_SCRIPT, dblock, vit], str(tmp_path / 'train.log'), env, timeout=HANG_GUARD_S)
    for workdir in (dblock, vit):
      assert any('eval/accuracy' in r for r in reporting.read_metrics(workdir)), workdir

    # evaluate.ipynb on DiffusionBlocks: step sweep, guidance sweep, per-class, confusion, trajectory, blocks
    # across noise levels.
    nb = execute('evaluate', env, DIFFBLOCKS_WORKDIR=dblock)
    assert num_figures(nb) >= 6, text(nb)
    # The notebook scores the split exactly as training's last evaluation did.
    logged = [r['eval/accuracy'] for r in reporting.read_metrics(dblock) if 'eval/accuracy' in r][-1]
    shown = re.search(r'Test accuracy: ([0-9.]+) on (\d+) images', text(nb))
    assert shown, text(nb)
    assert abs(float(shown.group(1)) - logged) <= 1 / int(shown.group(2)), (shown.group(0), logged)
    assert re.search(r'N=8: [0-9.]+', text(nb)) and re.search(r's=3.0: [0-9.]+', text(nb)), text(nb)
    assert re.search(r'block 1: σ=0.002: [0-9.]+, ', text(nb)), text(nb)

    # evaluate.ipynb on the baseline: the diffusion-only cells say why they do nothing.
    nb = execute('evaluate', env, DIFFBLOCKS_WORKDIR=vit)
    assert num_figures(nb) >= 2, text(nb)  # Per-class accuracy and confusion matrix.
    assert text(nb).count('Baseline ViT:') == 4, text(nb)

    check_process(bench_args, bench_log, bench_env, timeout=HANG_GUARD_S, proc=bench)
    with open(bench_json) as f:
      assert json.load(f), 'the benchmark wrote no records'
    nb = execute('training_curves', env, DIFFBLOCKS_WORKDIRS=f'{vit},{dblock}', DIFFBLOCKS_BENCH_JSON=bench_json)
  finally:
    if bench.poll() is None:
      bench.kill()
      bench.wait()
  assert 'final test accuracy' in text(nb), text(nb)
  assert num_figures(nb) >= 3, text(nb)  # Curves, throughput, memory.


# A tiny ViT classifier (the quality figures' features) and a tiny DiffusionBlocks DiT scored with it, in one
# process. The DiT's epoch counts scale by B (3 epochs, 66 steps); an evaluation every half epoch (6), each
# drawing the class grid and eval.num_samples samples and scoring them.
GENERATE_TRAIN_SCRIPT = TINY_DIGITS + '''
classifier_workdir, dit_workdir = sys.argv[1:]
train.train_and_evaluate(tiny_digits('vit', 0.0), classifier_workdir)  # Evaluated only at the end.

config = config_lib.load_file('configs/digits_dit_dblock.py')
config.model.hidden_size, config.model.num_heads, config.model.num_layers = 16, 2, 3  # One layer per block.
config.model.mlp_dim = 32
config.train.num_epochs = 1
config.train.batch_size = 64
config.train.steps_per_call = config.train.log_every_steps = 11
config.train.checkpoint_every_steps = 10**6
config.train.eval_every_epochs = 0.5
config.eval.num_inference_steps = 4
config.eval.num_samples = config.eval.batch_size = 40
config.eval.classifier_workdir = classifier_workdir
train.train_and_evaluate(config, dit_workdir)
'''


@pytest.mark.slow
@pytest.mark.long  # Opt-in: the default suite runs the classification notebooks (time budget).
def test_generate_notebook_executes_and_draws(tmp_path):
  env = cached_env(tmp_path / 'xla_cache')
  classifier, dit = str(tmp_path / 'vit'), str(tmp_path / 'dit_dblock')
  check_process([sys.executable, '-c', GENERATE_TRAIN_SCRIPT, classifier, dit], str(tmp_path / 'train.log'), env,
                timeout=HANG_GUARD_S)
  evaluated = [r['step'] for r in reporting.read_metrics(dit) if 'eval/fd' in r]
  assert evaluated, reporting.read_metrics(dit)

  # The sweeps at the run's own batch (40 samples, one batch) and around its settings (N=4, s=2): the sampler
  # and classifier compiles of training's evaluation come from the cache.
  nb = execute('generate', env, DIFFBLOCKS_WORKDIR=dit, DIFFBLOCKS_PER_CLASS='4', DIFFBLOCKS_NUM_SWEEP_SAMPLES='40',
               DIFFBLOCKS_CFG_SCALES='1,2', DIFFBLOCKS_STEP_COUNTS='2,4')
  # Class grid, trajectory, two figures per sweep (grids, scores), the training curves.
  assert num_figures(nb) >= 5, text(nb)
  for pattern in (r's=1\.0: accuracy [0-9.]+, FD [0-9.]+', r's=2\.0: accuracy [0-9.]+',
                  r'N=2: accuracy [0-9.]+, FD [0-9.]+', r'N=4: accuracy [0-9.]+', r'block 2: steps '):
    assert re.search(pattern, text(nb)), (pattern, text(nb))
  assert f'last evaluation (step {evaluated[-1]})' in text(nb), text(nb)  # The curves read the run's metrics.


# Two tiny masked-diffusion runs on the first 12k characters of the CPython corpus, in one process: 675 training
# windows of 16 (5 steps of 128 per epoch; x B = 3 for DiffusionBlocks, a layer per block), 75 held out; an
# evaluation every half epoch (the bound, its per-block terms, 2 samples).
LANGUAGE_TRAIN_SCRIPT = '''
import sys
from diffblocks_jax import config as config_lib
from diffblocks_jax.training import train
from diffblocks_jax.data import text

corpus, workdirs = sys.argv[1], sys.argv[2:]
with open(corpus, 'w', encoding='utf-8') as f:
  f.write(text.pydoc_text()[:12_000])
for name, workdir in zip(('text_mdm', 'text_mdm_dblock'), workdirs):
  config = config_lib.load_file(f'configs/{name}.py')
  config.data.source, config.data.path, config.data.seq_len, config.data.test_fraction = 'text', corpus, 16, 0.1
  config.model.hidden_size, config.model.num_heads, config.model.num_layers = 16, 2, 3
  config.train.batch_size, config.train.num_epochs, config.train.eval_every_epochs = 128, 1, 0.5
  config.train.steps_per_call = config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 10**6  # Only the final checkpoint.
  config.eval.num_samples, config.eval.elbo_draws = 2, 1
  train.train_and_evaluate(config, workdir)
'''


@pytest.mark.slow
@pytest.mark.long  # Opt-in: the default suite runs the classification notebooks (time budget).
def test_language_notebook(tmp_path):
  env = cached_env(tmp_path / 'xla_cache')
  mdm, dblock = str(tmp_path / 'text_mdm'), str(tmp_path / 'text_mdm_dblock')
  check_process([sys.executable, '-c', LANGUAGE_TRAIN_SCRIPT, str(tmp_path / 'corpus.txt'), mdm, dblock],
                str(tmp_path / 'train.log'), env, timeout=HANG_GUARD_S)
  logged = {w: [r for r in reporting.read_metrics(w) if 'eval/bpc' in r][-1] for w in (mdm, dblock)}
  assert 'eval/bpc_block2' in logged[dblock], logged

  # The samples' batch (2) is the run's own: the sampler's compile comes from the cache.
  nb = execute('language', env, DIFFBLOCKS_WORKDIRS=f'{mdm},{dblock}', DIFFBLOCKS_T_POINTS='6',
               DIFFBLOCKS_HELDOUT='16', DIFFBLOCKS_NUM_SAMPLES='2')
  assert all(cell.execution_count for cell in nb.cells if cell.cell_type == 'code'), text(nb)
  assert num_figures(nb) >= 3, text(nb)  # The bound across t, the per-block terms, the training curves.
  for workdir, name in ((mdm, 'text_mdm'), (dblock, 'text_mdm_dblock')):
    # The curve's area over 6 values of t, and the legend's eval/bpc as logged.
    assert re.search(rf'{name} \([a-z_]+\): area under the curve [0-9.]+ bits per character \(6 points, 16 held-out '
                     rf'windows\); eval/bpc logged {logged[workdir]["eval/bpc"]:.4f}', text(nb)), text(nb)
    assert re.search(rf'{name} \([a-z_]+\): 2 samples, mean entropy [0-9.]+ bits', text(nb)), text(nb)
  terms = ', '.join(f'block {b} {logged[dblock][f"eval/bpc_block{b}"]:.4f}' for b in range(3))
  assert f'text_mdm_dblock (mdm_dblock) (logged, bits per character): {terms}' in text(nb), text(nb)
  assert re.search(r'text_mdm \(mdm\) \(from its curve, bits per character\): block 0 [0-9.]+', text(nb)), text(nb)


# The judge (an end-to-end 'ar' run) and the two recurrent-depth runs, tiny, on the first 12k characters of the
# CPython corpus; their configs are the shipped ones with hidden 16 and one epoch of batches of 128.
DEPTH_TRAIN_SCRIPT = '''
import sys
from diffblocks_jax import config as config_lib
from diffblocks_jax.training import train
from diffblocks_jax.data import text

corpus, judge, *workdirs = sys.argv[1:]
with open(corpus, 'w', encoding='utf-8') as f:
  f.write(text.pydoc_text()[:12_000])
for name, workdir in zip(('text_ar', 'text_rd', 'text_rd_dblock'), (judge, *workdirs)):
  config = config_lib.load_file(f'configs/{name}.py')
  config.data.source, config.data.path, config.data.seq_len, config.data.test_fraction = 'text', corpus, 16, 0.1
  config.model.hidden_size, config.model.num_heads = 16, 2
  if name == 'text_ar':
    config.model.num_layers = 2
  config.train.batch_size, config.train.num_epochs, config.train.eval_every_epochs = 128, 1, 0.0
  config.train.steps_per_call = config.train.log_every_steps = 1
  config.eval.num_samples, config.eval.scorer_workdir = 2, '' if name == 'text_ar' else judge
  train.train_and_evaluate(config, workdir)
'''


@pytest.mark.slow
@pytest.mark.long  # Opt-in, as the other language notebook test.
def test_language_notebook_depth_curve(tmp_path):
  """The depth curve of both recurrent-depth kinds: each scored by its judge at N = 1, 2, 4, and drawn."""
  env = cached_env(tmp_path / 'xla_cache')
  judge, rd, rd_dblock = (str(tmp_path / name) for name in ('text_ar', 'text_rd', 'text_rd_dblock'))
  check_process([sys.executable, '-c', DEPTH_TRAIN_SCRIPT, str(tmp_path / 'corpus.txt'), judge, rd, rd_dblock],
                str(tmp_path / 'train.log'), env, timeout=HANG_GUARD_S)
  nb = execute('language', env, DIFFBLOCKS_WORKDIRS=f'{rd},{rd_dblock}', DIFFBLOCKS_DEPTHS='1,2,4',
               DIFFBLOCKS_DEPTH_SAMPLES='2', DIFFBLOCKS_HELDOUT='16', DIFFBLOCKS_NUM_SAMPLES='2')
  assert all(cell.execution_count for cell in nb.cells if cell.cell_type == 'code'), text(nb)
  assert num_figures(nb) >= 3, text(nb)  # The per-block terms, the depth curve, the training curves.
  for name, kind in (('text_rd', 'rd'), ('text_rd_dblock', 'rd_dblock')):
    for depth in (1, 2, 4):
      assert re.search(rf'{name} \({kind}\): depth {depth}: gen_ppl [0-9.]+, sample entropy [0-9.]+ bits '
                       r'\(2 samples\)', text(nb)), text(nb)


@pytest.mark.parametrize('name', sorted(NOTEBOOKS))
def test_committed_notebooks_have_no_outputs(name):
  nb = nbformat.read(NOTEBOOKS[name], as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, (name, cell.source[:80])
      assert 'execution' not in cell.metadata, (name, cell.source[:80])
