"""Reading Hugging Face `config.json` dictionaries into our frozen config dataclasses.

Only plain dictionaries are read (an HF `PretrainedConfig` works through its `to_dict()`), so
`flax_adapters` never imports `transformers`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

# Sizes beyond these describe no model that exists (the largest public ones have ~130 layers, width
# ~50k, ~260k tokens, ~10M positions). Checking them first keeps a typo or a hostile config.json from
# building a table of 10**9 layers or allocating terabytes. Raise a limit here for a model that
# really is bigger.
LIMITS = {'layers': 1024, 'width': 1 << 18, 'heads': 1 << 14, 'vocab': 1 << 23, 'positions': 1 << 25}


def as_dict(hf_config: Any, *, argument: str = 'hf_config') -> dict[str, Any]:
  """A config dictionary from a mapping or an object with `to_dict()` (an HF `PretrainedConfig`)."""
  if isinstance(hf_config, Mapping):
    return dict(hf_config)
  to_dict = getattr(hf_config, 'to_dict', None)
  if callable(to_dict):
    return dict(to_dict())
  raise TypeError(
    f'{argument} must be a dict read from config.json (or an object with .to_dict()), got {type(hf_config).__name__}.'
  )


def known_fields(cls: type, hf: Mapping[str, Any], model_type: str) -> dict[str, Any]:
  """The entries of `hf` that are fields of dataclass `cls`, after checking `model_type`.

  HF configs carry many entries that do not affect the forward pass (generation settings, label
  maps); those are not fields and are left out. The special token ids are fields (`TOKEN_IDS`): they
  do not change the forward either, but an exported `config.json` needs them for generation.
  """
  found = hf.get('model_type', model_type)
  if found != model_type:
    raise ValueError(
      f'config model_type is {found!r}, but {cls.__name__} reads {model_type!r} configs; '
      f'use the config class of the {found!r} family.'
    )
  names = {f.name for f in dataclasses.fields(cls)}
  return {k: v for k, v in hf.items() if k in names}


def refuse(hf: Mapping[str, Any], key: str, allowed: tuple, why: str) -> None:
  """Raise unless `hf[key]` (when present) is one of `allowed`."""
  if key in hf and hf[key] not in allowed:
    raise ValueError(f'config {key}={hf[key]!r} is not supported ({why}); expected one of {allowed}.')


def refuse_pruned_heads(hf: Mapping[str, Any]) -> None:
  """transformers 4's `prune_heads` left `pruned_heads` in config.json and narrower attention weights."""
  refuse(
    hf,
    'pruned_heads',
    ({}, None),
    'a model with attention heads removed by prune_heads has narrower attention weights than its '
    'config describes, and transformers 5 no longer builds such models; convert the unpruned checkpoint',
  )


def check_positive(config: Any, *names: str) -> None:
  for name in names:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ValueError(f'{type(config).__name__}.{name} must be a positive int, got {value!r}.')


def check_at_most(config: Any, limit: str, *names: str) -> None:
  """Positive ints no larger than `LIMITS[limit]` (checked before anything is built from them)."""
  check_positive(config, *names)
  for name in names:
    value = getattr(config, name)
    if value > LIMITS[limit]:
      raise ValueError(
        f'{type(config).__name__}.{name}={value} is beyond any real model (at most {LIMITS[limit]}); it is '
        f'a typo or a damaged config. If the model really has that many, raise '
        f'flax_adapters.models.hf_config.LIMITS[{limit!r}].'
      )


def check_finite_positive(config: Any, *names: str) -> None:
  """Finite numbers > 0 (an eps, a RoPE base or factor): anything else gives NaN or inf outputs."""
  for name in names:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
      raise ValueError(
        f'{type(config).__name__}.{name} must be a finite number > 0, got {value!r}; other values make the '
        'outputs NaN or inf.'
      )


def check_bool(config: Any, *names: str) -> None:
  for name in names:
    value = getattr(config, name)
    if not isinstance(value, bool):
      raise TypeError(f'{type(config).__name__}.{name} must be true or false, got {value!r}.')


def check_str(config: Any, *names: str) -> None:
  for name in names:
    value = getattr(config, name)
    if not isinstance(value, str):
      raise TypeError(f'{type(config).__name__}.{name} must be a string, got {value!r}.')


def check_divides(config: Any, numerator: str, denominator: str) -> None:
  n, d = getattr(config, numerator), getattr(config, denominator)
  if n % d:
    raise ValueError(f'{type(config).__name__}.{numerator}={n} must be divisible by {denominator}={d}.')


def check_probability(config: Any, *names: str) -> None:
  for name in names:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
      raise ValueError(f'{type(config).__name__}.{name} must be in [0, 1), got {value!r}.')


# Special token ids: carried from the checkpoint's config.json to the exported one, where transformers'
# generation reads them (without them it falls back to the class defaults, e.g. LLaMA's eos 2).
TOKEN_IDS = ('bos_token_id', 'eos_token_id', 'pad_token_id')


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_token_ids(config: Any) -> None:
  """Each of `TOKEN_IDS` is None, an int >= 0 or (eos in Llama 3) a list of them, kept as a tuple."""
  for name in TOKEN_IDS:
    value = getattr(config, name)
    if isinstance(value, list):
      value = tuple(value)
      object.__setattr__(config, name, value)  # frozen and hashed: a tuple
    if not (value is None or _is_int(value) or (isinstance(value, tuple) and value and all(map(_is_int, value)))):
      raise TypeError(
        f'{type(config).__name__}.{name} must be a token id (an int >= 0), a list of them, or null; got {value!r}.'
      )


def hf_dict(config: Any, *, drop: tuple[str, ...] = ()) -> dict[str, Any]:
  """`dataclasses.asdict(config)` for config.json: token ids that are None left to transformers' defaults."""
  d = {k: v for k, v in dataclasses.asdict(config).items() if k not in drop}
  for name in TOKEN_IDS:
    if d.get(name) is None:
      d.pop(name, None)
    elif isinstance(d[name], tuple):
      d[name] = list(d[name])
  return d
