"""Adapter checkpoints: save only what trained, load it onto a freshly prepared model.

A checkpoint is an orbax directory with two items: `params`, the trained leaves alone (adapters,
heads, unfrozen norms, ...), and `meta`, JSON with the `TransferConfig`, the adapter plan and a
fingerprint of the base tree (paths, shapes, dtypes, plus a cheap digest of the frozen values).
Loading onto a model whose base differs is refused with the difference named.

A save never loses the previous checkpoint, and never writes over anything else:

- it writes a complete checkpoint under a unique hidden sibling, `.<name>.flax-adapters-tmp-<id>`,
  and fsyncs it;
- then swaps it in: one atomic exchange of the two directories where the OS offers it (Linux
  `renameat2(RENAME_EXCHANGE)`), else the old is renamed aside, the new renamed in, the old deleted.
  A save killed between those two renames is finished by the next `read_meta`/`load_adapters`/save
  of that path, so the path always holds the old checkpoint or the new one;
- writers to one path take turns on a lock file, `.<name>.flax-adapters-lock`; the second of two
  racing saves without `overwrite` finds the first one's checkpoint and gets `FileExistsError`;
- `overwrite=True` replaces only a directory that is recognisably a flax_adapters checkpoint.

With several JAX processes (`jax.distributed`), every process calls `save_adapters`; process 0
decides, locks and swaps, and the others follow its decision.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from flax_adapters import methods as methods_lib
from flax_adapters.config import TransferConfig
from flax_adapters.forward import AdaptedModel, Trainable, check_adapter_leaves
from flax_adapters.training import trainable_mask

try:
  import fcntl
except ImportError:  # not POSIX: no queue, but saves never mix and a racing loser still learns it lost
  fcntl = None

FORMAT = 'flax_adapters.adapter_checkpoint/1'
# What a save writes at the top of a checkpoint directory: orbax's items, and its bookkeeping files
# (named with a leading underscore, e.g. _CHECKPOINT_METADATA, plus commit_success.txt).
CHECKPOINT_ENTRIES = frozenset({'params', 'meta', 'commit_success.txt'})
_TMP, _OLD, _LOCK = '.flax-adapters-tmp-', '.flax-adapters-old-', '.flax-adapters-lock'


# -- config and plan as JSON -----------------------------------------------------------------


def _jsonable(value):
  if isinstance(value, re.Pattern):
    return 're:' + value.pattern
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if value is not None and not isinstance(value, (str, int, float, bool)):
    return str(jnp.dtype(value))
  return value


def config_to_json(config: TransferConfig) -> dict[str, Any]:
  """The config as JSON-able data (`config_from_json` inverts it)."""
  return {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}


def config_from_json(data: dict[str, Any]) -> TransferConfig:
  return TransferConfig(**data)


def plan_to_json(model: AdaptedModel) -> list[dict[str, Any]]:
  return [{'path': list(e.site.path), 'methods': [_jsonable(m.to_json()) for m in e.methods]} for e in model.plan]


def trainable_to_json(trainable: Trainable) -> dict[str, Any]:
  return {
    'everything': trainable.everything,
    **{f: [list(p) for p in getattr(trainable, f)] for f in ('heads', 'norms', 'others')},
  }


def trainable_from_json(data: dict[str, Any]) -> Trainable:
  return Trainable(
    everything=data['everything'], **{f: tuple(tuple(p) for p in data[f]) for f in ('heads', 'norms', 'others')}
  )


# -- several JAX processes ----------------------------------------------------------------------


def _multiprocess() -> bool:
  return jax.process_count() > 1


def _is_primary() -> bool:
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


def _host_value(leaf) -> np.ndarray:
  """The whole value of a leaf on this host; a leaf sharded over several processes is gathered."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
  return np.asarray(jax.device_get(leaf))


# -- fingerprint of the base -----------------------------------------------------------------


def _digest(leaf) -> list[float]:
  """Sum and position-weighted sum of the finite values, and a count and weighted sum of the others.

  Cheap, it changes when any weight does, and a NaN or inf weight (a diverged or masked base)
  compares equal to itself, so such a base still restores its adapters.
  """
  x = np.asarray(_host_value(leaf), np.float64).ravel()
  w = np.cos(np.arange(x.size, dtype=np.float64))
  finite = np.isfinite(x)
  # Non-finite values as codes: 1 for NaN, 2 for +inf, 3 for -inf.
  codes = np.where(np.isnan(x), 1.0, np.where(x > 0, 2.0, 3.0)) * ~finite
  values = np.where(finite, x, 0.0)
  return [float(values.sum()), float(values @ w), float(codes.sum()), float(codes @ w)]


def _digest_v1(leaf) -> list[float]:
  """The digest of checkpoints saved before non-finite values were counted apart."""
  x = np.asarray(_host_value(leaf), np.float64).ravel()
  w = np.cos(np.arange(x.size, dtype=np.float64))
  return [float(x.sum()), float(x @ w)]


def _structure(params) -> list[tuple[str, tuple[int, ...], str]]:
  flat = traverse_util.flatten_dict(params)
  return sorted(
    ('/'.join(k), tuple(np.shape(v)), str(jnp.dtype(v.dtype)))
    for k, v in flat.items()
    if k[-1] not in methods_lib.LEAF_NAMES
  )


def base_fingerprint(model: AdaptedModel, params) -> dict[str, Any]:
  """Paths, shapes and dtypes of every non-adapter leaf, hashed; and a digest of the frozen values."""
  mask = traverse_util.flatten_dict(trainable_mask(model, params))
  flat = traverse_util.flatten_dict(params)
  structure = _structure(params)
  values = {'/'.join(k): _digest(v) for k, v in sorted(flat.items()) if not mask[k]}
  return {
    'structure_sha256': hashlib.sha256(repr(structure).encode()).hexdigest(),
    'structure': [list(s[:1]) + [list(s[1]), s[2]] for s in structure],
    'frozen_values': values,
  }


def _compare_fingerprints(saved, model: AdaptedModel, params, directory) -> None:
  current = base_fingerprint(model, params)
  if saved['structure_sha256'] != current['structure_sha256']:
    before = {s[0]: (tuple(s[1]), s[2]) for s in saved['structure']}
    now = {s[0]: (tuple(s[1]), s[2]) for s in current['structure']}
    diffs = [
      f'{k}: saved {before.get(k)}, now {now.get(k)}'
      for k in sorted(set(before) | set(now))
      if before.get(k) != now.get(k)
    ]
    raise ValueError(
      f'the adapter checkpoint at {directory!r} was trained on a different base model: '
      f'{len(diffs)} leaves differ ({"; ".join(diffs[:5])}{" ..." if len(diffs) > 5 else ""}). '
      'Load it onto the base it was trained on, prepared with the saved config.'
    )
  flat = {'/'.join(k): v for k, v in traverse_util.flatten_dict(params).items()}
  for key, digest in saved['frozen_values'].items():
    now = current['frozen_values'].get(key)
    if now is not None and len(digest) == 2:  # saved by an earlier version
      now = _digest_v1(flat[key])
    if now is None or not np.allclose(digest, now, rtol=1e-6, atol=1e-6, equal_nan=True):
      raise ValueError(
        f'the adapter checkpoint at {directory!r} was trained on different base weights: the frozen '
        f'leaf {key!r} does not match (saved digest {digest}, now {now}). Same architecture, other '
        'pretrained values: load the base checkpoint the adapters were trained on.'
      )


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
    old = _sibling(directory, _OLD, uid)
    os.rename(directory, old)
    _fsync(parent)
    _stage('aside')  # killed here: _recover moves the new one in
    os.rename(new, directory)
    _fsync(parent)
    _stage('swapped')
    shutil.rmtree(old)
  _fsync(parent)


def _leftovers(directory: str, kind: str) -> list[str]:
  """What saves of `directory` killed midway left beside it (a `kind` of sibling, orbax's own included)."""
  parent, name = os.path.split(directory)
  ours = re.compile(rf'\.{re.escape(name)}{re.escape(kind)}[0-9a-f]{{32}}(\.orbax-checkpoint-tmp.*)?')
  try:
    return sorted(os.path.join(parent, n) for n in os.listdir(parent) if ours.fullmatch(n))
  except FileNotFoundError:
    return []


def _recover(directory: str) -> None:
  """Finish a swap that a killed save left between its two renames (the path is then empty)."""
  if os.path.lexists(directory):
    return
  for old in _leftovers(directory, _OLD):
    uid = os.path.basename(old)[-32:]
    new = _sibling(directory, _TMP, uid)
    # The new one was complete and synced before the old one was moved aside.
    os.rename(new if _not_a_checkpoint(new) is None else old, directory)
    _fsync(os.path.dirname(directory))
    return


def _remove_leftovers(directory: str) -> None:
  """Temporary directories of killed saves of this path (only the lock holder calls this)."""
  for path in _leftovers(directory, _TMP) + _leftovers(directory, _OLD):
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _locked(directory: str):
  """Exclusive use of the path `directory` among flax_adapters saves (a lock file beside it)."""
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  fd = os.open(_sibling(directory, _LOCK), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    if fcntl is not None:
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # releases the lock


def _read_meta_file(directory: str):
  with open(os.path.join(directory, 'meta', 'metadata')) as f:
    return json.load(f)


def _not_a_checkpoint(directory: str) -> str | None:
  """None if `directory` is recognisably a complete flax_adapters checkpoint, else what it is instead."""
  if os.path.islink(directory):
    return 'a symbolic link'
  if not os.path.isdir(directory):
    return 'a file' if os.path.exists(directory) else 'missing'
  others = sorted(
    e
    for e in os.listdir(directory)
    if e not in CHECKPOINT_ENTRIES and not (e.startswith('_') and os.path.isfile(os.path.join(directory, e)))
  )
  if others:
    return f'a directory that holds {others[:5]}{" ..." if len(others) > 5 else ""}, which no save writes'
  try:
    meta = _read_meta_file(directory)
  except (OSError, ValueError):
    return 'a directory without readable flax_adapters metadata (meta/metadata)'
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    return f'a checkpoint of another format ({meta.get("format") if isinstance(meta, dict) else None!r})'
  return None


def _refusal(directory: str, overwrite: bool) -> str:
  """'' if a save may write `directory`; else the kind of error and why, as 'Kind:message'."""
  if not os.path.lexists(directory):
    return ''
  if not overwrite:
    return (
      f'FileExistsError:`directory` {directory!r} exists; pass overwrite=True to replace it (only a '
      'flax_adapters checkpoint can be replaced).'
    )
  what = _not_a_checkpoint(directory)
  if what is not None:
    return (
      f'ValueError:`overwrite=True` replaces only a flax_adapters adapter checkpoint, but `directory` '
      f'{directory!r} is {what}. Nothing was written; choose a new path, or remove it yourself if it is '
      'really meant to go.'
    )
  return ''


def _raise(refusal: str) -> None:
  kind, message = refusal.split(':', 1)
  raise {'FileExistsError': FileExistsError, 'ValueError': ValueError, 'OSError': OSError}[kind](message)


def _commit(directory: str, overwrite: bool, write) -> None:
  """Run `write(tmp)` to fill a fresh temporary directory, then swap it in at `directory`.

  Every JAX process runs this; process 0 holds the lock, decides and swaps.
  """
  primary, multi = _is_primary(), _multiprocess()
  with contextlib.ExitStack() as stack:
    refusal, uid = '', uuid.uuid4().hex
    if primary:
      try:
        stack.enter_context(_locked(directory))
        _recover(directory)
        refusal = _refusal(directory, overwrite)
        if not refusal and fcntl is not None:  # without a lock, a leftover may be a live save's
          _remove_leftovers(directory)
      except OSError as e:
        if not multi:
          raise
        refusal = f'OSError:process 0 cannot save to {directory!r}: {e}'  # the others must not wait for it
    if multi:
      refusal, uid = _broadcast_text(refusal), _broadcast_text(uid)
    if refusal:
      _raise(refusal)
    tmp = _sibling(directory, _TMP, uid)
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
      _barrier(f'flax_adapters.save_adapters:{uid}')


# -- save / load -----------------------------------------------------------------------------


def trained_leaves(model: AdaptedModel, params) -> dict:
  """The sub-tree of params that trains (what an adapter checkpoint holds)."""
  mask = traverse_util.flatten_dict(trainable_mask(model, params))
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if mask[k]})


def save_adapters(directory: str | os.PathLike, model: AdaptedModel, params, *, overwrite: bool = False) -> str:
  """Save the trained leaves of `params`, the config and the base fingerprint; returns the path.

  The save is atomic: `directory` holds the previous checkpoint until the new one is complete
  (see the module docstring). `overwrite=True` replaces an existing flax_adapters checkpoint and
  refuses anything else. With several JAX processes, call it from every process.

  Examples:
    >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn
    >>> import flax_adapters as fa
    >>> x = jnp.ones((2, 4))
    >>> net = nn.Dense(3, name='q_proj')
    >>> base = net.init(jax.random.key(0), x)['params']
    >>> model, p = fa.prepare_for_transfer(net, base, fa.TransferConfig(mode='ia3', ia3_targets=['re:.*']), x)
    >>> path = fa.save_adapters(tempfile.mkdtemp() + '/ckpt', model, p)
    >>> model2, p2 = fa.prepare_for_transfer(net, base, model.config, x)
    >>> restored = fa.load_adapters(path, model2, p2)
    >>> bool((restored['ia3_scale'] == p['ia3_scale']).all())
    True
  """
  if not isinstance(model, AdaptedModel):
    raise TypeError(f'`model` must be the AdaptedModel the params belong to, found {type(model).__name__}.')
  if not isinstance(overwrite, bool):
    raise TypeError(f'`overwrite` must be True or False, found {overwrite!r}.')
  directory = os.path.abspath(os.fspath(directory))
  if not _multiprocess():  # fail before any work (process 0 decides again under the lock)
    refusal = _refusal(directory, overwrite)
    if refusal:
      _raise(refusal)
  check_adapter_leaves(params, model)
  tree = trained_leaves(model, params)
  if not jax.tree.leaves(tree):
    raise ValueError(
      f'`params` hold nothing that trains for this model (no adapter leaves, heads, norms or '
      f'modules_to_save; trainable={model.trainable}), so an adapter checkpoint at {directory!r} would '
      'be empty. Add adapters or heads to train, or save the base params themselves.'
    )
  meta = {
    'format': FORMAT,
    'config': config_to_json(model.config) if model.config is not None else None,
    'plan': plan_to_json(model),
    'trainable': trainable_to_json(model.trainable),
    'base': base_fingerprint(model, params),
  }

  def write(tmp):
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      ckptr.save(tmp, ocp.args.Composite(params=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))

  _commit(directory, overwrite, write)
  return directory


def _damaged(directory: str, what: str, error: BaseException) -> ValueError:
  return ValueError(
    f'the adapter checkpoint at {directory!r} is damaged: its {what} cannot be read '
    f'({type(error).__name__}: {str(error)[:300]}). Save it again from the trained params, or restore a copy.'
  )


def _check_meta(meta, directory: str) -> dict:
  """The metadata's fields have the types load_adapters relies on."""
  expected = {'plan': list, 'base': dict, 'config': (dict, type(None))}
  for key, kind in expected.items():
    if not isinstance(meta.get(key), kind):
      raise _damaged(directory, 'metadata', KeyError(f'{key!r} is {type(meta.get(key)).__name__}'))
  base = meta['base']
  if not (
    isinstance(base.get('structure_sha256'), str)
    and isinstance(base.get('structure'), list)
    and isinstance(base.get('frozen_values'), dict)
  ):
    raise _damaged(directory, 'base fingerprint', KeyError('structure_sha256, structure, frozen_values'))
  return meta


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
  """The checkpoint's JSON metadata (config, plan, base fingerprint)."""
  directory = os.path.abspath(os.fspath(directory))
  if not _multiprocess() and not os.path.lexists(directory) and _leftovers(directory, _OLD):
    with _locked(directory):
      _recover(directory)  # a save was killed between its two renames
  if not os.path.isdir(directory):
    parent, name = os.path.split(directory)
    partial = _leftovers(directory, _TMP) or [
      n for n in (os.listdir(parent) if os.path.isdir(parent) else ()) if n.startswith(name + '.orbax-checkpoint-tmp')
    ]
    hint = ' (only an unfinished save was found there: it was interrupted and cannot be loaded)' if partial else ''
    kind = 'a file, not an adapter checkpoint,' if os.path.exists(directory) else 'no adapter checkpoint'
    raise FileNotFoundError(f'{kind} at {directory!r}{hint}; expected a directory written by save_adapters.')
  if not os.path.isdir(os.path.join(directory, 'meta')):
    entries = sorted(os.listdir(directory))
    raise ValueError(
      f'{directory!r} is not a flax_adapters adapter checkpoint: it has no `meta` item (it holds '
      f'{entries[:8]}{" ..." if len(entries) > 8 else ""}). A plain orbax checkpoint is restored with orbax '
      'itself; adapter checkpoints are written by save_adapters.'
    )
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      meta = ckptr.restore(directory, ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  except Exception as e:  # orbax raises many kinds (KeyError, JSONDecodeError, ...) on damaged files
    raise _damaged(directory, 'metadata (meta/)', e) from e
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    found = meta.get('format') if isinstance(meta, dict) else type(meta).__name__
    raise ValueError(
      f'{directory!r} is not a flax_adapters adapter checkpoint: its metadata has format {found!r}, '
      f'expected {FORMAT!r}.'
    )
  return _check_meta(meta, directory)


def load_adapters(directory: str | os.PathLike, model: AdaptedModel, params):
  """`params` with its trained leaves replaced by the checkpoint's, after checking the base matches.

  `model, params` come from `prepare_for_transfer` with the saved config (`read_meta(d)['config']`).
  """
  if not isinstance(model, AdaptedModel):
    raise TypeError(f'`model` must be an AdaptedModel prepared with the saved config, found {type(model).__name__}.')
  directory = os.path.abspath(os.fspath(directory))
  meta = read_meta(directory)
  if meta['plan'] != plan_to_json(model):
    try:
      saved = {'.'.join(e['path']): [m['method'] for m in e['methods']] for e in meta['plan']}
    except (KeyError, TypeError) as e:
      raise _damaged(directory, 'adapter plan', e) from e
    now = {'.'.join(e['path']): [m['method'] for m in e['methods']] for e in plan_to_json(model)}
    raise ValueError(
      f'the adapters in {directory!r} do not fit this model: saved plan {saved} vs this model {now}. '
      'Prepare the model with the saved config: TransferConfig(**read_meta(directory)["config"]).'
    )
  _compare_fingerprints(meta['base'], model, params, directory)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, trained_leaves(model, params))
  if not os.path.isdir(os.path.join(directory, 'params')):
    raise _damaged(directory, 'trained leaves', FileNotFoundError('no params/ item'))
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      tree = ckptr.restore(directory, ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))['params']
  except Exception as e:  # orbax/tensorstore: KeyError, DATA_LOSS, ValueError on a damaged item
    raise _damaged(directory, 'trained leaves (params/)', e) from e
  flat = traverse_util.flatten_dict(params)
  flat.update(traverse_util.flatten_dict(tree))
  return traverse_util.unflatten_dict(flat)


def restore_transfer(directory: str | os.PathLike, model, params, *example_args, **example_kwargs):
  """Rebuild the adapted model on `model` (the base) and load the saved leaves: `(adapted, params)`.

  A checkpoint saved with a `TransferConfig` is prepared with that config (head surgery included);
  one made with `adapt` (explicit methods, e.g. imported from PEFT) is rebuilt from its saved plan.
  """
  from flax_adapters import methods as methods_lib  # pylint: disable=g-import-not-at-top
  from flax_adapters import paths as paths_lib  # pylint: disable=g-import-not-at-top
  from flax_adapters.placement import adapt  # pylint: disable=g-import-not-at-top
  from flax_adapters.transfer import prepare_for_transfer  # pylint: disable=g-import-not-at-top

  meta = read_meta(directory)
  if meta['config'] is not None:
    adapted, prepared = prepare_for_transfer(
      model, params, config_from_json(meta['config']), *example_args, **example_kwargs
    )
  else:
    exact = lambda path: re.compile(re.escape(paths_lib.dotted(path)))
    adapters = {exact(tuple(e['path'])): [methods_lib.from_json(m) for m in e['methods']] for e in meta['plan']}
    adapted, prepared = adapt(model, params, adapters, *example_args, **example_kwargs)
    if 'trainable' in meta:
      adapted = adapted.replace(trainable=trainable_from_json(meta['trainable']))
  return adapted, load_adapters(directory, adapted, prepared)
