"""A parameter summary per group (trunk, heads, norms, each adapter method) that prints as a table."""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import traverse_util

from flax_adapters.forward import AdaptedModel
from flax_adapters.methods import summary_groups
from flax_adapters.training import trainable_mask

# Groups of what is not an adapter; the methods' groups follow in registration order.
BASE_GROUPS = ('trunk', 'norms', 'heads', 'modules_to_save')


@dataclasses.dataclass(frozen=True)
class GroupCount:
  group: str
  params: int
  trainable: int


@dataclasses.dataclass(frozen=True)
class ParamSummary:
  """Parameter counts per group; `str()` renders the table.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flax_adapters as fa
    >>> params = {'q_proj': {'kernel': jnp.ones((4, 4))}, 'out': {'kernel': jnp.ones((4, 2))}}
    >>> cfg = fa.TransferConfig(mode='lora', lora_rank=2, lora_targets=['q_proj'], modules_to_save=['out'])
    >>> s = fa.param_summary(*fa.prepare_params(params, cfg))
    >>> s.total, s.trainable
    (40, 24)
    >>> print(s)
    group            params  trainable  trainable %
    trunk                16          0         0.00
    modules_to_save       8          8        20.00
    lora                 16         16        40.00
    total                40         24        60.00
  """

  groups: tuple[GroupCount, ...]

  @property
  def total(self) -> int:
    return sum(g.params for g in self.groups)

  @property
  def trainable(self) -> int:
    return sum(g.trainable for g in self.groups)

  @property
  def trainable_fraction(self) -> float:
    return self.trainable / max(self.total, 1)

  def __getitem__(self, group: str) -> GroupCount:
    for g in self.groups:
      if g.group == group:
        return g
    return GroupCount(group, 0, 0)

  def __str__(self) -> str:
    rows = [(g.group, g.params, g.trainable) for g in self.groups] + [('total', self.total, self.trainable)]
    width = max(len(r[0]) for r in rows + [('group', 0, 0)])
    lines = [f'{"group":<{width}}  {"params":>6}  {"trainable":>9}  {"trainable %":>11}']
    for name, n, t in rows:
      # Trainable share of *all* parameters, so the column sums to the total's.
      lines.append(f'{name:<{width}}  {n:>6,}  {t:>9,}  {100 * t / max(self.total, 1):>11.2f}')
    return '\n'.join(lines)


def _group(model: AdaptedModel, key) -> str:
  entry = model.sites.get(key[:-1])
  if entry is not None:
    for m in entry.methods:
      if key[-1] in m.leaf_names:
        return m.summary_group()
  t = model.trainable
  for name, prefixes in (('heads', t.heads), ('norms', t.norms), ('modules_to_save', t.others)):
    if any(key[: len(p)] == p for p in prefixes):
      return name
  return 'trunk'


def param_summary(model: AdaptedModel, params) -> ParamSummary:
  """Count parameters per group (total, trainable) for an adapted model and its params."""
  mask = traverse_util.flatten_dict(trainable_mask(model, params))
  counts: dict[str, list[int]] = {}
  for key, leaf in traverse_util.flatten_dict(params).items():
    c = counts.setdefault(_group(model, key), [0, 0])
    n = int(np.prod(np.shape(leaf)))
    c[0] += n
    c[1] += n if mask[key] else 0
  groups = BASE_GROUPS + summary_groups()
  order = sorted(counts, key=lambda g: groups.index(g) if g in groups else len(groups))
  return ParamSummary(tuple(GroupCount(g, *counts[g]) for g in order))
