"""Text data: the pydoc corpus, a UTF-8 file and TFDS text datasets as windows; vocabularies, errors, sharding."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from diffblocks_jax.data import text
from diffblocks_jax.data.dataset import DataError
from helpers import HANG_GUARD_S, ROOT, tiny_config

SAMPLE = 'Temperature: 20 °C — about 68 °F.\nÉté, naïve café; 東京.\n' * 40  # Non-ASCII, multi-byte UTF-8.


def _data_config(**fields):
  """The data section of a tiny text config (the pydoc corpus), `fields` set."""
  return tiny_config('ar', data='text', **{f'data__{k}': v for k, v in fields.items()}).data


def _write(tmp_path, content: str | bytes, name: str = 'corpus.txt') -> str:
  path = tmp_path / name
  if isinstance(content, str):
    path.write_text(content, encoding='utf-8')
  else:
    path.write_bytes(content)
  return str(path)


# ----------------------------------------------------------------------------------------------------- pydoc

def test_pydoc_char_windows_vocab_and_members():
  corpus = text.pydoc_text()
  assert corpus == text.pydoc_text()  # Deterministic: topics joined in sorted order.
  data = text.load_text(_data_config(seq_len=64))
  assert data.vocab == tuple(sorted(set(corpus)))
  if sys.version_info[:2] == (3, 11):  # The corpus is CPython's own docs: its characters vary by version.
    assert data.vocab_size == 103
  assert data.name == 'pydoc' and data.seq_len == 64
  assert data.train_tokens.dtype == np.uint8 and data.test_tokens.dtype == np.uint8
  assert data.train_tokens.ndim == 2 and data.train_tokens.shape[1] == 64 and data.test_tokens.shape[1] == 64
  num_test = round(len(corpus) * 0.1)
  assert data.num_train == (len(corpus) - num_test) // 64
  assert len(data.test_tokens) == num_test // 64
  assert data.model_dims == {'vocab_size': data.vocab_size, 'seq_len': 64}
  (train,) = data.train_arrays()
  assert train is data.train_tokens


def test_train_is_the_head_and_test_the_tail():
  corpus = text.pydoc_text()
  seq_len, fraction = 50, 0.2
  for vocab in ('char', 'byte'):
    data = text.load_text(_data_config(seq_len=seq_len, test_fraction=fraction, vocab=vocab))
    num_train_chars = len(corpus) - round(len(corpus) * fraction)
    head, tail = corpus[:num_train_chars], corpus[num_train_chars:]
    train_stream, test_stream = data.train_tokens.reshape(-1), data.test_tokens.reshape(-1)
    np.testing.assert_array_equal(train_stream, data.encode(head)[:len(train_stream)])
    np.testing.assert_array_equal(test_stream, data.encode(tail)[:len(test_stream)])
    if vocab == 'char':  # One token per character: the first held-out window is the tail's first characters.
      assert data.decode(data.test_tokens[0]) == tail[:seq_len]
      assert data.decode(data.train_tokens[-1]) in head[-2 * seq_len:]
    else:
      assert data.vocab is None and data.vocab_size == 256 and data.train_tokens.dtype == np.uint8
      assert tail.encode('utf-8').startswith(data.test_tokens[0].tobytes())


def test_encode_decode_round_trip_char_and_byte(tmp_path):
  path = _write(tmp_path, SAMPLE)
  for vocab in ('char', 'byte'):
    data = text.load_text(_data_config(source='text', path=path, seq_len=16, vocab=vocab))
    for s in ('°', '—', 'Été — 20 °C', '東京\n', ''):
      ids = data.encode(s)
      assert ids.dtype == np.int32 and ids.ndim == 1
      assert data.decode(ids) == s
      assert data.decode(list(ids)) == s  # Any sequence of ids, not only arrays.
    assert len(data.encode('°')) == (1 if vocab == 'char' else 2)
  byte_data = text.load_text(_data_config(source='text', path=path, seq_len=16, vocab='byte'))
  assert byte_data.decode([0xC2]) == '\ufffd'  # Half a character: replaced, not an exception.
  assert byte_data.decode(byte_data.encode('\x00~')) == '\x00~'  # Bytes outside the corpus are still tokens.


def test_char_vocab_covers_the_held_out_split(tmp_path):
  # '§' only occurs in the held-out tail; it must still be in the vocabulary.
  path = _write(tmp_path, 'abcd' * 100 + '§' * 40)
  data = text.load_text(_data_config(source='text', path=path, seq_len=8, test_fraction=0.1))
  assert data.vocab == ('a', 'b', 'c', 'd', '§')
  assert data.decode(data.test_tokens[-1]) == '§' * 8
  assert data.name == 'corpus'


def test_validation_split_is_the_train_texts_tail_and_never_windows_the_test_text(tmp_path):
  # The test text ('§' only) lends its character to the vocabulary, so the model is the final run's, but no
  # window of it is evaluated or trained on.
  head, val = 'abcd' * 90, 'dcba' * 10
  path = _write(tmp_path, head + val + '§' * 40)
  data = text.load_text(_data_config(source='text', path=path, seq_len=8, test_fraction=1 / 11,
                                     validation_fraction=0.1))  # 40 of 440 characters, then 40 of 400.
  assert data.vocab == ('a', 'b', 'c', 'd', '§') and data.name == 'corpus (validation)'
  assert ''.join(data.decode(row) for row in data.test_tokens) == val
  assert ''.join(data.decode(row) for row in data.train_tokens) == head


# ------------------------------------------------------------------------------------------------------ file

def test_file_source_and_byte_order_mark(tmp_path):
  path = _write(tmp_path, '\ufeff'.encode('utf-8') + SAMPLE.encode('utf-8'))
  data = text.load_text(_data_config(source='text', path=path, seq_len=32, test_fraction=0.25))
  assert '\ufeff' not in data.vocab  # An encoding marker, not text.
  assert data.decode(data.train_tokens[0]) == SAMPLE[:32]
  assert data.decode(data.test_tokens[0]) == SAMPLE[len(SAMPLE) - round(len(SAMPLE) * 0.25):][:32]
  assert data.vocab == tuple(sorted(set(SAMPLE)))


def test_file_errors_name_the_file_and_the_fix(tmp_path):
  missing = str(tmp_path / 'nope.txt')
  with pytest.raises(DataError, match=r"config.data.path='.*nope.txt' is not a file"):
    text.load_text(_data_config(source='text', path=missing))
  with pytest.raises(DataError, match='is empty'):
    text.load_text(_data_config(source='text', path=_write(tmp_path, b'', 'empty.txt')))
  latin1 = 'abc café'.encode('latin-1') + b' and more'
  with pytest.raises(DataError, match=r'not UTF-8: byte offset 7 .*iconv') as e:
    text.load_text(_data_config(source='text', path=_write(tmp_path, latin1, 'latin1.txt')))
  assert 'latin1.txt' in str(e.value)


def test_too_short_for_a_window_names_split_length_and_fix(tmp_path):
  path = _write(tmp_path, 'x' * 100)  # 90 train and 10 held-out characters.
  with pytest.raises(DataError, match=r'the test split has 10 tokens, fewer than one window of '
                     r'config.data.seq_len=16; lower config.data.seq_len or raise config.data.test_fraction'):
    text.load_text(_data_config(source='text', path=path, seq_len=16))
  with pytest.raises(DataError, match=r'the train split has 90 tokens.*seq_len=128; lower config.data.seq_len'):
    text.load_text(_data_config(source='text', path=path, seq_len=128, test_fraction=0.1))


@pytest.mark.parametrize('field, value, says', [
    ('test_fraction', 0.0, r'test_fraction=0.0 must be in \(0, 1\)'),
    ('test_fraction', 1.0, r'test_fraction=1.0 must be in \(0, 1\)'),
    ('test_fraction', -0.5, r'test_fraction=-0.5 must be in \(0, 1\)'),
    ('seq_len', 1, r'seq_len=1 must be an integer >= 2'),
    ('vocab', 'word', r"config.data.vocab='word' is not one of"),
    ('source', 'tfds', r"config.data.source='tfds' is not a text source"),
])
def test_loader_errors_name_the_field(field, value, says):
  with pytest.raises(DataError, match=says):
    text.load_text(_data_config(**{field: value}))


def test_bad_process_index_is_refused():
  with pytest.raises(DataError, match='process_index=2 is outside'):
    text.load_text(_data_config(), process_index=2, process_count=2)


def test_encode_names_unknown_characters_and_decode_checks_ids():
  data = text.load_text(_data_config(seq_len=64))
  with pytest.raises(DataError, match=rf"3 character\(s\) .* not in its {data.vocab_size}-character vocabulary: "
                     r"'京東'; .*vocab='byte'"):  # Each unknown character named once, sorted.
    data.encode('ok 東京東')
  with pytest.raises(DataError, match=r'outside the vocabulary'):
    data.decode([0, data.vocab_size])
  with pytest.raises(DataError, match=r'one sequence'):
    data.decode(data.test_tokens[:2])


def test_dataset_refuses_inconsistent_arrays():
  good = np.zeros((3, 4), np.uint8)
  with pytest.raises(DataError, match='no sequences'):
    text.TextDataset(good, np.zeros((0, 4), np.uint8), None, 'x')
  with pytest.raises(DataError, match='must be uint8'):
    text.TextDataset(good.astype(np.int32), good, None, 'x')
  with pytest.raises(DataError, match='train sequences have 4 tokens but test sequences have 5'):
    text.TextDataset(good, np.zeros((2, 5), np.uint8), None, 'x')
  with pytest.raises(DataError, match=r'span \[0, 3\], outside the vocabulary \[0, 2\)'):
    text.TextDataset(good + np.arange(4, dtype=np.uint8), good, ('a', 'b'), 'x')
  big = tuple(chr(0x100 + i) for i in range(300))  # Over 256 characters: int32 tokens.
  assert text.TextDataset(good.astype(np.int32), good.astype(np.int32), big, 'x').vocab_size == 300


# -------------------------------------------------------------------------------------------------- sharding

def test_process_shards_are_disjoint_equal_and_the_head_of_the_train_windows():
  config = _data_config(seq_len=100)
  full = text.load_text(config)
  shards = [text.load_text(config, process_index=i, process_count=3) for i in range(3)]
  per_process = full.num_train // 3
  for shard in shards:
    assert shard.train_tokens.shape == (per_process, 100)
    np.testing.assert_array_equal(shard.test_tokens, full.test_tokens)  # Held-out split whole everywhere.
    assert shard.vocab == full.vocab
  np.testing.assert_array_equal(np.concatenate([s.train_tokens for s in shards]),
                                full.train_tokens[:3 * per_process])


def test_too_few_windows_for_the_processes(tmp_path):
  path = _write(tmp_path, 'ab' * 100)  # 100 train characters: 2 windows of 40.
  with pytest.raises(DataError, match='2 training windows cannot be split over 3 processes'):
    text.load_text(_data_config(source='text', path=path, seq_len=40, test_fraction=0.5), process_index=0,
                   process_count=3)


# ------------------------------------------------------------------------------------------------------ tfds

def test_tfds_lm1b_under_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  config = _data_config(source='text', name='lm1b', seq_len=8)
  with tfds.testing.mock_data(num_examples=7):
    data = text.load_text(config)
    shards = [text.load_text(config, process_index=i, process_count=2) for i in range(2)]
    config.text_key = 'sentence'
    with pytest.raises(DataError, match=r"config.data.text_key='sentence' is not a feature of lm1b; its features "
                       r"are \['text'\]"):
      text.load_text(config)
  assert data.name == 'lm1b' and data.seq_len == 8 and len(data.test_tokens) >= 1
  assert data.vocab[0] == '\n'  # Examples are joined with newlines.
  np.testing.assert_array_equal(np.concatenate([s.train_tokens for s in shards]),
                                data.train_tokens[:2 * (data.num_train // 2)])


def test_tfds_not_prepared_without_download_says_where(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  config = _data_config(source='text', name='lm1b', tfds_data_dir=str(tmp_path))
  config.tfds_download = False  # Never touch the network in a test.
  with pytest.raises(DataError, match='tfds_download=False') as e:
    text.load_text(config)
  assert str(tmp_path) in str(e.value) and 'tfds_data_dir' in str(e.value)


def test_tfds_unknown_name():
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(DataError, match="config.data.name='no_such_text_xyz' is not a TFDS dataset"):
    text.load_text(_data_config(source='text', name='no_such_text_xyz'))


_PREPARED_CODE = """
import sys
import numpy as np
import tensorflow_datasets as tfds
from diffblocks_jax import config
from diffblocks_jax.data import text

class FakeText(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version('1.0.0')
  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'text': tfds.features.Text(), 'n': tfds.features.Scalar(dtype=np.int64)}))
  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(30, 'tr'), 'test': self._generate_examples(5, 'te')}
  def _generate_examples(self, n, prefix):
    for i in range(n):
      yield i, {'text': f'{prefix} {i}: 20 °C — é', 'n': i}

d = config.get_base_config().data
d.update(dict(source='text', name='fake_text', seq_len=8))
fmt = sys.argv[2]
d.tfds_data_dir = f'{sys.argv[1]}/{fmt}'
tfds.builder('fake_text', data_dir=d.tfds_data_dir).download_and_prepare(file_format=fmt)
data = text.load_text(d)
test = data.decode(data.test_tokens.reshape(-1))
assert test.startswith('te ') and '°C — é' in test, test  # TFDS's order of the examples, read as UTF-8.
assert set(data.vocab) == set('\\n :0123456789ert°C—é'), data.vocab
train_chars = sum(len(f'tr {i}: 20 °C — é') for i in range(30)) + 29  # Joined with newlines.
assert data.num_train == train_chars // 8, (data.num_train, train_chars)
d.text_key = 'n'
try:
  text.load_text(d)
  raise AssertionError('a numeric feature was read as text')
except text.DataError as e:
  assert "config.data.text_key='n' of fake_text is Scalar, not text" in str(e), e
d.text_key, d.test_split = 'text', 'validation'
try:
  text.load_text(d)
  raise AssertionError('an unknown split was accepted')
except text.DataError as e:
  assert "config.data.test_split='validation' is not a split" in str(e), e
if fmt == 'array_record':
  assert 'tensorflow' not in sys.modules, 'the data_source path imported TensorFlow'
"""


@pytest.mark.parametrize('fmt', ['array_record', pytest.param('tfrecord', marks=pytest.mark.slow)])
def test_tfds_prepared_text(tmp_path, fmt):
  # Real prepared files (bytes, not the mock's str): random access, and the TensorFlow fallback for tfrecord.
  # A subprocess, so that TensorFlow imported elsewhere cannot hide an import on the array_record path.
  pytest.importorskip('tensorflow_datasets')
  result = subprocess.run([sys.executable, '-c', _PREPARED_CODE, str(tmp_path), fmt], cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert result.returncode == 0, result.stderr[-3000:]
