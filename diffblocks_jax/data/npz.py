"""Reading a .npz of plain arrays, with every way the file can be wrong named by its path.

Used by the 'npz' data source and by the checkpoint importer (`import_torch`). Pickled object arrays are
refused: unpickling a file can run code.
"""

from __future__ import annotations

import os
import zipfile
import zlib

import numpy as np

# A .npz is a zip archive; these are the signatures a zip can start with (a local file header, or the end
# record of an empty archive). Anything else is not a .npz, whatever its name says.
_ZIP_MAGIC = (b'PK\x03\x04', b'PK\x05\x06')


def read(path: str, *, error=ValueError, what: str | None = None) -> dict[str, np.ndarray]:
  """Every array of the .npz at `path`, by name; any problem raises `error` naming the file and the fix.

  `what` names the file in messages, e.g. the setting it came from (default: the path).
  """
  what = what or path
  if not os.path.isfile(path):
    raise error(f'{what} is not a file')
  if os.path.getsize(path) == 0:
    raise error(f'{what} is empty (0 bytes): an interrupted copy or save? Write or copy it again')
  with open(path, 'rb') as f:
    head = f.read(4)
  if head not in _ZIP_MAGIC:
    raise error(f'{what} is not a .npz (a zip archive of .npy arrays): it starts with {head!r}. Save it with '
                'np.savez(path, name=array, ...)')
  try:
    with np.load(path, allow_pickle=False) as f:
      return {key: _array(f, key, what, error) for key in f.files}
  except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
    raise error(f'{what} is truncated or damaged ({type(e).__name__}: {e}); write or copy it again') from e


def _array(f, key: str, what: str, error) -> np.ndarray:
  try:
    return f[key]
  except ValueError as e:
    if 'allow_pickle' in str(e):  # NumPy's words for an object array.
      raise error(f'{what}: array {key!r} holds pickled Python objects, which are refused (unpickling can run '
                  'code); save plain numeric arrays, e.g. np.asarray(x, np.float32)') from e
    raise error(f'{what}: array {key!r} is unreadable ({e}); write or copy the file again') from e
