"""A Hugging Face tokenizer as the text vocabulary (data.vocab='tokenizer', data/tokenizer.py): its ids are
transformers', held-out figures stay per character, rows a checkpoint adds are allowed, and a checkpoint's own
tokenizer fine-tunes it (configs/text_hf.py).

The tokenizer is tests/fixtures/hf/llama_tokenizer's: a 384-token byte-level BPE that `tokenizers` trained on the
CPython text, saved by transformers 5.25 beside a tiny Llama of 400 rows; reference.npz holds transformers' ids of
a mixed-script text (tests/fixtures/hf/make_fixtures.py).
"""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest

import helpers
from diffblocks_jax.data import text, tokenizer
from diffblocks_jax.data.dataset import DataError
from diffblocks_jax.training import train

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'hf', 'llama_tokenizer')
TOKENS, ROWS = 384, 400  # The fixture's tokenizer and its checkpoint's embedding rows.


def data_config(**fields):
  fields = {'vocab': 'tokenizer', 'tokenizer': FOLDER, 'seq_len': 32, **fields}
  return helpers.tiny_config('ar', data='text', **{f'data__{k}': v for k, v in fields.items()}).data


def test_ids_are_transformers_and_decode_back():
  ref = np.load(os.path.join(FOLDER, 'reference.npz'))
  tok = tokenizer.Tokenizer(FOLDER)
  assert tok.size == TOKENS and tok.path.endswith('tokenizer.json')
  sample = str(ref['text'])
  np.testing.assert_array_equal(tok.encode(sample), ref['token_ids'])
  assert tok.decode(ref['token_ids']) == sample
  assert tokenizer.Tokenizer(os.path.join(FOLDER, 'tokenizer.json')).size == TOKENS  # The file itself.


def test_long_texts_encode_in_pieces_that_cover_every_character(monkeypatch):
  """Pieces cut after newlines: the ids still decode to the whole text, and each token's end offset counts the
  characters before it (what tokens_per_char is measured with)."""
  monkeypatch.setattr(tokenizer, '_PIECE', 500)
  corpus = text.pydoc_text()[:20_000] + ' ' + 'x' * 1_200  # A last stretch with no newline: a hard cut.
  tok = tokenizer.Tokenizer(FOLDER)
  ids, ends = tok.encode(corpus, with_ends=True)
  assert len(tokenizer._piece_starts(corpus)) > 40
  assert tok.decode(ids) == corpus
  assert len(ends) == len(ids) and ends[-1] == len(corpus) and np.all(np.diff(ends) >= 0)
  for n in (1, 17, len(ids) // 2):
    assert tok.decode(ids[:n]) == corpus[:ends[n - 1]]


def test_pydoc_windows_with_a_tokenizer_are_per_character():
  data = text.load_text(data_config(vocab_size=ROWS))
  assert data.vocab_size == ROWS and data.vocab is None and data.train_tokens.dtype == np.int32
  assert data.test_tokens.max() < TOKENS and data.train_tokens.max() < TOKENS
  assert 'tokens of' in data.summary() and f'{ROWS:,} rows' in data.summary()
  # The held-out windows decode to the head of the held-out text; tokens_per_char is their tokens over its length.
  tail = text.pydoc_text()[-int(round(len(text.pydoc_text()) * 0.1)):]
  covered = data.decode(data.test_tokens.reshape(-1))
  assert tail.startswith(covered) and len(covered) > 0.9 * len(tail)
  assert data.tokens_per_char == pytest.approx(data.test_tokens.size / len(covered), rel=1e-12)
  assert 0.3 < data.tokens_per_char < 0.9  # A BPE: fewer tokens than characters.
  assert text.load_text(data_config()).vocab_size == TOKENS  # vocab_size 0: the tokenizer's own.


def test_rows_past_the_tokenizer_decode_as_replacement_characters():
  data = text.load_text(data_config(vocab_size=ROWS))
  ids = data.encode('abc def')
  assert data.decode(np.concatenate([ids, [TOKENS, ROWS - 1], ids])) == 'abc def\ufffd\ufffdabc def'
  with pytest.raises(DataError, match=r'outside the vocabulary \[0, 400\)'):
    data.decode([ROWS])


def test_bad_tokenizer_settings_are_refused_in_one_line(tmp_path, monkeypatch):
  cases = [
      (dict(tokenizer=''), "needs config.data.tokenizer"),
      (dict(tokenizer=str(tmp_path)), 'is a folder without tokenizer.json'),
      (dict(tokenizer=str(tmp_path / 'nothing.json')), 'does not exist'),
      (dict(vocab_size=100), r'config.data.vocab_size=100 is below the 384 tokens'),
      (dict(vocab_size=-1), r'config.data.vocab_size=-1 must be an integer >= 0'),
      (dict(vocab='char', vocab_size=400), r"vocab_size=400 rounds up a tokenizer's vocabulary"),
  ]
  for fields, match in cases:
    with pytest.raises(DataError, match=match):
      text.load_text(data_config(**fields))
  broken = tmp_path / 'tokenizer.json'
  broken.write_text('{"model": ')
  with pytest.raises(DataError, match=r'is not a tokenizer.json that `tokenizers` reads'):
    text.load_text(data_config(tokenizer=str(broken)))
  monkeypatch.setitem(sys.modules, 'tokenizers', None)  # As if the `hf` extra were not installed.
  with pytest.raises(DataError, match=r'uv sync --extra hf'):
    text.load_text(data_config())


def test_a_checkpoint_with_fewer_rows_than_its_data_tokenizer_is_refused(tmp_path):
  """configs/text_hf.py sets data.vocab_size to the checkpoint's vocab_size: a checkpoint smaller than the
  tokenizer it names is refused when the data loads, before any model is built."""
  config = helpers.shipped_config('text_hf.py', data__vocab_size=TOKENS - 1)
  with pytest.raises(DataError, match='is below the 384 tokens'):
    text.load_text(config.data)


def test_a_zero_embedding_row_stays_zero_in_the_block_wise_target():
  """torch keeps a padding token's row at zero (the fixture's <pad>, id 0): ar_dblock's normalised table must keep
  it zero with a zero gradient, not turn the whole loss NaN."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.models import hf_checkpoint  # pylint: disable=g-import-not-at-top
  from diffblocks_jax.tasks import autoregressive  # pylint: disable=g-import-not-at-top
  embed = hf_checkpoint.SafetensorsFolder(FOLDER).array('model.embed_tokens.weight')
  assert embed.shape == (ROWS, 16) and not embed[0].any() and np.all(np.linalg.norm(embed[1:], axis=-1) > 0)
  table_of = lambda t: types.SimpleNamespace(outer=lambda _: types.SimpleNamespace(embedding_table=lambda: t),
                                             block=lambda b: b)
  loss = lambda t: autoregressive.normalised_table(table_of(t), 0).sum()
  normalised = autoregressive.normalised_table(table_of(jnp.asarray(embed)), 0)
  np.testing.assert_allclose(np.linalg.norm(normalised[1:], axis=-1), 1.0, rtol=1e-6)
  assert not np.asarray(normalised[0]).any()
  grad = np.asarray(jax.grad(loss)(jnp.asarray(embed)))
  assert np.all(np.isfinite(grad)) and not grad[0].any()


@pytest.mark.slow
def test_a_checkpoint_fine_tunes_block_wise_on_its_tokenizers_ids(tmp_path):
  """configs/text_hf.py with the fixture (which has a tokenizer.json): the data is read with its tokenizer and 400
  rows, the Llama imports into ar_dblock, trains, evaluates per block and writes decodable samples."""
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text(text.pydoc_text()[:6_000], encoding='utf-8')
  config = helpers.shipped_config(
      'text_hf.py:,kind=ar_dblock,lam=0.1', data__source='text', data__path=str(corpus), data__seq_len=16,
      train__batch_size=16, train__steps_per_call=5, train__log_every_steps=5, train__eval_every_epochs=0.0,
      eval__batch_size=64, eval__num_samples=2)
  assert (config.data.vocab, config.data.vocab_size, config.train.init_from) == ('tokenizer', ROWS, f'hf:{FOLDER}')
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(config, workdir)
  assert all(np.isfinite(result[f'eval/ce_block{b}']) for b in range(config.model.num_blocks))
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert records[-1]['step'] > 0
  samples = os.listdir(os.path.join(workdir, 'samples'))
  assert samples and open(os.path.join(workdir, 'samples', samples[0]), encoding='utf-8').read().strip()


@pytest.mark.slow
def test_cli_refuses_a_checkpoint_smaller_than_its_tokenizer_and_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  out = helpers.run_cli('--config=configs/text_hf.py', f'--workdir={workdir}', f'--config.data.vocab_size={TOKENS - 1}')
  assert out.returncode == 2, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert 'config.data.vocab_size=383 is below the 384 tokens of' in last and 'tokenizer.json' in last, last
  assert 'Traceback' not in out.stderr and not workdir.exists()
