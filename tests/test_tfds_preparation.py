"""Preparing TFDS data: the real download → prepare → train path on a tiny CIFAR-100 archive, and offline
failures that are fast, name their cause first and leave nothing half-made behind.

Nothing here touches the network: the one function TFDS opens URLs with is replaced by a stand-in that serves
a local archive, and the host probe by one that answers as told.
"""

from __future__ import annotations

import io
import pathlib
import socket
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest

from diffblocks_jax.training import checkpointing
from diffblocks_jax.data import input_pipeline as ip
from diffblocks_jax.data import tfds_preparation
from diffblocks_jax.data.dataset import DataError
from helpers import HANG_GUARD_S, ROOT, run_cli, subprocess_env, tiny_config

CIFAR100_URL = 'https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz'


def _cifar100_archive(path: pathlib.Path, num_train: int, num_test: int, seed: int = 0) -> dict[str, np.ndarray]:
  """`cifar-100-binary.tar.gz` as the installed TFDS builder reads it (image_classification/cifar.py): under
  cifar-100-binary/, train.bin and test.bin of records [coarse label, fine label, 3072 bytes of CHW image], and
  the label-name files. Returns the images (NHWC) and fine labels written."""
  rng = np.random.default_rng(seed)
  written, members = {}, {}
  for split, n in (('train', num_train), ('test', num_test)):
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    fine = rng.integers(0, 100, n).astype(np.uint8)
    records = np.concatenate([(fine // 5)[:, None], fine[:, None], images.transpose(0, 3, 1, 2).reshape(n, -1)], 1)
    members[f'{split}.bin'] = records.astype(np.uint8).tobytes()
    written[f'{split}_images'], written[f'{split}_labels'] = images, fine.astype(np.int32)
  members['coarse_label_names.txt'] = '\n'.join(f'coarse{i}' for i in range(20)).encode()
  members['fine_label_names.txt'] = '\n'.join(f'fine{i}' for i in range(100)).encode()
  with tarfile.open(path, 'w:gz') as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(f'cifar-100-binary/{name}')
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return written


# Runs in a subprocess so that TensorFlow (which the CIFAR builder prepares with) stays out of the test process.
_PREPARE = """
import contextlib, hashlib, sys
import numpy as np
from tensorflow_datasets.core.download import checksums, downloader
from tensorflow_datasets.image_classification import cifar
from diffblocks_jax import config
from diffblocks_jax.data import input_pipeline, tfds_preparation

archive, data_dir, out = sys.argv[1:]
URL = %r
blob = open(archive, 'rb').read()

class Response:  # What TFDS reads of a `requests` response.
  url, headers = URL, {'Content-length': str(len(blob))}

@contextlib.contextmanager
def serve(url, **kwargs):  # The stand-in for the network: TFDS's one function that opens a URL.
  assert url == URL, url
  yield Response(), (blob[i:i + 4096] for i in range(0, len(blob), 4096))

downloader._open_url = serve
tfds_preparation.unreachable_hosts = lambda urls, **kwargs: []  # The host answers.
# TFDS checks every download against its registered size and SHA-256: register the tiny archive's.
cifar.Cifar100.url_infos = {URL: checksums.UrlInfo(size=len(blob), checksum=hashlib.sha256(blob).hexdigest(),
                                                   filename='cifar-100-binary.tar.gz')}
d = config.get_base_config().data
d.name, d.tfds_data_dir = 'cifar100', data_dir
data = input_pipeline.load_dataset(d)  # Not prepared: downloads (the stand-in), extracts, prepares, reads.
np.savez(out, train_images=data.train_images, train_labels=data.train_labels, test_images=data.test_images,
         test_labels=data.test_labels, num_classes=data.num_classes)
""" % CIFAR100_URL


@pytest.mark.long  # Time budget.
@pytest.mark.slow
def test_download_prepare_and_train_from_a_tiny_cifar100_archive(tmp_path):
  archive, data_dir, workdir = tmp_path / 'cifar-100-binary.tar.gz', tmp_path / 'tfds', tmp_path / 'run'
  written = _cifar100_archive(archive, num_train=16, num_test=8)
  prepared = subprocess.run([sys.executable, '-c', _PREPARE, str(archive), str(data_dir), str(tmp_path / 'read.npz')],
                            cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert prepared.returncode == 0, prepared.stderr[-3000:]
  read = np.load(tmp_path / 'read.npz')
  assert int(read['num_classes']) == 100
  for split in ('train', 'test'):  # The same (image, label) pairs, images HWC; TFDS shuffles the order.
    pairs = lambda images, labels: sorted((x.tobytes(), int(y)) for x, y in zip(images, labels))
    assert pairs(read[f'{split}_images'], read[f'{split}_labels']) == pairs(written[f'{split}_images'],
                                                                          written[f'{split}_labels']), split
  assert list((data_dir / 'cifar100' / '3.0.2').glob('*.array_record*'))
  # The CLI trains from the prepared files, offline (no download allowed): 16 images, batch 8, two steps.
  train = run_cli('--config=configs/testing.py:dblock', f'--workdir={workdir}', '--config.data.name=cifar100',
                  f'--config.data.tfds_data_dir={data_dir}', '--config.data.tfds_download=False',
                  '--config.train.scale_epochs_by_blocks=False', '--config.eval.batch_size=8')
  assert train.returncode == 0, train.stderr[-3000:]
  assert 'Data: cifar100: 16 training images' in train.stderr and '32x32x3' in train.stderr, train.stderr[-3000:]
  assert checkpointing.Checkpointer(workdir / 'checkpoints').all_steps()[-1] == 2


def _listing(root: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(root)) for p in root.rglob('*'))


def _offline(monkeypatch):
  """No DNS for anyone; TFDS's downloads fail at once (as after its ~3.5 min of retries)."""
  from tensorflow_datasets.core.download import downloader

  def no_dns(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known')

  def no_download(url, **kwargs):
    raise ConnectionError(f'Max retries exceeded with url: {url}')

  monkeypatch.setattr(socket, 'create_connection', no_dns)
  monkeypatch.setattr(downloader, '_open_url', no_download)


def _cifar100_config(data_dir):
  """The data section of a tiny CIFAR-100 config reading (or preparing) TFDS data in `data_dir`."""
  return tiny_config(data='cifar', data__tfds_data_dir=str(data_dir)).data


def test_offline_fails_fast_naming_the_host_first_and_creates_nothing(tmp_path, monkeypatch):
  _offline(monkeypatch)
  # Fast means no network wait: every call fails at once here, so the message (the host, first) is the check.
  with pytest.raises(DataError) as e:
    ip.load_dataset(_cifar100_config(tmp_path / 'new' / 'tfds'))
  first_line = str(e.value).splitlines()[0]
  assert first_line.startswith("Cannot prepare TFDS dataset 'cifar100': no network connection to "
                               'www.cs.toronto.edu:443 (gaierror'), first_line
  assert CIFAR100_URL in first_line and 'tfds_data_dir' in str(e.value)
  assert not (tmp_path / 'new').exists()


def test_failed_download_removes_only_what_it_created(tmp_path, monkeypatch):
  _offline(monkeypatch)
  monkeypatch.setattr(tfds_preparation, 'unreachable_hosts', lambda urls, **kwargs: [])  # Probe passes, then
  data_dir = tmp_path / 'tfds'  # the download fails: TFDS has made folders by then.
  for kept in ('mnist/3.0.1/mnist-train.array_record-00000-of-00001', 'downloads/extracted/keep.txt',
               'downloads/cifar100/partial_from_before.tmp'):
    (data_dir / kept).parent.mkdir(parents=True, exist_ok=True)
    (data_dir / kept).write_text('was here before')
  before = _listing(data_dir)
  with pytest.raises(DataError, match='download_and_prepare failed: ConnectionError') as e:
    ip.load_dataset(_cifar100_config(data_dir))
  assert str(e.value).startswith("Cannot prepare TFDS dataset 'cifar100': download_and_prepare failed")
  assert _listing(data_dir) == before
  assert (data_dir / 'downloads/cifar100/partial_from_before.tmp').read_text() == 'was here before'


@pytest.mark.parametrize('step', ['url_infos', 'download_and_prepare'])
def test_a_missing_module_is_named_not_the_network(tmp_path, monkeypatch, step):
  import tensorflow_datasets as tfds
  monkeypatch.setattr(tfds_preparation, 'unreachable_hosts', lambda urls, **kwargs: [])

  def broken_install(*args, **kwargs):  # As TFDS fails without importlib_resources (DatasetBuilder.code_path).
    raise ModuleNotFoundError("No module named 'importlib_resources'", name='importlib_resources')

  monkeypatch.setattr(tfds.core.DatasetBuilder, step,
                      property(broken_install) if step == 'url_infos' else broken_install)
  with pytest.raises(DataError) as e:
    ip.load_dataset(_cifar100_config(tmp_path / 'tfds'))
  assert "needs the Python module 'importlib_resources', which is not installed" in str(e.value)
  assert 'internet' not in str(e.value)


def test_tfds_preparation_modules_are_installed():
  # TFDS imports importlib_resources lazily when it prepares (DatasetBuilder.code_path), and declares it only
  # for Python < 3.9; without it every first run fails. It must come with the project's dependencies.
  import importlib_resources  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel


def test_probe_names_silent_hosts_and_proxies(monkeypatch):
  targets, hang = [], threading.Event()

  def connect(target, timeout=None):
    targets.append(target)
    if target[0] == 'silent.example':
      hang.wait(HANG_GUARD_S)  # A blackholed network: no answer, not even a refusal, until the test ends.
    raise ConnectionRefusedError(111, 'Connection refused')

  monkeypatch.setattr(socket, 'create_connection', connect)
  for var in ('https_proxy', 'HTTPS_PROXY', 'no_proxy', 'NO_PROXY', 'http_proxy', 'HTTP_PROXY'):
    monkeypatch.delenv(var, raising=False)
  # 'no answer within 0.5 s' below proves the probe returned while the silent host still hung.
  found = tfds_preparation.unreachable_hosts(['https://silent.example/a.tgz', 'http://refusing.example:8080/b'],
                                             timeout_s=0.5)
  hang.set()
  assert sorted(found) == ['refusing.example:8080 (ConnectionRefusedError: [Errno 111] Connection refused)',
                           'silent.example:443 (no answer within 0.5 s)']
  monkeypatch.setenv('HTTPS_PROXY', 'http://proxy.example:3128')
  targets.clear()
  found = tfds_preparation.unreachable_hosts(['https://www.cs.toronto.edu/x.tgz'], timeout_s=0.5)
  assert targets == [('proxy.example', 3128)]
  assert found == ['the proxy proxy.example:3128 (for www.cs.toronto.edu) (ConnectionRefusedError: [Errno 111] '
                   'Connection refused)']
