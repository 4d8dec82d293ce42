"""Saves that never lose the previous checkpoint, and racing saves that never mix.

Each save runs in a child process forked from a forkserver that has imported flax_adapters
(`save_worker.py`), so a kill or a race costs a fork, not a Python start.
"""

import multiprocessing
import os
import pickle
import random
import time

import jax
import numpy as np
import pytest
from flax import traverse_util

import flax_adapters as fa
from tests.core import testnet as net
from tests.core.helpers import config, perturb
from tests.safety import save_worker

KILLS = 24  # at least 20 kills, as the issue asks
ROUNDS = 10


@pytest.fixture(scope='module')
def ctx():
  context = multiprocessing.get_context('forkserver')
  context.set_forkserver_preload(['tests.safety.save_worker'])
  return context


@pytest.fixture(scope='module')
def trees(tmp_path_factory):
  """One prepared model and two trained versions of its adapters (the old and the new save)."""
  model, params, x = net.make()
  adapted, p = fa.prepare_for_transfer(model, params, config('lora'), x)
  versions = [jax.tree.map(np.asarray, perturb(p, jax.random.key(i))) for i in (1, 2)]
  jobs = []
  for i, version in enumerate(versions):
    job = tmp_path_factory.mktemp('jobs') / f'job{i}.pkl'
    job.write_bytes(pickle.dumps((adapted, version)))
    jobs.append(str(job))
  return adapted, p, versions, jobs


def _run(ctx, *args, start=None, hold=0.0):
  proc = ctx.Process(target=save_worker.save, args=(*args, start, hold))
  proc.start()
  return proc


def _which(path, adapted, p, versions):
  """Which version the checkpoint at `path` holds: 0 or 1 (a mix or anything else fails the test)."""
  loaded = traverse_util.flatten_dict(fa.load_adapters(path, adapted, p))
  for i, version in enumerate(versions):
    flat = traverse_util.flatten_dict(version)
    if all(np.array_equal(np.asarray(loaded[k]), flat[k]) for k in flat if k[-1] in fa.methods.LEAF_NAMES):
      return i
  raise AssertionError(f'{path} holds neither version: a mix')


def _leftovers(directory):
  return sorted(n for n in os.listdir(directory) if n.startswith('.ckpt.') and not n.endswith('-lock'))


def test_a_killed_overwrite_always_leaves_the_old_or_the_new_checkpoint(ctx, trees, tmp_path):
  """A save with overwrite=True, killed at every step (and at random times), >= 20 kills."""
  adapted, p, versions, jobs = trees
  path = str(tmp_path / 'ckpt')
  fa.save_adapters(path, adapted, versions[0])
  # (step, exchange): the expected survivor is the old (0) before the swap, the new (1) after it.
  steps = [(s, ex) for ex in (True, False) for s in save_worker.STAGES if ex is False or s != 'aside']
  expected = {'locked': 0, 'during': 0, 'written': 0, 'synced': 0, 'aside': 1, 'swapped': 1}
  rng = random.Random(0)
  # Random kills land inside the save: their times are drawn within the duration of a whole save
  # (fork, unpickle, write, swap) on this machine, measured here and updated by each save that finishes.
  began = time.monotonic()
  proc = _run(ctx, jobs[1], path, True, None, True)
  proc.join(60)
  assert proc.exitcode == save_worker.SAVED
  duration = time.monotonic() - began
  kills = attempts = 0
  while kills < KILLS and attempts < 6 * KILLS:
    current = _which(path, adapted, p, versions)
    new = 1 - current
    if attempts < len(steps):
      stage, exchange = steps[attempts]
      proc = _run(ctx, jobs[new], path, True, stage, exchange)
      proc.join(60)
      assert proc.exitcode == -9, f'{stage}: exit {proc.exitcode}'
      survivor = _which(path, adapted, p, versions)  # loads: finishes a swap killed between renames
      assert survivor == (new if expected[stage] else current), (stage, exchange)
    else:  # a kill at a random moment of the save
      began = time.monotonic()
      proc = _run(ctx, jobs[new], path, True, None, rng.random() < 0.5)
      proc.join(rng.uniform(0.1, 0.9) * duration)
      if proc.exitcode is None:
        proc.kill()
      proc.join(60)
      if proc.exitcode == save_worker.SAVED:  # it finished first: kill earlier next time
        duration = min(duration, time.monotonic() - began)
      assert proc.exitcode in (-9, save_worker.SAVED)
      assert _which(path, adapted, p, versions) in (current, new)
    kills += proc.exitcode == -9
    attempts += 1
  assert kills >= 20
  # The next save removes what the killed ones left behind (hidden temporary directories).
  fa.save_adapters(path, adapted, versions[0], overwrite=True)
  assert _leftovers(tmp_path) == []
  assert _which(path, adapted, p, versions) == 0


def test_a_killed_first_save_leaves_nothing_or_the_checkpoint(ctx, trees, tmp_path):
  adapted, p, versions, jobs = trees
  for stage in ('during', 'synced', 'swapped'):
    path = str(tmp_path / stage)
    proc = _run(ctx, jobs[0], path, False, stage, True)
    proc.join(60)
    assert proc.exitcode == -9
    if stage == 'swapped':
      assert _which(path, adapted, p, versions) == 0
    else:
      with pytest.raises(FileNotFoundError, match='only an unfinished save was found there'):
        fa.read_meta(path)


@pytest.mark.parametrize('overwrite', [False, True])
def test_racing_writers_never_mix_and_learn_whether_they_won(ctx, trees, tmp_path, overwrite):
  """10 rounds of two writers saving to one new path at the same moment."""
  adapted, p, versions, jobs = trees
  for round_ in range(ROUNDS):
    path = str(tmp_path / f'round{round_}')
    start = ctx.Event()
    # In odd rounds the lock is held 0.3 s: both writers pass the early existence check and queue.
    hold = 0.3 * (round_ % 2)
    procs = [_run(ctx, jobs[i], path, overwrite, None, True, start=start, hold=hold) for i in (0, 1)]
    start.set()
    for proc in procs:
      proc.join(120)
    codes = [proc.exitcode for proc in procs]
    holds = _which(path, adapted, p, versions)
    if overwrite:
      assert codes == [save_worker.SAVED] * 2, codes  # both saved, one after the other
    else:
      # Exactly one wins; the other is told the path exists, and the checkpoint is the winner's.
      assert sorted(codes) == [save_worker.SAVED, save_worker.REFUSED], codes
      assert codes[holds] == save_worker.SAVED
    assert _leftovers(tmp_path) == []
