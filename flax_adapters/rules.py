"""Placement rules: which adapter methods go on which modules.

A `Rule` is a target and the methods it places on every module the target matches (of the kinds
each method adapts). A target is a substring of a dotted module path (`'q_proj'`,
`'down_blocks.4'`; linen's `blocks_0` reads as `blocks.0`), `'re:<regex>'` or a compiled regex
matched against the whole path. Rules are an ordered sequence, frozen, one per target (after qwix's
rule dataclasses); `TransferConfig.rules()` compiles a config into them, and `adapt` takes them
directly. A rule that matches nothing is an error; all such rules are reported together, each
with the module paths nearest to it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

from flax_adapters import paths as paths_lib
from flax_adapters.methods import REGISTRY, AdapterError, Method, sort_methods
from flax_adapters.paths import check_target
from flax_adapters.tracing import Site

Path = tuple[str, ...]
Target = str | re.Pattern


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
  """Place `methods` on every module that `target` matches.

  `argument` is the name error messages blame (`'lora_targets'` for rules compiled from a
  `TransferConfig`); by default the rule's position, `rules[i]`.

  Examples:
    >>> import flax_adapters as fa
    >>> rule = fa.Rule(target='q_proj', methods=fa.LoRA(rank=4))
    >>> rule.methods
    (LoRA(rank=4, alpha=16.0, use_rslora=False, dropout=0.0),)
  """

  target: Target
  methods: Method | Sequence[Method]
  argument: str | None = None

  def __post_init__(self):
    methods = (self.methods,) if isinstance(self.methods, Method) else self.methods
    if isinstance(methods, (str, bytes)) or not isinstance(methods, Sequence) or not methods:
      raise TypeError(f'`methods` of the rule for {self.target!r} must be a method or a non-empty list of methods.')
    for m in methods:
      if not isinstance(m, Method):
        raise TypeError(
          f'`methods` of the rule for {self.target!r} must be adapter methods (fa.LoRA(...), fa.IA3(), ...), found {m!r}.'
        )
    object.__setattr__(self, 'methods', tuple(methods))
    check_target(self.target, self.argument or 'rules')

  @property
  def name(self) -> str:
    return self.argument or 'rules'


def as_rules(rules, argument: str = 'rules') -> tuple[Rule, ...]:
  """Normalise rules: `Rule`s, `(target, method or methods)` pairs, or a mapping target -> methods."""
  if isinstance(rules, Mapping):
    rules = list(rules.items())
  if isinstance(rules, Rule):
    rules = [rules]
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
    raise TypeError(
      f'`{argument}` must be a sequence of fa.Rule or (target, method) pairs, or a mapping such as '
      f"{{'q_proj': fa.LoRA(rank=8)}}; found {type(rules).__name__}."
    )
  out = []
  for i, rule in enumerate(rules):
    if isinstance(rule, Rule):
      out.append(rule if rule.argument else dataclasses.replace(rule, argument=f'{argument}[{i}]'))
    elif isinstance(rule, tuple) and len(rule) == 2:
      target, methods = rule
      label = (
        f'{argument}[{paths_lib.describe_target(target)!r}]' if isinstance(target, (str, re.Pattern)) else argument
      )
      out.append(Rule(target=target, methods=methods, argument=label))
    else:
      raise TypeError(f'`{argument}[{i}]` must be a fa.Rule or a (target, method) pair, found {rule!r}.')
  return tuple(out)


def _topmost(paths: list[Path]) -> list[Path]:
  chosen = set(paths)
  return [p for p in paths if not any(p[:i] in chosen for i in range(len(p)))]


def _no_match(target, argument: str, sites) -> str:
  return (
    f'`{argument}` entry {paths_lib.describe_target(target)!r} matches no module. Nearest module '
    f'paths: {paths_lib.near_misses(target, sites)}.'
  )


_HOW_TARGETS_MATCH = (
  " Targets are substrings of dotted paths (linen's 'blocks_0' reads as 'blocks.0'), or 're:<regex>' matched "
  'against the whole path.'
)


def _refuse_rewritten_weights(method, site) -> None:
  stacker = site.option('params_stacked_by')
  if stacker is not None:
    raise AdapterError(
      f'{site.describe()} runs inside a lifted nn.scan / nn.vmap ({stacker}) that stacks its params on an axis '
      f"other than the first, but {method.name}'s per-layer leaves are stacked first. Stack the layers first: "
      "variable_axes={'params': 0}."
    )
  disagree = site.option('calls_disagree')
  if disagree is not None:
    raise AdapterError(
      f'{site.describe()} is called more than once with equations that give its kernel axes different roles '
      f'({disagree}), so no one {method.name} adapter fits every call. Adapt a layer that is used one way, or '
      f'train this one whole (modules_to_save=[{site.name!r}]).'
    )
  wrapper = site.option('weights_rewritten_by')
  if wrapper is not None:
    raise AdapterError(
      f'{site.describe()} runs inside nn.{wrapper}, which rewrites its weights before every use: a merged '
      f'{method.name} delta would be rewritten with them, and {wrapper} may rewrite the adapter leaves too. '
      f'Adapt a layer outside the {wrapper}, or train this one whole (modules_to_save=[{site.name!r}]).'
    )


def select(sites: Mapping[Path, Site], target, argument: str, kinds=None, topmost=False) -> list[Path]:
  """Paths of sites that `target` matches (of the given kinds); errors if it matches nothing."""
  matched = [p for p in sites if paths_lib.matches(target, p)]
  if not matched:
    raise ValueError(_no_match(target, argument, sites) + _HOW_TARGETS_MATCH)
  if kinds is not None:
    matched = [p for p in matched if sites[p].kind in kinds]
  return _topmost(matched) if topmost else matched


def topmost(paths) -> tuple[Path, ...]:
  return tuple(_topmost(list(paths)))


def _refuse_unregistered(rules: Sequence[Rule]) -> None:
  """Adapter leaves are recognised, restored and merged through the registry: an unregistered method's would not be."""
  for rule in rules:
    for method in rule.methods:
      cls = type(method)
      if REGISTRY.get(method.name) is not cls:
        other = REGISTRY.get(method.name)
        why = (
          f'the name {method.name!r} is registered to {other.__name__}, not {cls.__name__}'
          if other is not None
          else 'it is not registered'
        )
        raise ValueError(
          f'`{rule.name}` places {cls.__name__} (method {method.name!r}), but {why}: its leaves would not be '
          'recognised as adapter leaves (trainable, saved, merged). Register the class first: decorate it with '
          '@fa.register_method (or call fa.register_method(cls)).'
        )


def place(sites: Mapping[Path, Site], rules: Sequence[Rule]) -> dict[Path, tuple[Method, ...]]:
  """Which methods go on which module (in forward order), every placement checked.

  Rules are ordered: a method goes on a module from the first rule that places it there (so a
  specific rule before a general one sets, e.g., one layer's rank), and later rules skip that
  module for that method. Raises when rules match no module (all of them listed), when a rule
  places nothing because earlier rules cover all it matches, when a method cannot adapt a module
  its rule matches (the method says why), or when two entries of one `TransferConfig` target list
  put one method twice on one module.
  """
  _refuse_unregistered(rules)
  unmatched = [r for r in rules if not any(paths_lib.matches(r.target, p) for p in sites)]
  if unmatched:
    raise ValueError(' '.join(_no_match(r.target, r.name, sites) for r in unmatched) + _HOW_TARGETS_MATCH)
  placed: dict[Path, dict[str, tuple[Method, Rule]]] = {}
  shadowed = []
  for rule in rules:
    every = [p for p in sites if paths_lib.matches(rule.target, p)]
    placed_any = False
    for method in rule.methods:
      kinds, only_topmost = method.placement_kinds()
      fitting = [p for p in every if sites[p].kind in kinds]
      fitting = _topmost(fitting) if only_topmost else fitting
      if not fitting:
        # Let the method explain why the closest wrong module does not fit.
        wrong = sorted(every, key=lambda p: (sites[p].kind == 'block', len(p)))
        method.check(sites[wrong[0]])
        raise AdapterError(
          f'`{rule.name}` entry {paths_lib.describe_target(rule.target)!r} matches no module that '
          f'{method.name} can adapt (it adapts {list(kinds)}).'
        )
      for path in fitting:
        previous = placed.setdefault(path, {}).get(method.name)
        if previous is not None:
          before = previous[1]
          if before.argument is None or before.argument != rule.argument:
            continue  # ordered rules: the first that places this method on the module wins
          raise ValueError(
            f'{method.name} would be added twice to {paths_lib.dotted(path)}: both '
            f'{paths_lib.describe_target(before.target)!r} and {paths_lib.describe_target(rule.target)!r} in '
            f'`{rule.name}` match it. Each layer gets one adapter of each kind; make the targets disjoint (or write '
            'ordered rules, where the first match wins).'
          )
        _refuse_rewritten_weights(method, sites[path])
        method.check(sites[path])
        method.check_size(sites[path])
        placed[path][method.name] = (method, rule)
        placed_any = True
    if not placed_any:
      shadowed.append(rule)
  if shadowed:
    raise ValueError(
      ' '.join(
        f'`{r.name}` entry {paths_lib.describe_target(r.target)!r} places nothing: every module it matches already '
        f'has {[m.name for m in r.methods]} from an earlier rule (first match wins).'
        for r in shadowed
      )
      + ' Drop it, or move it before the rules that shadow it.'
    )
  return {path: sort_methods(m for m, _ in entries.values()) for path, entries in placed.items()}
