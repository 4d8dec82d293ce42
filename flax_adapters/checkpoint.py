"""Adapter checkpoints: save only what trained, load it onto a freshly prepared model.

A checkpoint is an orbax directory with two items: `params`, the trained leaves alone (adapters,
heads, unfrozen norms, ...), and `meta`, JSON with the `TransferConfig`, the adapter plan and a
fingerprint of the base tree (paths, shapes, dtypes, plus a cheap digest of the frozen values).
Loading onto a model whose base differs is refused with the difference named. Orbax writes to a
temporary directory and renames it when complete, so an interrupted save never leaves a checkpoint
that loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from flax_adapters import methods as methods_lib
from flax_adapters.config import TransferConfig
from flax_adapters.forward import AdaptedModel, Trainable
from flax_adapters.training import trainable_mask

FORMAT = 'flax_adapters.adapter_checkpoint/1'


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


# -- fingerprint of the base -----------------------------------------------------------------


def _digest(leaf) -> list[float]:
  x = np.asarray(jax.device_get(leaf), np.float64).ravel()
  # Sum and position-weighted sum: cheap, and it changes when any weight does.
  w = np.cos(np.arange(x.size, dtype=np.float64))
  return [float(x.sum()), float(x @ w)]


def base_fingerprint(model: AdaptedModel, params) -> dict[str, Any]:
  """Paths, shapes and dtypes of every non-adapter leaf, hashed; and a digest of the frozen values."""
  mask = traverse_util.flatten_dict(trainable_mask(model, params))
  flat = traverse_util.flatten_dict(params)
  structure = sorted(
    ('/'.join(k), tuple(np.shape(v)), str(jnp.dtype(v.dtype)))
    for k, v in flat.items()
    if k[-1] not in methods_lib.LEAF_NAMES
  )
  values = {'/'.join(k): _digest(v) for k, v in sorted(flat.items()) if not mask[k]}
  return {
    'structure_sha256': hashlib.sha256(repr(structure).encode()).hexdigest(),
    'structure': [list(s[:1]) + [list(s[1]), s[2]] for s in structure],
    'frozen_values': values,
  }


def _compare_fingerprints(saved, current, directory) -> None:
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
  for key, digest in saved['frozen_values'].items():
    now = current['frozen_values'].get(key)
    if now is None or not np.allclose(digest, now, rtol=1e-6, atol=1e-6):
      raise ValueError(
        f'the adapter checkpoint at {directory!r} was trained on different base weights: the frozen '
        f'leaf {key!r} does not match (saved digest {digest}, now {now}). Same architecture, other '
        'pretrained values: load the base checkpoint the adapters were trained on.'
      )


# -- save / load -----------------------------------------------------------------------------


def trained_leaves(model: AdaptedModel, params) -> dict:
  """The sub-tree of params that trains (what an adapter checkpoint holds)."""
  mask = traverse_util.flatten_dict(trainable_mask(model, params))
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if mask[k]})


def save_adapters(directory: str | os.PathLike, model: AdaptedModel, params, *, overwrite: bool = False) -> str:
  """Save the trained leaves of `params`, the config and the base fingerprint; returns the path.

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
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(f'`directory` {directory!r} exists; pass overwrite=True to replace it.')
  meta = {
    'format': FORMAT,
    'config': config_to_json(model.config) if model.config is not None else None,
    'plan': plan_to_json(model),
    'trainable': trainable_to_json(model.trainable),
    'base': base_fingerprint(model, params),
  }
  tree = trained_leaves(model, params)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(
      directory, ocp.args.Composite(params=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=overwrite
    )
  return directory


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
  """The checkpoint's JSON metadata (config, plan, base fingerprint)."""
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    partial = (
      [
        n
        for n in os.listdir(os.path.dirname(directory))
        if n.startswith(os.path.basename(directory) + '.orbax-checkpoint-tmp')
      ]
      if os.path.isdir(os.path.dirname(directory))
      else []
    )
    hint = ' (only an unfinished save was found there: it was interrupted and cannot be loaded)' if partial else ''
    raise FileNotFoundError(f'no adapter checkpoint at {directory!r}{hint}.')
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    meta = ckptr.restore(directory, ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    raise ValueError(f'{directory!r} is not a flax_adapters adapter checkpoint (format {FORMAT}).')
  return meta


def load_adapters(directory: str | os.PathLike, model: AdaptedModel, params):
  """`params` with its trained leaves replaced by the checkpoint's, after checking the base matches.

  `model, params` come from `prepare_for_transfer` with the saved config (`read_meta(d)['config']`).
  """
  if not isinstance(model, AdaptedModel):
    raise TypeError(f'`model` must be an AdaptedModel prepared with the saved config, found {type(model).__name__}.')
  directory = os.path.abspath(os.fspath(directory))
  meta = read_meta(directory)
  if meta['plan'] != plan_to_json(model):
    saved = {'.'.join(e['path']): [m['method'] for m in e['methods']] for e in meta['plan']}
    now = {'.'.join(e['path']): [m['method'] for m in e['methods']] for e in plan_to_json(model)}
    raise ValueError(
      f'the adapters in {directory!r} do not fit this model: saved plan {saved} vs this model {now}. '
      'Prepare the model with the saved config: TransferConfig(**read_meta(directory)["config"]).'
    )
  _compare_fingerprints(meta['base'], base_fingerprint(model, params), directory)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, trained_leaves(model, params))
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    tree = ckptr.restore(directory, ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))['params']
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
