"""Key-mapping tables between PyTorch state-dict keys and flax parameter paths.

A family writes its table once, as rows of (torch key pattern, flax path pattern, layout, when).
`{i}` in a pattern stands for a layer index; `when` names a boolean config field (optionally
`'not <field>'`) that decides whether the row exists, e.g. biases under `attention_bias`.
`expand` turns the rows into the concrete `KeyMapping`s of one config.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

LAYER = '{i}'
_LAYER_INDEX = re.compile(r'\.(\d+)(?=\.)')


class Layout(enum.Enum):
  """How a torch tensor is laid out relative to its flax leaf."""

  IDENTITY = 'identity'
  # torch `nn.Linear.weight` is [out, in]; `nn.Dense.kernel` is [in, out].
  TRANSPOSE = 'transpose'

  def to_flax(self, array: np.ndarray) -> np.ndarray:
    return array.T if self is Layout.TRANSPOSE else array

  def to_torch(self, array: np.ndarray) -> np.ndarray:
    # A fresh, writable, C-ordered copy: `torch.from_numpy` shares memory and wants to write.
    return np.array(array.T if self is Layout.TRANSPOSE else array, order='C', copy=True)

  def flax_shape(self, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reversed(torch_shape)) if self is Layout.TRANSPOSE else tuple(torch_shape)


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of a family's table; see the module docstring."""

  torch_key: str
  flax_path: str
  layout: Layout = Layout.IDENTITY
  when: str | None = None

  def applies(self, config: Any) -> bool:
    if self.when is None:
      return True
    negate = self.when.startswith('not ')
    value = bool(getattr(config, self.when.removeprefix('not ')))
    return value != negate

  def condition(self, config: Any) -> str:
    """E.g. `'attention_bias=False'`: the config value that decides this row."""
    field = (self.when or '').removeprefix('not ')
    return f'{field}={getattr(config, field)!r}'


@dataclasses.dataclass(frozen=True)
class KeyMapping:
  """A concrete torch key <-> flax path pair."""

  torch_key: str
  flax_path: tuple[str, ...]
  layout: Layout

  @property
  def flax_name(self) -> str:
    return '/'.join(self.flax_path)


def expand(rows: Iterable[Row], config: Any, num_layers: int) -> list[KeyMapping]:
  """The concrete mappings of `rows` for `config`, layer rows repeated `num_layers` times.

  Examples:
    >>> rows = [Row('h.{i}.w', 'h_{i}/kernel', Layout.TRANSPOSE), Row('ln.b', 'ln/bias', when='bias')]
    >>> class Cfg: bias = False
    >>> [(m.torch_key, m.flax_name) for m in expand(rows, Cfg(), 2)]
    [('h.0.w', 'h_0/kernel'), ('h.1.w', 'h_1/kernel')]
  """
  mappings = []
  for row in rows:
    if not row.applies(config):
      continue
    indices = range(num_layers) if LAYER in row.torch_key else [None]
    for i in indices:
      torch_key = row.torch_key if i is None else row.torch_key.replace(LAYER, str(i))
      flax_name = row.flax_path if i is None else row.flax_path.replace(LAYER, str(i))
      mappings.append(KeyMapping(torch_key, tuple(flax_name.split('/')), row.layout))
  return mappings


def layer_pattern(key: str) -> tuple[str, int | None]:
  """`'h.3.attn.w'` -> `('h.{i}.attn.w', 3)`: the key as a table pattern, and its layer index.

  Examples:
    >>> layer_pattern('model.layers.12.mlp.up_proj.weight')
    ('model.layers.{i}.mlp.up_proj.weight', 12)
  """
  match = _LAYER_INDEX.search(key)
  if match is None:
    return key, None
  return key[: match.start()] + '.' + LAYER + key[match.end() :], int(match.group(1))


def find_row(rows: Sequence[Row], torch_key: str) -> Row | None:
  pattern, _ = layer_pattern(torch_key)
  for row in rows:
    if row.torch_key in (pattern, torch_key):
      return row
  return None
