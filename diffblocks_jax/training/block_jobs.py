"""One job per block (docs/block_jobs.md): a run that trains some blocks only, and the merge of such runs.

A block job (`config.train.blocks=(b, ...)`) is the block-parallel run (`config.parallel_blocks`) restricted to its
blocks: the same step, the same per-block random streams (block b's draws are folded with b, its data order with
b), its rows of the block stacks only. Its checkpoint is the full run's with those rows, so a set of jobs that owns
every block once is the full run cut by rows, and `merge` puts the rows back together.

The merge reads every source's config and checkpoint manifest and refuses (ConfigError, one line, nothing written)
before reading any array: configs that differ beyond `train.blocks`, a block owned twice or by no job, jobs at
different steps. Then it stacks the rows in block order, checks that everything outside the stacks (step, random
key) is the same bits in every job, and writes OUT as a run of the full config that evaluates, samples and resumes
like any other.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from diffblocks_jax import config as config_lib
from diffblocks_jax.training import checkpointing, locking

PyTree = dict

MERGE_HINT = 'python -m diffblocks_jax.main --mode=merge --workdir=OUT --from=W0,W1,... (docs/block_jobs.md)'
# The leaves that hold one row per block (params and Adam state, stacked layout); everything else is shared.
_STACKS = ('params/blocks/', 'opt_state/blocks/')


def rows(params: PyTree, owned: tuple[int, ...]) -> PyTree:
  """`params` (stacked, independent blocks) with only the rows `owned` of its block stacks. Static slices: under
  jit, XLA never computes the other rows."""
  take = lambda x: jax.numpy.concatenate([x[b:b + 1] for b in owned])
  return dict(params, blocks=jax.tree.map(take, params['blocks']))


def _error(message: str) -> config_lib.ConfigError:
  return config_lib.ConfigError(f'--mode=merge: {message}')


class _Source:
  """One block job: its workdir, config, blocks, latest step and manifest (read, never written)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    if not os.path.isdir(workdir):
      raise _error(f'--from names {workdir}, which does not exist (or is not a folder)')
    try:
      self.saved = config_lib.read_saved(workdir)
    except FileNotFoundError as e:
      raise _error(str(e)) from None
    self.config = config_lib.load_workdir(workdir)
    self.blocks = tuple(sorted(self.config.train.blocks))
    if not self.blocks:
      raise _error(f'{workdir} is not a block job (its config.train.blocks is ()): merge the workdirs of runs '
                   'started with --config.train.blocks=...')
    directory = os.path.join(workdir, 'checkpoints')
    steps = []
    if os.path.isdir(directory):
      with checkpointing.Checkpointer(directory, keep=None) as ckpt:
        steps = ckpt.all_steps()
        if steps:
          self.step = steps[-1]
          self.manifest = ckpt.manifest(self.step)['leaves']
          self.metadata = ckpt.metadata(self.step) or {}
    if not steps:
      raise _error(f'{workdir} holds no checkpoint: train it first (run its command again)')
    owned = self.metadata.get('blocks')
    if owned is not None and tuple(sorted(owned)) != self.blocks:
      raise _error(f'{workdir}: its checkpoint step {self.step} owns blocks {tuple(owned)} but its config.json says '
                   f'{self.blocks}')

  def restore(self, device) -> dict:
    """The latest checkpoint's state dict ('params/blocks/...' paths as nested dicts), on `device`."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    target = _nest({k: jax.ShapeDtypeStruct(tuple(v['shape']), np.dtype(v['dtype']), sharding=sharding)
                    for k, v in self.manifest.items()})
    with checkpointing.Checkpointer(os.path.join(self.workdir, 'checkpoints'), keep=None) as ckpt:
      return ckpt.restore(target, step=self.step)[0]


def _nest(flat: dict) -> dict:
  out = {}
  for path, leaf in flat.items():
    *parents, name = path.split('/')
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = leaf
  return out


def _flat(tree, prefix: str = '') -> dict:
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  return {k: v for name, sub in tree.items() for k, v in _flat(sub, f'{prefix}{name}/').items()}


def plan(workdir: str, sources: list[str]) -> tuple[list[_Source], dict[int, _Source]]:
  """(sources, owner of each block), after every check that needs no array; ConfigError otherwise."""
  if not sources or not all(sources):
    raise _error('--from names no workdir: pass the block jobs\' workdirs, --from=W0,W1,...')
  absolute = [os.path.abspath(s) for s in sources]
  repeated = sorted({s for s in sources if absolute.count(os.path.abspath(s)) > 1})
  if repeated:
    raise _error(f'--from names {", ".join(repeated)} twice: name each block job once')
  if os.path.abspath(workdir) in absolute:
    raise _error(f'--workdir={workdir} is one of the --from workdirs: write the merged run to a new folder')
  if os.path.exists(os.path.join(workdir, 'config.json')) or os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise _error(f'--workdir={workdir} already holds a run: pass a new (or empty) folder for the merged run')
  jobs = [_Source(s) for s in sources]
  first = jobs[0]
  for job in jobs[1:]:
    saved = json.loads(json.dumps(job.saved))
    saved['train']['blocks'] = list(first.config.train.blocks)
    changed = config_lib.changed_fields(saved, first.config)
    if changed:
      raise _error(f'{job.workdir} and {first.workdir} were trained with different configs ('
                   + '; '.join(c.replace(' -> ', ' vs ') for c in changed)
                   + '): block jobs differ in config.train.blocks only')
  num_blocks = config_lib.num_blocks(first.config)
  owner: dict[int, _Source] = {}
  for job in jobs:
    for b in job.blocks:
      if b in owner:
        raise _error(f'block {b} is owned by both {owner[b].workdir} and {job.workdir}: each block must come from '
                     'one job')
      owner[b] = job
  missing = tuple(b for b in range(num_blocks) if b not in owner)
  if missing:
    raise _error(f'blocks {missing} of B={num_blocks} are owned by no --from workdir: train them '
                 f'(--config.train.blocks={",".join(map(str, missing))}) and merge again')
  steps = {job.workdir: job.step for job in jobs}
  if len(set(steps.values())) > 1:
    raise _error('the jobs are at different steps (' + ', '.join(f'{w} at {s}' for w, s in steps.items())
                 + '): finish each (run its command again) before merging')
  for job in jobs:
    paths = set(job.manifest)
    if paths != set(first.manifest) or any(job.manifest[k]['shape'][0] != len(job.blocks)
                                           for k in paths if k.startswith(_STACKS)):
      raise _error(f'{job.workdir}: its checkpoint does not hold the layout of its config (one row per owned block '
                   'of stacked, independent blocks)')
  return jobs, owner


def merge(workdir: str, sources: list[str]) -> str:
  """Writes the block jobs in `sources` as one run in `workdir`; returns the line that says what it wrote."""
  jobs, owner = plan(workdir, sources)
  device = jax.local_devices(backend='cpu')[0]  # The merge needs no accelerator memory.
  states = {job.workdir: _flat(job.restore(device)) for job in jobs}
  first = jobs[0]
  merged = {}
  for path in first.manifest:
    if path.startswith(_STACKS):
      merged[path] = np.concatenate([np.asarray(states[owner[b].workdir][path])[owner[b].blocks.index(b)][None]
                                     for b in sorted(owner)])
      continue
    ref = np.asarray(states[first.workdir][path])
    for job in jobs[1:]:
      if np.asarray(states[job.workdir][path]).tobytes() != ref.tobytes():
        raise _error(f'{path} differs between {first.workdir} and {job.workdir} (a part every job holds must be the '
                     'same): were they started with the same seed and code?')
    merged[path] = ref
  config = json.loads(json.dumps(first.saved))
  config['train']['blocks'] = []  # The full run: every block.
  state = _nest({k: jax.device_put(v, device) for k, v in merged.items()})
  metadata = {k: v for k, v in first.metadata.items() if k != 'blocks'}
  metadata['merged_from'] = {str(b): os.path.abspath(owner[b].workdir) for b in sorted(owner)}
  with locking.WorkdirLock(workdir):
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(config, f, indent=2)
    with checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=None) as ckpt:
      ckpt.save(first.step, state, metadata=metadata, config=config, force=True)
  return (f'Merged blocks {tuple(sorted(owner))} at step {first.step} from '
          + ', '.join(f'{job.workdir} {job.blocks}' for job in jobs)
          + f' into {workdir}: evaluate it with --mode=eval --workdir={workdir}')
