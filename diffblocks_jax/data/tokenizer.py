"""A Hugging Face tokenizer as the vocabulary of a text run: `config.data.vocab='tokenizer'` with
`config.data.tokenizer` the `tokenizer.json` (or the folder holding it) of a checkpoint, so that the data's token
ids are the checkpoint's (docs/finetune.md).

Read with the Rust `tokenizers` package (the `hf` extra), never with transformers. Texts are encoded without
special tokens: the models add their own start token (`config.model.bos_token`, the checkpoint's bos_token_id).
Long texts are encoded in pieces of about a million characters cut after a newline, in parallel, so text8's 100M
characters take seconds; a token never spans a cut, which is the only way the ids can differ from encoding the
whole text in one call.
"""

from __future__ import annotations

import os

import numpy as np

from diffblocks_jax.data.dataset import DataError

FILE = 'tokenizer.json'
_PIECE = 1 << 20  # Characters per piece of a long text.


def resolve(path: str) -> str:
  """The tokenizer.json that `path` names (the file, or a folder holding one); DataError naming the field."""
  field = f'config.data.tokenizer={path!r}'
  if not path:
    raise DataError("config.data.vocab='tokenizer' needs config.data.tokenizer: the tokenizer.json of the "
                    'checkpoint (or its folder)')
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    file = os.path.join(path, FILE)
    if not os.path.isfile(file):
      raise DataError(f'{field} is a folder without {FILE}; name a folder saved by save_pretrained with a fast '
                      f'tokenizer, or the {FILE} file itself (a SentencePiece-only tokenizer.model is not read)')
    return file
  if not os.path.isfile(path):
    raise DataError(f'{field} does not exist; name a {FILE} file or the folder holding it')
  return path


class Tokenizer:
  """encode(text) -> int32 ids; decode(ids) -> text; `size`: the ids it can produce ([0, size))."""

  def __init__(self, path: str):
    self.path = resolve(path)
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top  (only this vocabulary needs it)
    except ImportError:
      raise DataError(f"config.data.vocab='tokenizer' reads {self.path} with the `tokenizers` package, which is "
                      "not installed: `uv sync --extra hf` (or `pip install 'tokenizers>=0.19'`)") from None
    try:
      self._tokenizer = tokenizers.Tokenizer.from_file(self.path)
    except Exception as e:  # The Rust side raises a bare Exception for malformed JSON or unknown models.
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise DataError(f'config.data.tokenizer: {self.path} is not a tokenizer.json that `tokenizers` reads '
                      f'({first})') from None
    self.size = self._tokenizer.get_vocab_size(with_added_tokens=True)

  def __repr__(self) -> str:
    return f'Tokenizer({self.path!r}, {self.size:,} tokens)'

  def encode(self, text: str, with_ends: bool = False):
    """The ids of `text` (int32); with `with_ends`, also (ids, ends): ends[i] is the character offset in `text`
    where token i ends, so the first n tokens cover text[:ends[n - 1]]."""
    starts = _piece_starts(text)
    pieces = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    encodings = self._tokenizer.encode_batch(pieces, add_special_tokens=False) if pieces else []
    ids = np.concatenate([np.asarray(e.ids, np.int32) for e in encodings] or [np.zeros(0, np.int32)])
    if not with_ends:
      return ids
    ends = [np.asarray([end for _, end in e.offsets], np.int64) + start
            for e, start in zip(encodings, starts)]
    return ids, np.concatenate(ends or [np.zeros(0, np.int64)])

  def decode(self, ids) -> str:
    """Text of token ids; ids past `size` (rows a checkpoint adds to round its vocabulary up: no token) read as
    U+FFFD, so that a sample shows them rather than dropping them."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    outside = np.flatnonzero(ids >= self.size)
    runs = np.split(ids, outside)
    texts = [self._tokenizer.decode(run[1 if i else 0:].tolist(), skip_special_tokens=False)
             for i, run in enumerate(runs)]
    return '\ufffd'.join(texts)


def _piece_starts(text: str) -> list[int]:
  """Where each piece of `text` starts: every ~_PIECE characters, just after a newline when one is near."""
  starts, start = [], 0
  while start < len(text):
    starts.append(start)
    cut = start + _PIECE
    if cut >= len(text):
      break
    newline = text.rfind('\n', start + _PIECE // 2, cut)
    start = newline + 1 if newline >= 0 else cut
  return starts
