"""The launchers (launch/*.sh): their syntax, their usage line, and the commands local_blocks.sh runs.

The command lines are read with a stand-in for Python (`PYTHON=` a script that writes its arguments down), so
the quick tier checks what each block job and the merge are asked to do without training; the launcher driving
real runs end to end is a long test.
"""

from __future__ import annotations

import os
import pathlib
import stat
import subprocess
import sys

import pytest
from helpers import HANG_GUARD_S, ROOT, subprocess_env

LAUNCHERS = sorted((ROOT / 'launch').glob('*.sh'))


@pytest.mark.parametrize('script', LAUNCHERS, ids=lambda p: p.name)
def test_the_launchers_parse(script):
  result = subprocess.run(['bash', '-n', str(script)], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize('name', ['local_blocks.sh', 'slurm_blocks.sh'])
def test_without_arguments_a_block_launcher_prints_its_usage(name):
  result = subprocess.run(['bash', str(ROOT / 'launch' / name)], capture_output=True, text=True, check=False)
  assert result.returncode == 2
  assert f'launch/{name} B CONFIG WORKDIR' in result.stderr


def stand_in_python(tmp_path: pathlib.Path) -> pathlib.Path:
  """A 'python' that appends its arguments (one line per call, NUL-separated) to calls.txt and succeeds."""
  script = tmp_path / 'python'
  script.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@" >> "$(dirname "$0")/calls.txt"\necho >> '
                    '"$(dirname "$0")/calls.txt"\n')
  script.chmod(script.stat().st_mode | stat.S_IXUSR)
  return script


def calls(tmp_path: pathlib.Path) -> list[list[str]]:
  lines = (tmp_path / 'calls.txt').read_text().split('\n')
  return [line.rstrip('\0').split('\0') for line in lines if line]


@pytest.mark.parametrize('shared_from', ['', 'W/source'])
def test_local_blocks_runs_one_job_per_block_then_the_merge(tmp_path, shared_from):
  env = dict(os.environ, PYTHON=str(stand_in_python(tmp_path)), SHARED_FROM=shared_from)
  work = tmp_path / 'W'
  result = subprocess.run(['bash', str(ROOT / 'launch/local_blocks.sh'), '3', 'configs/digits_dblock.py', str(work),
                           '--config.train.num_epochs=2'], env=env, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  jobs, merge = calls(tmp_path)[:3], calls(tmp_path)[3]
  ways = (['--config.train.init_from=W/source', '--config.train.freeze_shared=True'] if shared_from
          else ['--config.model.independent_blocks=True'])
  for b, job in enumerate(jobs):
    assert job[:3] == ['-m', 'diffblocks_jax.main', '--config=configs/digits_dblock.py']
    assert set(job[3:]) == {f'--workdir={work}/block{b}', *ways, '--config.parallel_blocks=True',
                            f'--config.train.blocks={b}', '--config.train.num_epochs=2'}, job
  assert merge == ['-m', 'diffblocks_jax.main', '--mode=merge', f'--workdir={work}/merged',
                   f'--from={work}/block0,{work}/block1,{work}/block2']


@pytest.mark.slow
@pytest.mark.long  # Four CLI runs and the merge (test_local_blocks_runs_one_job_per_block_then_the_merge: the calls).
def test_local_blocks_trains_and_merges_a_run(tmp_path):
  """The launcher with the real interpreter, blocks sharing outer parts frozen from a source run: the merged run
  evaluates."""
  small = ['--config.model.num_layers=3', '--config.model.hidden_size=24', '--config.model.mlp_dim=32',
           '--config.train.num_epochs=1', '--config.train.batch_size=128', '--config.eval.batch_size=360']
  env = subprocess_env(PYTHON=str(pathlib.Path(sys.executable)))
  run = lambda *args, **kw: subprocess.run(list(args), cwd=ROOT, env=dict(env, **kw), capture_output=True, text=True,
                                           timeout=HANG_GUARD_S, check=False)
  source = tmp_path / 'source'
  result = run(sys.executable, '-m', 'diffblocks_jax.main', '--config=configs/digits_dblock.py',
               f'--workdir={source}', *small)
  assert result.returncode == 0, result.stderr[-3000:]
  result = run('bash', 'launch/local_blocks.sh', '3', 'configs/digits_dblock.py', str(tmp_path / 'W'), *small,
               SHARED_FROM=str(source))
  assert result.returncode == 0, result.stderr[-3000:]
  result = run(sys.executable, '-m', 'diffblocks_jax.main', '--mode=eval', f'--workdir={tmp_path / "W/merged"}')
  assert result.returncode == 0 and 'accuracy' in result.stdout + result.stderr, result.stderr[-3000:]
