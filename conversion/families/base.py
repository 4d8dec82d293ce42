"""`Family`: one HF model family's config, flax model, key table and checked conversions.

Conversion is strict in both directions. Every leaf is checked against `jax.eval_shape` of the
flax model's `init`; a key the table expects but the checkpoint lacks, a checkpoint key that
nothing accounts for, and a mis-shaped tensor are all errors, reported together in one
`ValueError` that names the keys, the shapes and a likely fix. Keys that are not parameters are
accounted for explicitly: buffers the model recomputes from the config (`buffers`), and the tied
LM head, which must equal the embedding it is tied to.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from conversion.key_mapping import KeyMapping, Layout, Row, expand, find_row, layer_pattern
from conversion.state_dict import to_numpy

_MAX_LISTED = 12


def _shape(shape: Sequence[int]) -> str:
  return str(tuple(int(d) for d in shape))


class _Problems:
  """Collects what is wrong so that one error lists all of it."""

  def __init__(self):
    self.lines: dict[str, list[str]] = {}

  def add(self, kind: str, line: str) -> None:
    self.lines.setdefault(kind, []).append(line)

  def raise_if_any(self, headline: str) -> None:
    if not self.lines:
      return
    out = [headline]
    for kind, lines in self.lines.items():
      for line in lines[:_MAX_LISTED]:
        out.append(f'  - {kind}: {line}')
      if len(lines) > _MAX_LISTED:
        out.append(f'  - ... and {len(lines) - _MAX_LISTED} more {kind} problems')
    raise ValueError('\n'.join(out))


@dataclasses.dataclass(frozen=True)
class Family:
  """Everything needed to move one HF model family between PyTorch and Flax.

  Attributes:
    name: HF `model_type` (`'bert'`, `'llama'`, `'gpt2'`).
    hf_class_name: the `transformers` class whose state dict the table describes.
    config_class: our frozen config dataclass (with `from_hf`/`to_hf`).
    model_class: the linen module mirroring `hf_class_name`.
    rows: the key-mapping table.
    num_layers_field: config field with the number of `{i}` layers.
    trunk_prefix: torch prefix of the trunk inside `hf_class_name` (`'transformer.'`); a
      checkpoint of the bare trunk class (`GPT2Model`, saved without it) gets it prepended.
    wrapper_prefix: prefix under which other classes of the family hold this model (`'bert.'` in
      `BertForMaskedLM`); stripped when present.
    buffers: `(regex, reason)` for non-parameter tensors older checkpoints carry and the flax
      model recomputes from the config; matching keys are dropped after `check_buffer`.
    check_buffer: optional `(key, value, config)` hook that raises if a buffer contradicts the
      config.
    tied_head: `(head key, embedding key)` when `config.tie_word_embeddings` can tie the head.
    legacy_names: `(regex, replacement)` renames of older checkpoints' keys, as transformers applies
      them on load (BERT's TF-era `LayerNorm.gamma`/`.beta`).
    hint_fields: config fields shown in error messages.
  """

  name: str
  hf_class_name: str
  config_class: type
  model_class: type
  rows: tuple[Row, ...]
  num_layers_field: str
  hint_fields: tuple[str, ...]
  trunk_prefix: str = ''
  wrapper_prefix: str = ''
  buffers: tuple[tuple[str, str], ...] = ()
  check_buffer: Callable[[str, np.ndarray, Any], None] | None = None
  tied_head: tuple[str, str] | None = None
  legacy_names: tuple[tuple[str, str], ...] = ()

  # ---- config and model ------------------------------------------------------------------------

  def config_from_hf(self, hf_config: Any, **overrides: Any):
    """Our config from an HF `config.json` dict (or `PretrainedConfig`)."""
    return self.config_class.from_hf(hf_config, **overrides)

  def flax_model(self, config: Any, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
    """The linen module for `config` (same structure as `hf_class_name`)."""
    self._check_config(config)
    return self.model_class(config, dtype=dtype, param_dtype=param_dtype)

  def key_table(self, config: Any) -> list[KeyMapping]:
    """The concrete torch key <-> flax path table for `config`."""
    self._check_config(config)
    return expand(self.rows, config, getattr(config, self.num_layers_field))

  def param_shapes(self, config: Any, param_dtype: Any = jnp.float32) -> dict[tuple[str, ...], Any]:
    """`{flax path: ShapeDtypeStruct}` from `jax.eval_shape` of the model's init (no compute)."""
    self._check_config(config)
    return dict(_param_shapes(self.model_class, config, jnp.dtype(param_dtype)))

  def _check_config(self, config: Any) -> None:
    if not isinstance(config, self.config_class):
      raise TypeError(
        f'config must be a {self.config_class.__name__} for the {self.name!r} family, got '
        f'{type(config).__name__}; build one with get_family({self.name!r}).config_from_hf(hf_dict).'
      )

  def _hint(self, config: Any) -> str:
    return ', '.join(f'{f}={getattr(config, f)!r}' for f in self.hint_fields)

  def _table(self, config: Any, param_dtype: Any) -> tuple[list[KeyMapping], dict]:
    table = self.key_table(config)
    expected = self.param_shapes(config, param_dtype)
    tabled = {m.flax_path for m in table}
    if tabled != set(expected):
      # The table and the module disagree: a bug here, not in the user's input.
      raise RuntimeError(
        f'{self.name} key table and {self.model_class.__name__} disagree: paths only in the table '
        f'{sorted(tabled - set(expected))}, only in the model {sorted(set(expected) - tabled)}.'
      )
    return table, expected

  # ---- torch -> flax ---------------------------------------------------------------------------

  def names_bare_trunk(self, keys) -> bool:
    """Whether `keys` name modules of the bare trunk class (`GPT2Model`: `h.0...`, no `transformer.`).

    Keys that all sit in the class's own modules outside the trunk (`lm_head...`: an adapter on the
    head alone) name this class, not the trunk.
    """
    if not self.trunk_prefix or not keys or any(k.startswith(self.trunk_prefix) for k in keys):
      return False
    outside = {r.torch_key.split('.')[0] for r in self.rows if not r.torch_key.startswith(self.trunk_prefix)}
    return not all(k.split('.')[0] in outside for k in keys)

  def normalize_keys(self, state_dict: Mapping[str, Any]) -> dict[str, str]:
    """`{our key: checkpoint key}`: the trunk/wrapper prefix conventions resolved (see class doc)."""
    keys = list(state_dict)
    if self.wrapper_prefix and any(k.startswith(self.wrapper_prefix) for k in keys):
      origin = {k.removeprefix(self.wrapper_prefix): k for k in keys}
    elif self.names_bare_trunk(keys):
      origin = {self.trunk_prefix + k: k for k in keys}
    else:
      origin = {k: k for k in keys}
    for pattern, replacement in self.legacy_names:
      origin = {re.sub(pattern, replacement, ours): theirs for ours, theirs in origin.items()}
    return origin

  def torch_to_flax(
    self,
    state_dict: Mapping[str, Any],
    config: Any,
    *,
    param_dtype: Any = jnp.float32,
    ignore: Iterable[str] = (),
  ) -> dict:
    """Flax params (the `'params'` collection) from a PyTorch state dict of `hf_class_name`.

    Args:
      state_dict: `{key: tensor}` (torch, numpy or jax), e.g. `model.state_dict()` or
        `conversion.state_dict.load_state_dict(path)`.
      config: this family's config.
      param_dtype: dtype of the returned parameters (bfloat16 checkpoints are read through float32).
      ignore: regexes; checkpoint keys fully matching one are dropped on purpose (e.g. the
        `cls\\..*` heads of a `BertForPreTraining` checkpoint).

    Returns:
      Nested dict of `jax.Array`, for `model.apply({'params': params}, ...)`.

    Raises:
      ValueError: missing, unexpected or mis-shaped keys (all listed), or a tied head that differs
        from its embedding.
      TypeError: `config` of the wrong class, or a non-floating tensor where a weight belongs.
    """
    if not isinstance(state_dict, Mapping):
      raise TypeError(f'state_dict must be a mapping {{key: tensor}}, got {type(state_dict).__name__}.')
    self._check_config(config)
    origin = self.normalize_keys(state_dict)
    self._check_depth(origin, config)
    table, expected = self._table(config, param_dtype)
    arrays = {ours: state_dict[theirs] for ours, theirs in origin.items()}
    if self.tied_head and config.tie_word_embeddings:
      head_key, embed_key = self.tied_head
      if embed_key not in arrays and head_key in arrays:
        # A tied checkpoint deduplicated under the head's name (`safetensors.torch.save_model` keeps
        # `lm_head.weight`): the head *is* the embedding, and both are [vocab, hidden] in torch.
        arrays[embed_key], origin[embed_key] = arrays[head_key], origin[head_key]
    named = lambda key: repr(origin[key]) if origin[key] == key else f'{origin[key]!r} (read as {key!r})'
    if isinstance(ignore, (str, bytes)):
      raise TypeError(
        f'ignore must be a sequence of regexes, e.g. ignore=({ignore!r},); got the single string {ignore!r}.'
      )
    compiled = []
    for p in ignore:
      try:
        compiled.append(re.compile(p))
      except re.error as e:
        raise ValueError(f'ignore={p!r} is not a valid regular expression ({e}).') from None
    ignore = compiled
    problems = _Problems()
    flat = {}
    used = set()

    for m in table:
      want = expected[m.flax_path]
      if m.torch_key not in arrays:
        problems.add('missing key', self._missing(m, want, config))
        continue
      used.add(m.torch_key)
      array = to_numpy(arrays[m.torch_key], key=origin[m.torch_key])
      if array.dtype.kind != 'f':
        raise TypeError(
          f'state_dict[{origin[m.torch_key]!r}] has dtype {array.dtype}, but {m.flax_name} is a '
          'floating-point parameter; quantized checkpoints must be dequantized first.'
        )
      if m.layout.flax_shape(array.shape) != want.shape:
        problems.add('wrong shape', self._misshaped(m, array.shape, want, named(m.torch_key), config))
        continue
      # Cast on the host (ml_dtypes rounds to bfloat16 as torch does): no per-shape XLA compiles.
      flat[m.flax_path] = jnp.asarray(m.layout.to_flax(array).astype(jnp.dtype(param_dtype)))

    for key in arrays:
      if key in used or any(p.fullmatch(origin[key]) or p.fullmatch(key) for p in ignore):
        continue
      reason = self._buffer_reason(key)
      if reason is not None:
        if self.check_buffer is not None:
          self.check_buffer(key, to_numpy(arrays[key], key=origin[key]), config)
        continue
      if self.tied_head and key == self.tied_head[0] and config.tie_word_embeddings:
        self._check_tied(arrays, origin, problems)
        continue
      problems.add('unexpected key', self._unexpected(key, arrays[key], origin[key], named(key), table, config))

    problems.raise_if_any(
      f'Cannot convert the {self.name} checkpoint to {self.model_class.__name__} params (config: {self._hint(config)}):'
    )
    return unflatten_dict(flat)

  def _check_depth(self, origin: Mapping[str, str], config: Any) -> None:
    """A config deeper than the checkpoint is refused before a table of its layers is built."""
    layers = getattr(config, self.num_layers_field)
    known = [key for key in origin if find_row(self.rows, key) is not None]
    if origin and not known:
      raise ValueError(self._foreign(origin))
    depth = 0
    for key in known:
      _, index = layer_pattern(key)
      if index is not None:
        depth = max(depth, index + 1)
    if layers > depth:
      raise ValueError(
        f'config {self.num_layers_field}={layers}, but the {self.name} checkpoint holds '
        f'{"no layers" if not depth else f"layers 0..{depth - 1}"} ({depth} layers). Fix: set '
        f'{self.num_layers_field}={depth} in config.json, or load the checkpoint this config belongs to.'
      )

  def _foreign(self, origin: Mapping[str, str]) -> str:
    """The message for a checkpoint none of whose keys is in this family's table."""
    from conversion.families import FAMILIES  # pylint: disable=g-import-not-at-top  (the registry imports us)

    keys = sorted(origin.values())
    fits = {
      f.name: sum(find_row(f.rows, k) is not None for k in f.normalize_keys(dict.fromkeys(keys)))
      for f in FAMILIES.values()
      if f.name != self.name
    }
    best = max(fits, key=fits.get, default=None)
    looks = (
      f"its keys are those of a {best!r} model ({fits[best]} of {len(keys)} match that family's table): load it with "
      f"the config of that family (config.json's model_type={best!r}, or get_family({best!r}))"
      if best and fits[best]
      else 'its keys match no supported family; convert it with a family whose table names them'
    )
    return (
      f'the checkpoint is not a {self.name} ({self.hf_class_name}) checkpoint: none of its {len(keys)} keys '
      f'(e.g. {keys[:3]}) is in the {self.name} key table. Fix: {looks}.'
    )

  def _buffer_reason(self, key: str) -> str | None:
    for pattern, reason in self.buffers:
      if re.fullmatch(pattern, key):
        return reason
    return None

  def _check_tied(self, arrays, origin, problems: _Problems) -> None:
    head_key, embed_key = self.tied_head
    if embed_key not in arrays:
      return  # reported as a missing key
    head, embed = to_numpy(arrays[head_key]), to_numpy(arrays[embed_key])
    if head.shape != embed.shape or not np.array_equal(head, embed):
      problems.add(
        'untied head',
        f'{origin[head_key]!r} differs from {origin[embed_key]!r}, but the config has '
        'tie_word_embeddings=True, so the head would be replaced by the embedding. Fix: set '
        'tie_word_embeddings=False in the config to keep a separate lm_head.',
      )

  def _missing(self, m: KeyMapping, want, config) -> str:
    row = find_row(self.rows, m.torch_key)
    fix = f'check that the config describes this checkpoint ({self._hint(config)})'
    if row is not None and row.when is not None:
      fix = f'this key exists because config.{row.condition(config)}; flip it if the checkpoint lacks it'
    if self.tied_head and m.torch_key == self.tied_head[0]:
      fix = (
        f'the checkpoint has no LM head: it is a bare trunk or a task model (e.g. a *ForSequenceClassification, '
        f'whose head is not converted), not a {self.hf_class_name}; load a {self.hf_class_name} checkpoint. Set '
        'tie_word_embeddings=True only if the model it came from ties its head to the input embedding (its config.json says so)'
      )
    return f'{m.torch_key!r} (for flax {m.flax_name}, shape {_shape(want.shape)}) is not in the checkpoint. Fix: {fix}.'

  def _misshaped(self, m: KeyMapping, torch_shape, want, named: str, config) -> str:
    as_flax = ''
    if m.layout is Layout.TRANSPOSE:
      as_flax = f', {_shape(m.layout.flax_shape(torch_shape))} once transposed to flax layout'
    return (
      f'state_dict[{named}] has shape {_shape(torch_shape)}{as_flax}, but flax {m.flax_name} '
      f'expects {_shape(want.shape)}. Fix: the config does not match the checkpoint; check '
      f'{self._hint(config)}.'
    )

  def _unexpected(self, key: str, value, original: str, named: str, table: list[KeyMapping], config) -> str:
    shape = _shape(getattr(value, 'shape', ()))
    row = find_row(self.rows, key)
    _, index = layer_pattern(key)
    num_layers = getattr(config, self.num_layers_field)
    if row is not None and not row.applies(config):
      fix = f'the config has {row.condition(config)}, so the model has no such parameter; flip it'
    elif row is not None and index is not None and index >= num_layers:
      fix = (
        f'the checkpoint has layer {index} but config.{self.num_layers_field}={num_layers}; '
        "raise it to the checkpoint's depth"
      )
    else:
      close = difflib.get_close_matches(key, [m.torch_key for m in table], n=1, cutoff=0.75)
      fix = (f'did you mean {close[0]!r}? ' if close else '') + (
        f'if this tensor is deliberately unused (e.g. another head), pass ignore=[{re.escape(original)!r}]'
      )
    return f'{named} (shape {shape}) has no place in {self.model_class.__name__}. Fix: {fix}.'

  # ---- flax -> torch ---------------------------------------------------------------------------

  def flax_to_torch(self, params: Mapping[str, Any], config: Any) -> dict[str, np.ndarray]:
    """The state dict of `hf_class_name` that `load_state_dict(strict=True)` accepts.

    Parameters in bfloat16 come out as float32 (numpy has no bfloat16); pass
    `dtype='bfloat16'` to `save_safetensors` to store them narrow again. With
    `tie_word_embeddings`, the head key is written as a copy of the embedding, because torch's
    `state_dict()` lists both names of a tied weight and strict loading wants both. Buffers are not
    written: in `transformers` 5 they are all non-persistent and rebuilt from the config.

    Args:
      params: the `'params'` collection (or `{'params': ...}`).
      config: this family's config.

    Raises:
      ValueError: a path the model does not have (e.g. unmerged adapter weights), a missing path, or
        a mis-shaped leaf.
    """
    if isinstance(params, Mapping) and set(params) == {'params'}:
      params = params['params']
    if not isinstance(params, Mapping):
      raise TypeError(f'params must be a nested mapping of arrays, got {type(params).__name__}.')
    table, expected = self._table(config, jnp.float32)
    flat = flatten_dict(params)
    problems = _Problems()
    for path in flat:
      if path not in expected:
        problems.add(
          'unexpected path',
          f'params/{"/".join(map(str, path))} is not a parameter of {self.model_class.__name__}. Fix: '
          'merge adapter weights into the base weights (or drop them) before exporting.',
        )
    state_dict: dict[str, np.ndarray] = {}
    for m in table:
      want = expected[m.flax_path]
      if m.flax_path not in flat:
        problems.add('missing path', f'params/{m.flax_name} (shape {_shape(want.shape)}) for {m.torch_key!r}.')
        continue
      array = to_numpy(flat[m.flax_path], key=m.flax_name)
      if array.shape != want.shape:
        problems.add(
          'wrong shape',
          f'params/{m.flax_name} has shape {_shape(array.shape)}, but {self.model_class.__name__} with this '
          f'config expects {_shape(want.shape)}. Fix: check the config ({self._hint(config)}).',
        )
        continue
      state_dict[m.torch_key] = m.layout.to_torch(array)
    problems.raise_if_any(
      f'Cannot export {self.model_class.__name__} params to a {self.hf_class_name} state dict '
      f'(config: {self._hint(config)}):'
    )
    if self.tied_head and config.tie_word_embeddings:
      head_key, embed_key = self.tied_head
      state_dict[head_key] = state_dict[embed_key].copy()
    return state_dict


@functools.lru_cache(maxsize=32)
def _param_shapes(model_class: type, config: Any, param_dtype: np.dtype) -> dict:
  model = model_class(config, param_dtype=param_dtype)
  ids = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids))
  return flatten_dict(shapes['params'])
