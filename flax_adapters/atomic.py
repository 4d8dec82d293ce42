"""Directories written whole or not at all, by one writer at a time, from one or many JAX processes.

`commit(directory, overwrite, write, refusal, is_complete)` fills a unique hidden sibling,
`.<name>.flax-adapters-tmp-<id>`, with `write(tmp)`, fsyncs it, and swaps it in: one atomic
exchange of the two directories where the OS offers it (Linux `renameat2(RENAME_EXCHANGE)`), else
the old is renamed aside, the new renamed in, the old deleted. A commit killed between those two
renames is finished by `recover` (the next commit or read of that path), so the path always holds
the old directory or the new one. Writers of one path take turns on a lock file,
`.<name>.flax-adapters-lock`. With several JAX processes every process calls `commit`; process 0
holds the lock, decides and swaps, and the others follow its decision.

`checkpoint.py` uses it for adapter checkpoints; the format-specific questions (may this path be
replaced? is that directory complete?) are its callbacks.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable

import numpy as np

try:
  import fcntl
except ImportError:  # not POSIX: no queue, but saves never mix and a racing loser still learns it lost
  fcntl = None

TMP, OLD, LOCK = '.flax-adapters-tmp-', '.flax-adapters-old-', '.flax-adapters-lock'


# -- several JAX processes ----------------------------------------------------------------------


def multiprocess() -> bool:
  import jax  # pylint: disable=g-import-not-at-top

  return jax.process_count() > 1


def is_primary() -> bool:
  import jax  # pylint: disable=g-import-not-at-top

  return jax.process_index() == 0


def _broadcast_text(text: str) -> str:
  """Process 0's `text` on every process (as a fixed-size array, through JAX's collectives)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  data = np.frombuffer(text.encode()[:4096], np.uint8)
  buffer = np.zeros(4100, np.int32)
  buffer[0], buffer[1 : 1 + data.size] = data.size, data
  out = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
  return bytes(out[1 : 1 + int(out[0])].astype(np.uint8)).decode(errors='replace')


def _barrier(name: str) -> None:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  multihost_utils.sync_global_devices(name)


# -- writing a directory atomically ----------------------------------------------------------


def _sibling(directory: str, kind: str, uid: str = '') -> str:
  parent, name = os.path.split(directory)
  return os.path.join(parent, f'.{name}{kind}{uid}')


def _stage(name: str) -> None:
  """Marks the steps of a save (tests kill the process here to check that nothing is lost)."""


def _fsync(path: str) -> None:
  if os.name == 'nt' and os.path.isdir(path):
    return  # Windows cannot open a directory to sync it
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  except OSError as e:  # some file systems cannot fsync a directory
    if e.errno not in (errno.EINVAL, errno.EBADF, errno.EACCES):
      raise
  finally:
    os.close(fd)


def _fsync_tree(root: str) -> None:
  for path, _dirs, files in os.walk(root):
    for name in files:
      _fsync(os.path.join(path, name))
    _fsync(path)


_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
  """Swap two paths in one atomic step (Linux renameat2); False where the OS or file system cannot."""
  if not sys.platform.startswith('linux'):
    return False
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (AttributeError, OSError):
    return False
  at_fdcwd = -100
  if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  code = ctypes.get_errno()
  if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
    return False
  raise OSError(code, f'exchanging {a!r} and {b!r}: {os.strerror(code)}')


def _swap_in(new: str, directory: str, uid: str, overwrite: bool) -> None:
  """Put the complete directory `new` at `directory`; the previous one (if any) is deleted after."""
  parent = os.path.dirname(directory)
  if not overwrite and os.path.lexists(directory):  # only where no lock serialises the writers
    raise FileExistsError(f'`directory` {directory!r} was written by another save meanwhile; this one is dropped.')
  if not os.path.lexists(directory):
    os.rename(new, directory)
    _stage('swapped')
  elif _exchange(new, directory):
    _fsync(parent)
    _stage('swapped')
    shutil.rmtree(new)  # now the old checkpoint
  else:
    old = _sibling(directory, OLD, uid)
    os.rename(directory, old)
    _fsync(parent)
    _stage('aside')  # killed here: _recover moves the new one in
    os.rename(new, directory)
    _fsync(parent)
    _stage('swapped')
    shutil.rmtree(old)
  _fsync(parent)


def leftovers(directory: str, kind: str) -> list[str]:
  """What saves of `directory` killed midway left beside it (a `kind` of sibling, orbax's own included)."""
  parent, name = os.path.split(directory)
  ours = re.compile(rf'\.{re.escape(name)}{re.escape(kind)}[0-9a-f]{{32}}(\.orbax-checkpoint-tmp.*)?')
  try:
    return sorted(os.path.join(parent, n) for n in os.listdir(parent) if ours.fullmatch(n))
  except FileNotFoundError:
    return []


def recover(directory: str, is_complete: Callable[[str], bool]) -> None:
  """Finish a swap that a killed save left between its two renames (the path is then empty)."""
  if os.path.lexists(directory):
    return
  for old in leftovers(directory, OLD):
    uid = os.path.basename(old)[-32:]
    new = _sibling(directory, TMP, uid)
    # The new one was complete and synced before the old one was moved aside.
    os.rename(new if is_complete(new) else old, directory)
    _fsync(os.path.dirname(directory))
    return


def _remove_leftovers(directory: str) -> None:
  """Temporary directories of killed saves of this path (only the lock holder calls this)."""
  for path in leftovers(directory, TMP) + leftovers(directory, OLD):
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def locked(directory: str):
  """Exclusive use of the path `directory` among flax_adapters saves (a lock file beside it)."""
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  fd = os.open(_sibling(directory, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    if fcntl is not None:
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # releases the lock


def raise_refusal(refusal: str) -> None:
  """Raise the exception a refusal (`'Kind:message'`) names."""
  kind, message = refusal.split(':', 1)
  raise {'FileExistsError': FileExistsError, 'ValueError': ValueError, 'OSError': OSError}[kind](message)


def commit(
  directory: str,
  overwrite: bool,
  write: Callable[[str], None],
  refusal: Callable[[str, bool], str],
  is_complete: Callable[[str], bool],
) -> None:
  """Run `write(tmp)` to fill a fresh temporary directory, then swap it in at `directory`.

  `refusal(directory, overwrite)` says why `directory` may not be written ('' if it may), as
  `'ExceptionName:message'`; `is_complete(path)` whether a directory is a complete one (to finish
  a killed swap). Every JAX process runs this; process 0 holds the lock, decides and swaps.
  """
  primary, multi = is_primary(), multiprocess()
  with contextlib.ExitStack() as stack:
    refusal_of, refusal, uid = refusal, '', uuid.uuid4().hex
    if primary:
      try:
        stack.enter_context(locked(directory))
        recover(directory, is_complete)
        refusal = refusal_of(directory, overwrite)
        if not refusal and fcntl is not None:  # without a lock, a leftover may be a live save's
          _remove_leftovers(directory)
      except OSError as e:
        if not multi:
          raise
        refusal = f'OSError:process 0 cannot save to {directory!r}: {e}'  # the others must not wait for it
    if multi:
      refusal, uid = _broadcast_text(refusal), _broadcast_text(uid)
    if refusal:
      raise_refusal(refusal)
    tmp = _sibling(directory, TMP, uid)
    _stage('locked')
    try:
      write(tmp)
      _stage('written')
      if primary:
        _fsync_tree(tmp)
        _stage('synced')
        _swap_in(tmp, directory, uid, overwrite)
    except BaseException:
      if primary:
        shutil.rmtree(tmp, ignore_errors=True)
      raise
    if multi:
      _barrier(f'flax_adapters.atomic.commit:{uid}')
