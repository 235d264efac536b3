"""Text for language models: a corpus as non-overlapping windows of character or byte tokens.

Sources (`config.data.source`): 'pydoc' (CPython's bundled documentation text, ~465k characters, offline),
'text' with `data.path` (a UTF-8 file), or 'text' with `data.path == ''` (the TFDS text dataset `data.name`,
e.g. text8 or lm1b). A file or 'pydoc' is split into its head (train) and its last `data.test_fraction` of
characters (held out); a TFDS dataset has its own `data.train_split` and `data.test_split`. With
`data.validation_fraction`, the train text's last share is held out instead and the test text is never windowed
(for choosing settings without the test text).

Vocabularies (`config.data.vocab`): 'char', the sorted characters of the whole corpus (both splits, so the
held-out split has no unknown character), 'byte', the 256 UTF-8 byte values, or 'tokenizer', a Hugging Face
tokenizer.json (`config.data.tokenizer`; data/tokenizer.py), whose ids a checkpoint's embedding reads. Encoding
characters is vectorised with NumPy (a codepoint lookup table), so that text8's 100M characters take about a
second, not minutes.

Held-out figures are per character whatever the vocabulary: `TextDataset.tokens_per_char` (1 for 'char' and,
per byte, for 'byte'; the held-out windows' tokens over the characters they cover for a tokenizer) turns nats per
token into bits per character (`tasks.language.bits_per_char`), so runs with different vocabularies compare.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib

from absl import logging
import numpy as np

from diffblocks_jax.data import tokenizer as tokenizer_lib
from diffblocks_jax.data.dataset import DataError
from diffblocks_jax.tasks import registry

VOCABS = ('char', 'byte', 'tokenizer')
_NUM_CODEPOINTS = 0x110000  # Unicode's code space: the size of the codepoint -> token lookup table.
_TFDS_CHUNK = 1024  # Examples per batched read from a TFDS data source.


def _token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint8 if vocab_size <= 256 else np.int32)  # uint8: a quarter of the host/device memory.


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays make field-wise ==/hash meaningless.
class TextDataset:
  train_tokens: np.ndarray  # (N, seq_len), uint8 when vocab_size <= 256 else int32: non-overlapping windows.
  test_tokens: np.ndarray  # (M, seq_len), same dtype: the held-out windows.
  vocab: tuple[str, ...] | None  # Character vocabulary (token id -> character); None for bytes or a tokenizer.
  name: str
  tokenizer: tokenizer_lib.Tokenizer | None = None  # data.vocab='tokenizer'.
  padded_vocab: int = 0  # data.vocab_size: > 0, the model's rows for a tokenizer's ids (a checkpoint's rounding).
  tokens_per_char: float = 1.0  # Of the held-out windows: nats per token x this = nats per character.

  def __post_init__(self):
    if self.vocab is not None:
      if not self.vocab or any(not isinstance(c, str) or len(c) != 1 for c in self.vocab):
        raise DataError(f'{self.name}: the vocabulary must be a non-empty tuple of single characters')
      if len(set(self.vocab)) != len(self.vocab):
        raise DataError(f'{self.name}: the vocabulary repeats characters; each must appear once')
    if self.tokenizer is not None and self.vocab is not None:
      raise DataError(f'{self.name}: a dataset has a character vocabulary or a tokenizer, not both')
    if self.padded_vocab and (self.tokenizer is None or self.padded_vocab < self.tokenizer.size):
      raise DataError(f'{self.name}: padded_vocab={self.padded_vocab} rounds up a tokenizer\'s vocabulary; it '
                      'needs one with at most that many tokens')
    dtype = _token_dtype(self.vocab_size)
    for split in ('train', 'test'):
      tokens = getattr(self, f'{split}_tokens')
      if tokens.ndim != 2 or tokens.dtype != dtype:
        raise DataError(f'{self.name}: {split}_tokens must be {dtype} (N, seq_len) for a vocabulary of '
                        f'{self.vocab_size}, got {tokens.dtype} {tokens.shape}')
      if not len(tokens):  # Caught here, at load time, rather than by the first step or evaluation.
        raise DataError(f'{self.name}: the {split} split has no sequences; training needs a non-empty train '
                        'split and evaluation a non-empty test split')
      if tokens.shape[1] < 2:
        raise DataError(f'{self.name}: {split} sequences have {tokens.shape[1]} tokens; a language model needs '
                        'at least 2')
      if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
        raise DataError(f'{self.name}: {split}_tokens span [{tokens.min()}, {tokens.max()}], outside the '
                        f'vocabulary [0, {self.vocab_size})')
    if self.train_tokens.shape[1] != self.test_tokens.shape[1]:
      raise DataError(f'{self.name}: train sequences have {self.train_tokens.shape[1]} tokens but test sequences '
                      f'have {self.test_tokens.shape[1]}')

  @property
  def vocab_size(self) -> int:
    if self.tokenizer is not None:
      return self.padded_vocab or self.tokenizer.size
    return 256 if self.vocab is None else len(self.vocab)

  @property
  def seq_len(self) -> int:
    return self.train_tokens.shape[1]

  # What the loop and the model builder ask of any dataset (as data/dataset.py's Dataset).
  @property
  def num_train(self) -> int:
    return len(self.train_tokens)

  @property
  def model_dims(self) -> dict[str, int]:
    """The keyword arguments `models.build` takes from the data."""
    return dict(vocab_size=self.vocab_size, seq_len=self.seq_len)

  def train_arrays(self) -> tuple[np.ndarray, ...]:
    """The training split as row-aligned arrays: what a step's batch is gathered from."""
    return (self.train_tokens,)

  def summary(self) -> str:
    """One line for the start of a run."""
    vocab = 'bytes' if self.vocab is None else f'{self.vocab_size} characters'
    if self.tokenizer is not None:
      padding = f', {self.vocab_size:,} rows' if self.padded_vocab else ''
      vocab = f'{self.tokenizer.size:,} tokens of {self.tokenizer.path}{padding} ({1 / self.tokens_per_char:.2f} ' \
              'characters per held-out token)'
    return (f'{self.name}: {self.num_train:,} training windows of {self.seq_len} tokens, {len(self.test_tokens):,} '
            f'held out; vocabulary {vocab}')

  # cached_property writes the instance __dict__ directly, so it works on a frozen dataclass.
  @functools.cached_property
  def _codepoints(self) -> np.ndarray:  # Token id -> codepoint.
    return np.asarray([ord(c) for c in self.vocab], np.uint32)

  @functools.cached_property
  def _ids(self) -> np.ndarray:  # Codepoint -> token id, -1 outside the vocabulary (4 MB).
    table = np.full(_NUM_CODEPOINTS, -1, np.int32)
    table[self._codepoints] = np.arange(self.vocab_size, dtype=np.int32)
    return table

  def encode(self, text: str) -> np.ndarray:
    """int32 token ids of `text`; a character outside the vocabulary raises DataError naming it."""
    if self.tokenizer is not None:
      return self.tokenizer.encode(text)
    if self.vocab is None:
      return np.frombuffer(_utf8(text, self.name), np.uint8).astype(np.int32)
    codepoints = _utf32(text, self.name)
    ids = self._ids[codepoints]
    unknown = ids < 0
    if unknown.any():
      chars = sorted({chr(c) for c in codepoints[unknown].tolist()})
      raise DataError(f'{self.name}: {unknown.sum()} character(s) of the text are not in its {self.vocab_size}-'
                      f'character vocabulary: {"".join(chars[:20])!r}{" ..." if len(chars) > 20 else ""}; '
                      "remove them, or train with config.data.vocab='byte', which encodes any text")
    return ids

  def decode(self, tokens) -> str:
    """Token ids (one sequence) -> text; byte-level ids are decoded as UTF-8 with errors='replace'."""
    ids = np.asarray(tokens)
    if ids.ndim > 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
      raise DataError(f'{self.name}: decode takes one sequence of integer ids, got {ids.dtype} {ids.shape}; '
                      'decode a batch row by row: [decode(row) for row in tokens]')
    ids = ids.reshape(-1).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise DataError(f'{self.name}: ids span [{ids.min()}, {ids.max()}], outside the vocabulary '
                      f'[0, {self.vocab_size})')
    if self.tokenizer is not None:
      return self.tokenizer.decode(ids)
    if self.vocab is None:
      return ids.astype(np.uint8).tobytes().decode('utf-8', errors='replace')
    return self._codepoints[ids].tobytes().decode('utf-32-le')


def pydoc_text() -> str:
  """CPython's bundled documentation text (pydoc_data.topics), its topics joined in sorted order."""
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top  (1 MB; only this source needs it)
  return '\n'.join(topics[k] for k in sorted(topics))  # Sorted: the same corpus whichever the dict's order.


def load_text(data_config, *, process_index: int = 0, process_count: int = 1) -> TextDataset:
  """Loads both splits; each process keeps its contiguous 1/process_count of TRAIN windows (test stays whole).

  Shards are equal-sized (the last `N % process_count` windows are dropped) so that every process runs the
  same number of steps per epoch; unequal counts would deadlock the collectives of a multi-host run.
  """
  _check_config(data_config, process_index, process_count)
  if data_config.source == 'pydoc':
    name, (train_text, test_text) = 'pydoc', _split_tail(pydoc_text(), data_config, 'pydoc')
  elif data_config.path:
    name, (train_text, test_text) = pathlib.Path(data_config.path).stem, _split_tail(
        _read_utf8_file(data_config.path), data_config, f'config.data.path={data_config.path!r}')
  else:
    name, (train_text, test_text) = data_config.name, _load_tfds_text(data_config)
  texts = (train_text, test_text)
  if data_config.validation_fraction:
    # Evaluate on the train text's tail; the test text only lends its characters to the vocabulary, so the
    # model (its embedding table) is the same as the final run's.
    name += ' (validation)'
    texts = (*_split_tail(train_text, data_config, f'{name}: the train text', 'validation_fraction'), test_text)
  seq_len, tokens_per_char, tokenizer = data_config.seq_len, 1.0, None
  if data_config.vocab == 'tokenizer':
    tokenizer, vocab = tokenizer_lib.Tokenizer(data_config.tokenizer), None
    if 0 < data_config.vocab_size < tokenizer.size:
      raise DataError(f'config.data.vocab_size={data_config.vocab_size} is below the {tokenizer.size:,} tokens of '
                      f'{tokenizer.path}: the model needs a row for each (0: exactly that many)')
    train_ids = tokenizer.encode(texts[0])
    test_ids, ends = tokenizer.encode(texts[1], with_ends=True)
    covered = len(test_ids) // seq_len * seq_len  # The held-out windows' tokens, and the characters they cover.
    tokens_per_char = covered / int(ends[covered - 1]) if covered else 1.0
    dtype = _token_dtype(data_config.vocab_size or tokenizer.size)
    train_ids, test_ids = train_ids.astype(dtype), test_ids.astype(dtype)
  else:
    vocab, (train_ids, test_ids, *_) = _tokenize(data_config.vocab, texts)
  del train_text, test_text, texts  # Free the corpus (text8: 100 MB) before the shard's copy.
  from_tfds = data_config.source == 'text' and not data_config.path
  train = _windows(train_ids, seq_len, name, 'train', from_tfds)
  test = _windows(test_ids, seq_len, name, 'test', from_tfds)
  if process_count > 1:
    start, stop = _shard_bounds(len(train), (process_index, process_count), name, seq_len)
    train = train[start:stop].copy()  # A copy frees the full split.
  data = TextDataset(train, test, vocab, name, tokenizer, data_config.vocab_size, tokens_per_char)
  logging.debug('Loaded text %s: %s vocabulary of %d, train %d windows (process %d of %d), test %d windows, '
               'seq_len %d.', name, data_config.vocab, data.vocab_size, data.num_train, process_index,
               process_count, len(test), seq_len)
  return data


def _check_config(data_config, process_index: int, process_count: int) -> None:
  """Every field this module reads, checked before any file or dataset is read."""
  if registry.SOURCES.get(data_config.source) != 'text':
    sources = tuple(s for s, family in registry.SOURCES.items() if family == 'text')
    raise DataError(f'config.data.source={data_config.source!r} is not a text source; use one of {sources}')
  if data_config.vocab not in VOCABS:
    raise DataError(f'config.data.vocab={data_config.vocab!r} is not one of {VOCABS}')
  if data_config.vocab == 'tokenizer':
    tokenizer_lib.resolve(data_config.tokenizer)
  padded = data_config.vocab_size
  if isinstance(padded, bool) or not isinstance(padded, (int, np.integer)) or padded < 0:
    raise DataError(f'config.data.vocab_size={padded!r} must be an integer >= 0 (0: the vocabulary\'s own size)')
  if padded and data_config.vocab != 'tokenizer':
    raise DataError(f'config.data.vocab_size={padded} rounds up a tokenizer\'s vocabulary (data.vocab='
                    f"'tokenizer'); data.vocab={data_config.vocab!r} has its own size: set it to 0")
  seq_len = data_config.seq_len
  if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
    raise DataError(f'config.data.seq_len={seq_len!r} must be an integer >= 2 (a model predicts tokens from '
                    'the ones before or around them)')
  from_stream = data_config.source == 'pydoc' or data_config.path
  if from_stream and not 0 < data_config.test_fraction < 1:
    raise DataError(f'config.data.test_fraction={data_config.test_fraction!r} must be in (0, 1): the held-out '
                    'tail of the text, e.g. 0.1')
  if data_config.source == 'text' and data_config.path and not os.path.isfile(data_config.path):
    raise DataError(f'config.data.path={data_config.path!r} is not a file; give a UTF-8 text file, or '
                    "set config.data.path='' to read the TFDS text dataset config.data.name")
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index={process_index} is outside [0, process_count={process_count})')


def _read_utf8_file(path: str) -> str:
  raw = pathlib.Path(path).read_bytes()
  if not raw:
    raise DataError(f'config.data.path={path!r} is empty; give a UTF-8 text file with the training text')
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise DataError(f'config.data.path={path!r} is not UTF-8: byte offset {e.start} holds '
                    f'{raw[e.start:e.start + 4]!r} ({e.reason}); convert it, e.g. `iconv -f latin1 -t utf-8`') from e
  return text.removeprefix('\ufeff')  # A byte-order mark is an encoding marker, not text to model.


def _split_tail(text: str, data_config, where: str, field: str = 'test_fraction') -> tuple[str, str]:
  """(head, tail): the tail is the last `data.<field>` of the characters (a cut between characters, so the
  held-out text decodes cleanly under either vocabulary)."""
  fraction = getattr(data_config, field)
  num_test = int(round(len(text) * fraction))
  if not 0 < num_test < len(text):
    raise DataError(f'{where}: {len(text)} characters leave {len(text) - num_test} for training and {num_test} '
                    f'held out with config.data.{field}={fraction}; use a longer text')
  return text[:len(text) - num_test], text[len(text) - num_test:]


def _tokenize(vocab: str, texts: tuple[str, ...]) -> tuple[tuple[str, ...] | None, list[np.ndarray]]:
  """The vocabulary and each text's token ids (uint8 or int32, as TextDataset stores them)."""
  if vocab == 'byte':
    # Copies: frombuffer's arrays are read-only views of the bytes; the dataset's arrays are ordinary.
    return None, [np.frombuffer(_utf8(text, 'the corpus'), np.uint8).copy() for text in texts]
  codepoints = [_utf32(text, 'the corpus') for text in texts]
  seen = np.zeros(_NUM_CODEPOINTS, bool)  # A table over the code space: O(n), 3x faster than np.unique.
  for points in codepoints:
    seen[points] = True
  vocab_codes = np.flatnonzero(seen)  # Ascending codepoints: the same order as sorted(set(text)).
  if not vocab_codes.size:
    raise DataError('the corpus has no characters; give a non-empty text')
  table = np.zeros(_NUM_CODEPOINTS, _token_dtype(vocab_codes.size))
  table[vocab_codes] = np.arange(vocab_codes.size)
  return tuple(map(chr, vocab_codes.tolist())), [table[points] for points in codepoints]


def _utf8(text: str, what: str) -> bytes:
  return _encoded(text, 'utf-8', what)


def _utf32(text: str, what: str) -> np.ndarray:
  """The codepoints of `text`, one uint32 each (UTF-32 is exactly that)."""
  return np.frombuffer(_encoded(text, 'utf-32-le', what), np.uint32)


def _encoded(text: str, encoding: str, what: str) -> bytes:
  try:
    return text.encode(encoding)
  except UnicodeEncodeError as e:  # Only lone surrogates ('\ud800'), which no decoded UTF-8 text holds.
    raise DataError(f'{what}: character {e.start} ({text[e.start]!r}) is not a valid character: '
                    f'{e.reason}') from e


def _windows(ids: np.ndarray, seq_len: int, name: str, split: str, from_tfds: bool) -> np.ndarray:
  """(len(ids) // seq_len, seq_len) non-overlapping windows; the remainder is dropped."""
  count = len(ids) // seq_len
  if count < 1:
    fix = (f'choose a larger config.data.{split}_split' if from_tfds else
           'lower config.data.test_fraction or use a longer text' if split == 'train' else
           'raise config.data.test_fraction')
    raise DataError(f'{name}: the {split} split has {len(ids)} tokens, fewer than one window of '
                    f'config.data.seq_len={seq_len}; lower config.data.seq_len or {fix}')
  return ids[:count * seq_len].reshape(count, seq_len)


def _shard_bounds(n: int, shard: tuple[int, int], name: str, seq_len: int) -> tuple[int, int]:
  # input_pipeline._shard_bounds for windows; not imported, as input_pipeline imports this module.
  index, count = shard
  per_process = n // count
  if per_process < 1:
    raise DataError(f'{name}: {n} training windows cannot be split over {count} processes; lower '
                    f'config.data.seq_len={seq_len} or use a longer text')
  if n % count:
    logging.warning('Dropping the last %d training windows so that %d processes get %d each.',
                    n % count, count, per_process)
  return index * per_process, (index + 1) * per_process


# ---------------------------------------------------------------------------------------------------- tfds

def _load_tfds_text(data_config) -> tuple[str, str]:
  """The train and test splits of a TFDS text dataset, each split's examples joined with '\\n'."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy; only this source needs it)
  from diffblocks_jax.data import tfds_preparation  # pylint: disable=g-import-not-at-top
  name, key = data_config.name, data_config.text_key
  builder = tfds_preparation.open_builder(
      tfds, data_config, ", or give a text file with --config.data.path (or use --config.data.source='pydoc', "
      'offline)')
  features = builder.info.features
  if key not in features:
    raise DataError(f'config.data.text_key={key!r} is not a feature of {name}; its features are '
                    f'{sorted(features)}')
  if not isinstance(features[key], tfds.features.Text):
    raise DataError(f'config.data.text_key={key!r} of {name} is {type(features[key]).__name__}, not text; its '
                    f'features are {sorted(features)}')
  if not builder.is_prepared():
    tfds_preparation.prepare(builder, data_config)  # Raises DataError if tfds_download is False or offline.
  splits = [data_config.train_split, data_config.test_split]
  tfds_preparation.check_splits(builder, splits, name)
  try:
    sources = builder.as_data_source(split=splits)
  except NotImplementedError:  # Prepared as tfrecord: no random access, read it through TensorFlow.
    return tuple(_read_tfds_tensorflow(tfds, builder, split, key) for split in splits)
  return tuple('\n'.join(_read_source(source, key, name)) for source in sources)


def _read_source(source, key: str, name: str) -> list[str]:
  texts = []
  for lo in range(0, len(source), _TFDS_CHUNK):
    keys = list(range(lo, min(lo + _TFDS_CHUNK, len(source))))
    try:
      examples = source.__getitems__(keys)
    except TypeError:  # tfds.testing.mock_data's data source breaks the batched read; read one by one.
      examples = [source[k] for k in keys]
    texts.extend(_as_str(ex[key], name) for ex in examples)
  return texts


def _read_tfds_tensorflow(tfds, builder, split: str, key: str) -> str:
  try:
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  except ImportError as e:
    raise DataError(f'{builder.data_dir} holds tfrecord files, which need TensorFlow to read: install '
                    f"tensorflow-cpu, or re-prepare the data with file_format='array_record'") from e
  return '\n'.join(_as_str(value, builder.name) for value in np.asarray(data[key], object).reshape(-1))


def _as_str(value, name: str) -> str:
  """A Text feature's value: bytes from prepared files (str from mock data), always UTF-8."""
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, str):
    return value
  try:
    return bytes(value).decode('utf-8')
  except UnicodeDecodeError as e:
    raise DataError(f'{name}: an example is not UTF-8 text (byte offset {e.start}: {e.reason})') from e
