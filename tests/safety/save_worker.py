"""Saves run in children forked from a forkserver that preloads this module (imports done, JAX not
started), so that each killed or racing save costs a fork rather than a Python start.

`save(...)` is the child's body: it unpickles `(model, params)` written by the test, may arrange to
SIGKILL itself at a named step of the save (or to hold the lock a while), and exits with SAVED,
REFUSED (FileExistsError) or FAILED.
"""

import os
import pickle
import signal
import time
import traceback

import orbax.checkpoint as ocp

import flax_adapters as fa
from flax_adapters import atomic

SAVED, REFUSED, FAILED = 0, 3, 4
# Steps of a save where a kill is tried (see flax_adapters.atomic._stage), plus 'during': inside
# orbax's write, after the params are written and before the metadata is.
STAGES = ('locked', 'during', 'written', 'synced', 'aside', 'swapped')


def _die(*args, **kwargs):
  os.kill(os.getpid(), signal.SIGKILL)


def save(
  job: str, directory: str, overwrite: bool, kill_at: str | None, exchange: bool, start=None, hold: float = 0.0
) -> None:
  with open(job, 'rb') as f:
    model, params = pickle.load(f)
  if not exchange:  # as on a file system without renameat2(RENAME_EXCHANGE): rename aside, then in
    atomic._exchange = lambda a, b: False
  if kill_at == 'during':
    ocp.handlers.JsonCheckpointHandler._save_fn = _die
  elif kill_at is not None:
    atomic._stage = lambda name: _die() if name == kill_at else None
  elif hold:  # keep the lock a while, so that the other writer surely waits for it
    atomic._stage = lambda name: time.sleep(hold) if name == 'locked' else None
  if start is not None:
    start.wait(30)  # racing writers start together
  try:
    fa.save_adapters(directory, model, params, overwrite=overwrite)
  except FileExistsError:
    os._exit(REFUSED)
  except BaseException:
    traceback.print_exc()
    os._exit(FAILED)
  os._exit(SAVED)
