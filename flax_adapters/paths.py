"""Module paths as dotted names, and matching targets against them.

A module path is a tuple of names (`('tower', 'blocks_0', 'mha', 'q_proj')`). For matching it is
written dotted, with linen's list naming `blocks_0` read as `blocks.0`
(`'tower.blocks.0.mha.q_proj'`), so targets written for PyTorch module names (`'down_blocks.4'`)
work on linen models unchanged.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from typing import Any

_LIST_SUFFIX = re.compile(r'^(.*\D)_(\d+)$')

Path = tuple[str, ...]


def segment_name(segment: str) -> str:
  """`'blocks_0'` -> `'blocks.0'`: linen's list naming as a PyTorch-style dotted index."""
  m = _LIST_SUFFIX.match(segment)
  return f'{m.group(1)}.{m.group(2)}' if m else segment


def dotted(path: Sequence[str]) -> str:
  """The dotted name that targets are matched against.

  Examples:
    >>> dotted(('encoder', 'down_blocks_4', 'conv1'))
    'encoder.down_blocks.4.conv1'
  """
  return '.'.join(segment_name(str(p)) for p in path)


def spellings(path: Sequence[str], limit: int = 64) -> list[str]:
  """Every dotted spelling of `path`, each `name_N` segment read both as `name.N` and as `name_N`.

  Linen names list items `blocks_0`, but a PyTorch module can be called `ln_1` itself (GPT-2), so
  a target written either way matches. The canonical spelling (all `name.N`) comes first.

  Examples:
    >>> spellings(('h_0', 'ln_1'))
    ['h.0.ln.1', 'h.0.ln_1', 'h_0.ln.1', 'h_0.ln_1']
  """
  options = [[segment_name(str(p)), str(p)] if segment_name(str(p)) != str(p) else [str(p)] for p in path]
  out = ['']
  for opts in options:
    out = [f'{o}.{s}' if o else s for o in out for s in opts][:limit]
  return out


def raw(path: Sequence[str]) -> str:
  """The path as linen writes it, joined with '/': `'encoder/down_blocks_4/conv1'`."""
  return '/'.join(str(p) for p in path)


def _substring_matches(target: str, name: str) -> bool:
  start = name.find(target)
  while start >= 0:
    end = start + len(target)
    # A target ending in a digit must end the number it matched: 'blocks.1' is not 'blocks.10'.
    if not (target[-1].isdigit() and end < len(name) and name[end].isdigit()):
      return True
    start = name.find(target, start + 1)
  return False


def matches(target, path: Sequence[str]) -> bool:
  """Whether `target` selects the module at `path`.

  A plain string is a substring of the dotted path (or of the raw '/'-joined linen path);
  `'re:<regex>'` and compiled patterns must match the whole dotted path. Segments like `ln_1`
  may be spelled either way (see `spellings`).

  Examples:
    >>> matches('q_proj', ('tower', 'blocks_0', 'mha', 'q_proj'))
    True
    >>> matches('blocks.1', ('tower', 'blocks_10', 'mlp'))
    False
    >>> matches(r're:.*\\.mha\\.(q|v)_proj', ('tower', 'blocks_0', 'mha', 'v_proj'))
    True
    >>> matches(r're:transformer\\.h\\.\\d+\\.ln_1', ('transformer', 'h_3', 'ln_1'))
    True
  """
  names = spellings(path)
  if isinstance(target, re.Pattern):
    return any(target.fullmatch(n) is not None for n in names)
  if target.startswith('re:'):
    pattern = re.compile(target[3:])
    return any(pattern.fullmatch(n) is not None for n in names)
  return any(_substring_matches(target, n) for n in names) or _substring_matches(target, raw(path))


def near_misses(target, paths: Iterable[Sequence[str]], n: int = 5) -> list[str]:
  """Dotted paths that look most like `target`, for error messages."""
  names = sorted({dotted(p) for p in paths})
  key = target.pattern if isinstance(target, re.Pattern) else target.removeprefix('re:')
  last = {name.rsplit('.', 1)[-1]: name for name in names}
  close = difflib.get_close_matches(key, names, n=n, cutoff=0.3)
  close += [last[s] for s in difflib.get_close_matches(key, list(last), n=n, cutoff=0.5)]
  return list(dict.fromkeys(close))[:n] or names[:n]


def describe_target(target) -> str:
  return f're:{target.pattern}' if isinstance(target, re.Pattern) else target


def check_target(target: Any, argument: str) -> None:
  """A target is a non-empty string, `'re:<regex>'` with a valid regex, or a compiled pattern."""
  if isinstance(target, re.Pattern):
    return
  if not isinstance(target, str) or not target:
    raise TypeError(
      f'`{argument}` entries must be non-empty strings (substrings of module paths such as '
      f"'q_proj'), 're:<regex>' strings or compiled regexes; found {target!r}."
    )
  if target.startswith('re:'):
    try:
      re.compile(target[3:])
    except re.error as e:
      raise ValueError(f'`{argument}` entry {target!r} is not a valid regex: {e}.') from None
