"""Checkpointer: exact round trips, keep-last-N, and falling back past damaged checkpoints."""

import logging
import os
import pathlib
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffblocks_jax.core import optim, steps
from diffblocks_jax.training.checkpointing import Checkpointer, CheckpointError

# After a failed read, TensorStore callbacks can land on Orbax's closed event loop ("Event loop is
# closed"): noise from the damaged-checkpoint tests, not a failure.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


def make_state(seed: int) -> steps.TrainState:
  """Like a real DiffusionBlocks state: int block keys, AdamState groups, raw uint32 key, int32 step."""
  k = jax.random.split(jax.random.key(seed), 3)
  params = {'blocks': {0: {'w': jax.random.normal(k[0], (64, 64))},
                       1: {'w': jax.random.normal(k[1], (64, 64)), 'b': jnp.full((3,), seed, jnp.float32)}},
            'shared': {'emb': jax.random.normal(k[2], (5, 8)).astype(jnp.bfloat16)}}
  state = steps.init_state(params, seed)
  opt = dict(state.opt_state, shared=state.opt_state['shared'].replace(count=jnp.int32(seed)))
  return state.replace(step=jnp.int32(10 * seed), opt_state=opt)


def abstract(state, sharding=None):
  """What the training loop passes: ShapeDtypeStructs carrying the shardings to restore onto."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding),
                      state)


def save_steps(directory, seeds, **kw) -> None:
  with Checkpointer(directory, **kw) as ckpt:
    for s in seeds:
      assert ckpt.save(s, make_state(s), force=True)


def state_files(directory, step: int) -> list[pathlib.Path]:
  return sorted(p for p in (pathlib.Path(directory) / str(step) / 'state').rglob('*') if p.is_file())


def test_round_trip_is_exact(tmp_path):
  state = make_state(3)
  save_steps(tmp_path, [3])
  with Checkpointer(tmp_path) as ckpt:
    restored, step = ckpt.restore(abstract(state))
  assert step == 3
  chex.assert_trees_all_equal(restored, state)  # Also checks the tree structure: int keys, dataclasses.
  assert list(restored.params['blocks']) == [0, 1]
  assert isinstance(restored.opt_state['blocks'][1], optim.AdamState)
  assert restored.rng.dtype == jnp.uint32 and restored.step.dtype == jnp.int32
  assert restored.params['shared']['emb'].dtype == jnp.bfloat16


def test_keeps_the_last_n(tmp_path):
  with Checkpointer(tmp_path, keep=2, async_save=False) as ckpt:
    for s in range(1, 5):
      ckpt.save(s, make_state(s))
    assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ['3', '4']


def test_no_checkpoint(tmp_path):
  with Checkpointer(tmp_path / 'checkpoints') as ckpt:
    assert ckpt.restore(abstract(make_state(1))) is None
    assert ckpt.metadata() is None and ckpt.latest_step() is None and ckpt.all_steps() == []
  assert (tmp_path / 'checkpoints').is_dir()


def truncate(files):
  for p in [p for p in files if p.parent.name == 'd']:  # The array data (OCDBT) files.
    with open(p, 'r+b') as f:
      f.truncate(os.path.getsize(p) // 2)


def garble(files):
  # Flips bytes mid-file in the largest file (the 64x64 arrays' raw chunks): every read still succeeds,
  # so only the manifest's fingerprints can tell.
  p = max(files, key=os.path.getsize)
  with open(p, 'r+b') as f:
    f.seek(os.path.getsize(p) // 2)
    data = f.read(16)
    f.seek(os.path.getsize(p) // 2)
    f.write(bytes(255 - b for b in data))


def delete_one(files):
  os.remove(max(files, key=os.path.getsize))


def delete_item(files):
  shutil.rmtree(next(p for p in files[0].parents if p.name == 'state'))


@pytest.mark.parametrize('damage', [truncate, garble, delete_one, delete_item])
def test_damaged_latest_falls_back_to_previous(tmp_path, caplog, damage):
  save_steps(tmp_path, [1, 2])
  damage(state_files(tmp_path, 2))
  with caplog.at_level(logging.WARNING), Checkpointer(tmp_path) as ckpt:
    restored, step = ckpt.restore(abstract(make_state(1)))
  assert step == 1
  chex.assert_trees_all_equal(restored, make_state(1))
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(str(tmp_path / '2') in w and 'unreadable' in w for w in warnings), warnings
  assert (tmp_path / '2').is_dir()  # Never deleted.


def test_named_damaged_step_raises(tmp_path):
  save_steps(tmp_path, [1, 2])
  truncate(state_files(tmp_path, 1))
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError, match=f'{tmp_path / "1"} is unreadable'):
      ckpt.restore(abstract(make_state(1)), step=1)


def test_named_missing_step_lists_available(tmp_path):
  save_steps(tmp_path, [1, 2])
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError, match=r'available steps: \[1, 2\]') as e:
      ckpt.restore(abstract(make_state(1)), step=7)
  assert isinstance(e.value, ValueError)


def test_all_damaged_raises(tmp_path):
  save_steps(tmp_path, [1, 2])
  for s in (1, 2):
    truncate(state_files(tmp_path, s))
  with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointError, match='No readable checkpoint'):
    ckpt.restore(abstract(make_state(1)))


def test_wrong_model_is_a_clear_error_not_damage(tmp_path):
  save_steps(tmp_path, [1, 2])
  other = make_state(1)
  other = other.replace(params={**other.params, 'shared': {'emb': jnp.zeros((6, 8), jnp.bfloat16)}})
  with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointError, match=r'params/shared/emb: .*\(5, 8\)'):
    ckpt.restore(abstract(other))


def test_interrupted_save_is_ignored(tmp_path):
  # A killed save leaves Orbax's temporary directory: it must never be taken for a checkpoint.
  save_steps(tmp_path, [1, 2])
  shutil.copytree(tmp_path / '2', tmp_path / '3.orbax-checkpoint-tmp-1700000000000000')
  truncate(state_files(tmp_path, '3.orbax-checkpoint-tmp-1700000000000000'))
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.restore(abstract(make_state(2)))[1] == 2


def test_saving_over_a_damaged_step_sets_it_aside(tmp_path):
  save_steps(tmp_path, [1, 2])
  truncate(state_files(tmp_path, 2))
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.restore(abstract(make_state(1)))[1] == 1
    ckpt.save(2, make_state(5), force=True)  # The resumed run reaches step 2 again.
    ckpt.wait()
    restored, step = ckpt.restore(abstract(make_state(1)))
  assert step == 2
  chex.assert_trees_all_equal(restored, make_state(5))
  assert len(list(tmp_path.glob('2.unreadable-*'))) == 1


def test_metadata_round_trip(tmp_path):
  meta = {'epoch': 1.5, 'config': {'model': {'kind': 'dblock', 'num_blocks': 4}}, 'tags': ['a', 'b']}
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, make_state(1), metadata=meta)
    ckpt.save(2, make_state(2))
    assert ckpt.metadata(1) == meta
    assert ckpt.metadata() is None  # Step 2 has none.
    with pytest.raises(CheckpointError, match='available steps'):
      ckpt.metadata(3)


def test_restore_onto_named_sharding(tmp_path):
  state = make_state(2)
  save_steps(tmp_path, [2])
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('data',))
  sharding = NamedSharding(mesh, P())
  with Checkpointer(tmp_path) as ckpt:
    restored, _ = ckpt.restore(abstract(state, sharding))
  chex.assert_trees_all_equal(restored, state)
  assert all(x.sharding == sharding for x in jax.tree.leaves(restored))
