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

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from flax_adapters import atomic
from flax_adapters import methods as methods_lib
from flax_adapters import paths as paths_lib
from flax_adapters.config import TransferConfig
from flax_adapters.forward import AdaptedModel, Trainable, check_adapter_leaves
from flax_adapters.training import trainable_mask

FORMAT = 'flax_adapters.adapter_checkpoint/1'
# What a save writes at the top of a checkpoint directory: orbax's items, and its bookkeeping files
# (named with a leading underscore, e.g. _CHECKPOINT_METADATA, plus commit_success.txt).
CHECKPOINT_ENTRIES = frozenset({'params', 'meta', 'commit_success.txt'})


# -- config and plan as JSON -----------------------------------------------------------------


# Compiled-regex flags that an inline group `(?...)` spells, so that a saved target reads back the same.
_INLINE_FLAGS = {re.IGNORECASE: 'i', re.MULTILINE: 'm', re.DOTALL: 's', re.VERBOSE: 'x', re.ASCII: 'a'}


def _regex_json(pattern: re.Pattern) -> str:
  """`'re:' + pattern`, its flags written inline (`re.compile('q', re.I)` -> `'re:(?i)q'`)."""
  if isinstance(pattern.pattern, bytes):
    raise TypeError(f'target {pattern!r} is a bytes regex; module paths are str: compile a str pattern.')
  flags = ''.join(letter for flag, letter in _INLINE_FLAGS.items() if pattern.flags & flag)
  return 're:' + (f'(?{flags})' if flags else '') + pattern.pattern


def _jsonable(value):
  if isinstance(value, re.Pattern):
    return _regex_json(value)
  if isinstance(value, np.generic):  # np.int64(4), np.float32(16.0): the value, not its dtype's name
    return value.item()
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


def _is_key(v) -> bool:
  """A typed PRNG key (NNX keeps its rng streams in the state: `nnx.Dropout(rngs=...)`)."""
  return jax.dtypes.issubdtype(getattr(v, 'dtype', None) or np.float32, jax.dtypes.prng_key)


def _structure(params) -> list[tuple[str, tuple[int, ...], str]]:
  flat = traverse_util.flatten_dict(params)
  return sorted(
    (paths_lib.raw(k), tuple(np.shape(v)), str(v.dtype) if _is_key(v) else str(jnp.dtype(v.dtype)))
    for k, v in flat.items()
    if k[-1] not in methods_lib.LEAF_NAMES
  )


def base_fingerprint(model: AdaptedModel, params) -> dict[str, Any]:
  """Paths, shapes and dtypes of every non-adapter leaf, hashed; and a digest of the frozen values."""
  mask = traverse_util.flatten_dict(trainable_mask(model, params))
  flat = traverse_util.flatten_dict(params)
  structure = _structure(params)
  # A PRNG key is rng state that advances as the model runs, not a weight: its place is in `structure`.
  values = {paths_lib.raw(k): _digest(v) for k, v in sorted(flat.items()) if not mask[k] and not _is_key(v)}
  return {
    'structure_sha256': hashlib.sha256(repr(structure).encode()).hexdigest(),
    'structure': [list(s[:1]) + [list(s[1]), s[2]] for s in structure],
    'frozen_values': values,
  }


def _compare_structure(saved, current, directory) -> None:
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


def _compare_values(saved, current, params, directory) -> None:
  flat = {paths_lib.raw(k): v for k, v in traverse_util.flatten_dict(params).items()}
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


# -- what may be replaced -------------------------------------------------------------------


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
  _refuse_merged(model, 'be saved (a restore would run without them)')
  directory = os.path.abspath(os.fspath(directory))
  if not atomic.multiprocess():  # fail before any work (process 0 decides again under the lock)
    refusal = _refusal(directory, overwrite)
    if refusal:
      atomic.raise_refusal(refusal)
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

  atomic.commit(directory, overwrite, write, _refusal, lambda path: _not_a_checkpoint(path) is None)
  return directory


def _refuse_merged(model: AdaptedModel, action: str) -> None:
  """A model from `merge_adapters` carries some adapters in its kernels, which no adapter checkpoint holds."""
  if model.folded:
    shown = ', '.join(model.folded[:4]) + (' ...' if len(model.folded) > 4 else '')
    raise ValueError(
      f'`model` comes from merge_adapters: it folded {len(model.folded)} adapters ({shown}) into the kernels, '
      f'which an adapter checkpoint does not hold, so it cannot {action}. Use the unmerged model and params '
      '(from prepare_for_transfer, adapt, load_adapters or restore_transfer) and merge after loading.'
    )


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
  if not atomic.multiprocess() and not os.path.lexists(directory) and atomic.leftovers(directory, atomic.OLD):
    with atomic.locked(directory):
      atomic.recover(directory, lambda path: _not_a_checkpoint(path) is None)  # a save was killed mid-swap
  if not os.path.isdir(directory):
    parent, name = os.path.split(directory)
    partial = atomic.leftovers(directory, atomic.TMP) or [
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
  _refuse_merged(model, 'load an adapter checkpoint (its plan lacks the folded adapters)')
  directory = os.path.abspath(os.fspath(directory))
  meta = read_meta(directory)
  check_adapter_leaves(params, model)  # base params passed by mistake: say so, do not blame the checkpoint
  # Another base (architecture, head, dtypes) first: then the plan and trained set differ only because of it.
  current = base_fingerprint(model, params)
  _compare_structure(meta['base'], current, directory)
  if meta['plan'] != plan_to_json(model):
    try:
      saved = {'.'.join(map(str, e['path'])): e['methods'] for e in meta['plan']}
    except (KeyError, TypeError) as e:
      raise _damaged(directory, 'adapter plan', e) from e
    now = {'.'.join(map(str, e['path'])): e['methods'] for e in plan_to_json(model)}
    # Name the sites that differ, with each method's settings (a rank or alpha shows there).
    differ = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    shown = '; '.join(
      f'{k}: saved {saved.get(k, "no adapter")} vs this model {now.get(k, "no adapter")}' for k in differ[:3]
    )
    raise ValueError(
      f'the adapters in {directory!r} do not fit this model at {len(differ)} site(s) ({shown}'
      f'{" ..." if len(differ) > 3 else ""}). Prepare the model with the saved config: '
      'TransferConfig(**read_meta(directory)["config"]), or use restore_transfer.'
    )
  if 'trainable' in meta and meta['trainable'] != trainable_to_json(model.trainable):
    raise ValueError(
      f'the checkpoint in {directory!r} holds another set of trained leaves than this model trains (saved '
      f'{meta["trainable"]}, this model {trainable_to_json(model.trainable)}: another `unfreeze_norm`, '
      '`modules_to_save` or head setting). Prepare the model with the saved config: '
      'TransferConfig(**read_meta(directory)["config"]), or use restore_transfer.'
    )
  _compare_values(meta['base'], current, params, directory)
  # orbax keeps dict keys as strings; NNX lists give integer keys, restored through their str form.
  flat_abstract = traverse_util.flatten_dict(
    jax.tree.map(ocp.utils.to_shape_dtype_struct, trained_leaves(model, params))
  )
  keys = {tuple(map(str, k)): k for k in flat_abstract}
  abstract = traverse_util.unflatten_dict({tuple(map(str, k)): v for k, v in flat_abstract.items()})
  if not os.path.isdir(os.path.join(directory, 'params')):
    raise _damaged(directory, 'trained leaves', FileNotFoundError('no params/ item'))
  _refuse_lossy_casts(directory, flat_abstract)
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      tree = ckptr.restore(directory, ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))['params']
  except Exception as e:  # orbax/tensorstore: KeyError, DATA_LOSS, ValueError on a damaged item
    raise _damaged(directory, 'trained leaves (params/)', e) from e
  flat = traverse_util.flatten_dict(params)
  flat.update({keys[k]: v for k, v in traverse_util.flatten_dict(tree).items()})
  return traverse_util.unflatten_dict(flat)


def _refuse_lossy_casts(directory: str, flat_abstract: Mapping) -> None:
  """Saved float leaves restored into a narrower dtype (float32 adapters into an adapter_dtype=bfloat16
  model) would be rounded: refuse, naming the leaves and both dtypes."""
  try:
    with ocp.StandardCheckpointer() as ckptr:
      saved = ckptr.metadata(os.path.join(directory, 'params'))
    saved = traverse_util.flatten_dict(getattr(saved, 'item_metadata', saved).tree)
  except Exception as e:  # orbax/tensorstore on a damaged item
    raise _damaged(directory, 'trained leaves (params/)', e) from e
  lossy = []
  for key, target in flat_abstract.items():
    found = getattr(saved.get(tuple(map(str, key))), 'dtype', None)
    if found is None or not (jnp.issubdtype(found, jnp.floating) and jnp.issubdtype(target.dtype, jnp.floating)):
      continue
    if jnp.promote_types(found, target.dtype) != target.dtype:
      lossy.append(f'{paths_lib.raw(key)} saved {jnp.dtype(found).name}, this model {jnp.dtype(target.dtype).name}')
  if lossy:
    raise ValueError(
      f'loading {directory!r} would round {len(lossy)} trained leaves to a narrower dtype ('
      + '; '.join(lossy[:3])
      + (' ...' if len(lossy) > 3 else '')
      + '). Prepare the model with the saved precision (adapter_dtype=None or the saved dtype; base params in '
      'the dtype they were trained in), load, then cast the params if you want them narrower.'
    )


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
  try:
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
  except (ValueError, methods_lib.AdapterError) as e:
    # On another architecture the saved targets match nothing: name the base, not the targets.
    _refuse_other_base(meta['base'], params, directory, e)
    raise
  return adapted, load_adapters(directory, adapted, prepared)


def _refuse_other_base(saved, params, directory: str, error: Exception) -> None:
  """Raise if most of the saved base's trunk is absent from `params` (`error`: why preparing failed)."""
  if not isinstance(params, Mapping):
    return
  given = {paths_lib.raw(k) for k in traverse_util.flatten_dict(params)}
  saved_paths = [s[0] for s in saved['structure']]
  absent = [p for p in saved_paths if p not in given]
  if saved_paths and len(absent) * 2 > len(saved_paths):
    raise ValueError(
      f'the adapter checkpoint at {directory!r} was trained on a different base model: {len(absent)} of the '
      f'{len(saved_paths)} base leaves it was trained with are not in `params` (e.g. {absent[:3]}), so its '
      f'adapters fit no module here ({type(error).__name__}: {str(error)[:200]}). Restore it onto the base it '
      'was trained on.'
    ) from error
