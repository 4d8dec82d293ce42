"""`TransferConfig`: what to adapt, how, and which heads to keep or add.

The fields and their defaults are those of AlphaGenome's transfer API, so a configuration written for
it reads the same here. A config compiles to placement rules (`rules()`): each mode's method class
reads its own fields (`lora_rank`, `lora_targets`, ...), so the modes are those of the registered
methods (`flax_adapters.register_method`); a method of your own reads `options[name]`. Everything is
validated on construction: a bad config fails where it is written, not inside a traced forward pass.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from flax_adapters import methods as methods_lib
from flax_adapters.methods.base import check_dropout, check_positive_int, check_positive_number
from flax_adapters.methods.houlsby import ACTIVATIONS as HOULSBY_ACTIVATIONS
from flax_adapters.methods.houlsby import INITS as HOULSBY_INITS
from flax_adapters.methods.houlsby import PLACEMENTS as HOULSBY_PLACEMENTS
from flax_adapters.paths import check_target
from flax_adapters.placement import check_adapter_dtype

# Modes that stand for what trains rather than for an adapter method.
BASE_MODES = ('linear', 'full')
# A target is a substring of a dotted module path, or a regex (`'re:...'` or a compiled pattern).
Target = str | re.Pattern


def _as_tuple(value: Any, name: str) -> tuple:
  if value is None:
    return ()
  if isinstance(value, (bytes, bytearray)):
    raise TypeError(f'`{name}` must be a string or a list of strings, found bytes {value!r}; decode it first.')
  if isinstance(value, (str, re.Pattern)):
    return (value,)
  if not isinstance(value, Sequence):
    raise TypeError(f'`{name}` must be a list of strings, found {type(value).__name__}: {value!r}.')
  return tuple(value)


def _refuse_repeats(names: tuple, field: str, why: str) -> None:
  repeated = sorted({str(n) for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f'`{field}` lists {repeated} more than once: {list(names)}. {why}')


def _check_targets(targets: tuple, name: str) -> None:
  for t in targets:
    check_target(t, name)
  _refuse_repeats(targets, name, 'Each target adds one adapter per matched layer, so list each target once.')


# The fields each built-in mode reads (IA3 and IA3_FF are one mode with two target lists).
_MODE_FIELDS = {
  'lora': ('lora_rank', 'lora_alpha', 'lora_targets', 'use_rslora', 'lora_dropout'),
  'locon': ('locon_rank', 'locon_alpha', 'locon_targets'),
  'ia3': ('ia3_targets', 'ia3_ff_targets'),
  'houlsby': ('houlsby_latent_dim', 'houlsby_placement', 'houlsby_targets', 'houlsby_activation', 'houlsby_init'),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransferConfig:
  """How to transfer a pretrained model: adapter modes, their targets and head surgery.

  `mode` is one of `'linear'`, `'lora'`, `'locon'`, `'ia3'`, `'houlsby'`, `'full'` (or the mode of
  a method registered with `register_method`), or a list of them: any subset of the adapter modes,
  with or without `'linear'`; `'full'` stands alone. `rules()` compiles the config into the
  placement rules that `adapt` takes.

  Targets are matched against dotted module paths (`'tower.blocks.0.mha.q_proj'`; linen's
  `blocks_0` is read as `blocks.0`). A plain string matches as a substring, as in AlphaGenome; a
  number at its end must end the matched number (`'blocks.1'` does not match `'blocks.10'`).
  `'re:<pattern>'` or a compiled `re.Pattern` must match the whole dotted path.

  Examples:
    >>> from flax_adapters import TransferConfig
    >>> cfg = TransferConfig(mode=['lora', 'locon'], locon_targets=['down_blocks.5'])
    >>> cfg.modes, cfg.lora_targets, cfg.lora_rank
    (('lora', 'locon'), ('q_proj', 'v_proj'), 8)
    >>> TransferConfig(mode='full').trains_everything
    True
    >>> [(r.target, r.argument) for r in TransferConfig(mode='lora').rules()]
    [('q_proj', 'lora_targets'), ('v_proj', 'lora_targets')]
  """

  # One mode name or a list of them; stored normalised as the tuple `modes`.
  mode: str | Sequence[str] = 'linear'
  # LoRA: rank r of A (in x r) and B (r x out); the delta is scaled by lora_alpha / r.
  lora_rank: int = 8
  lora_alpha: float = 16
  # Linear layers (Dense, DenseGeneral, Einsum) that get LoRA.
  lora_targets: Sequence[Target] = ('q_proj', 'v_proj')
  # Scale by lora_alpha / sqrt(r) instead of lora_alpha / r (rsLoRA, as PEFT's `use_rslora`).
  use_rslora: bool = False
  # Dropout on LoRA's input while training; on only when apply gets rngs={'adapter_dropout': key}.
  lora_dropout: float = 0.0
  # Locon (LoRA for convolutions): rank and alpha, scale locon_alpha / locon_rank.
  locon_rank: int = 4
  locon_alpha: float = 1
  # Conv layers that get Locon; required when 'locon' is in `mode`.
  locon_targets: Sequence[Target] = ()
  # IA3: a learned scale on each output feature of these layers.
  ia3_targets: Sequence[Target] = ('k_proj', 'v_proj')
  # IA3_FF: a learned scale on each input feature of these layers (feed-forward outputs).
  ia3_ff_targets: Sequence[Target] = ()
  # Houlsby bottleneck: x -> x + up(act(down(x))) with this latent size.
  houlsby_latent_dim: int = 8
  # 'block': wrap the output of each matched sub-block (e.g. 'mha', 'mlp');
  # 'linear': wrap the output of each matched linear layer.
  houlsby_placement: str = 'block'
  houlsby_targets: Sequence[Target] = ('mha', 'mlp')
  # Nonlinearity between the Houlsby projections.
  houlsby_activation: str = 'relu'
  # 'zero_up': up projection zero-initialised, so the adapter starts as the exact identity;
  # 'alphagenome': both projections truncated-normal(std 1e-3), as alphagenome-pytorch does.
  houlsby_init: str = 'zero_up'
  # Train norm scales and biases too, when an adapter mode is active (Baskerville's behaviour).
  unfreeze_norm: bool = True
  # Head surgery: drop these heads / keep only these heads / add these new heads
  # ({'name': {'modality': str, 'num_tracks': int}}).
  remove_heads: Sequence[str] = ()
  keep_heads: Sequence[str] | None = None
  new_heads: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  # Modules whose parameters train whole, e.g. the classifier of a model without a `heads` field
  # (PEFT's `modules_to_save`). Matched like the adapter targets.
  modules_to_save: Sequence[Target] = ()
  # dtype of new adapter leaves; None: the kernel's dtype promoted to at least float32, so bf16
  # models train float32 adapters (as PEFT's autocast_adapter_dtype does).
  adapter_dtype: Any = None
  # Settings of registered methods that have no fields here: {method name: {'targets': [...],
  # **constructor kwargs}} (see `Method.rules_from_config`).
  options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

  @staticmethod
  def known_modes() -> tuple[str, ...]:
    """`'linear'`, `'full'` and the modes of the registered adapter methods."""
    return BASE_MODES + methods_lib.modes()

  def __post_init__(self):
    modes = _as_tuple(self.mode, 'mode')
    known = self.known_modes()
    if not modes:
      raise ValueError(f'`mode` must name at least one of {list(known)}; found {self.mode!r}.')
    for m in modes:
      if m not in known:
        raise ValueError(
          f"`mode` {m!r} is unknown; expected one of {list(known)} or a list of them, e.g. mode=['lora', 'locon']."
        )
    if len(set(modes)) != len(modes):
      raise ValueError(f'`mode` lists a mode twice: {list(modes)}. List each mode once.')
    if 'full' in modes and len(modes) > 1:
      raise ValueError(
        f"`mode` 'full' trains every weight and cannot be combined with other modes; found "
        f"{list(modes)}. Use mode='full' alone, or drop 'full' to train adapters on a frozen trunk."
      )
    object.__setattr__(self, 'modes', modes)
    for name in (
      'lora_targets',
      'locon_targets',
      'ia3_targets',
      'ia3_ff_targets',
      'houlsby_targets',
      'modules_to_save',
    ):
      targets = _as_tuple(getattr(self, name), name)
      _check_targets(targets, name)
      object.__setattr__(self, name, targets)
    for name in ('lora_rank', 'locon_rank', 'houlsby_latent_dim'):
      check_positive_int(getattr(self, name), name)
    for name in ('lora_alpha', 'locon_alpha'):
      check_positive_number(getattr(self, name), name)
    object.__setattr__(self, 'lora_dropout', check_dropout(self.lora_dropout, 'lora_dropout'))
    if self.houlsby_placement not in HOULSBY_PLACEMENTS:
      raise ValueError(
        f'`houlsby_placement` must be one of {list(HOULSBY_PLACEMENTS)}, found '
        f"{self.houlsby_placement!r}. 'block' wraps sub-blocks such as 'mha'/'mlp'; 'linear' "
        'wraps individual linear layers.'
      )
    if self.houlsby_init not in HOULSBY_INITS:
      raise ValueError(f'`houlsby_init` must be one of {list(HOULSBY_INITS)}, found {self.houlsby_init!r}.')
    if self.houlsby_activation not in HOULSBY_ACTIVATIONS:
      raise ValueError(
        f'`houlsby_activation` must be one of {list(HOULSBY_ACTIVATIONS)}, found {self.houlsby_activation!r}.'
      )
    if not isinstance(self.unfreeze_norm, bool):
      raise TypeError(f'`unfreeze_norm` must be a bool, found {self.unfreeze_norm!r}.')
    check_adapter_dtype(self.adapter_dtype)
    self._normalise_heads()
    self._normalise_options()
    self._refuse_ignored_options()
    self.rules()  # each mode's method checks its own fields (e.g. targets required) here, not later

  def _refuse_ignored_options(self) -> None:
    """`options` for a built-in method would never be read (it has fields of its own): refuse it.

    A field of a mode that is off is not used, on purpose: one set of settings serves every mode
    (switch `mode`, keep the targets), as in AlphaGenome's API.
    """
    for name in self.options:
      if name in _MODE_FIELDS:
        raise ValueError(
          f'`options[{name!r}]` would be ignored: {name} reads its own TransferConfig fields '
          f'({", ".join(_MODE_FIELDS[name])}); set those instead.'
        )

  def _normalise_options(self) -> None:
    if not isinstance(self.options, Mapping):
      raise TypeError(
        "`options` must map method names to settings, e.g. {'my_method': {'targets': ['fc2']}}; "
        f'found {type(self.options).__name__}.'
      )
    options = {}
    for name, settings in self.options.items():
      methods_lib.get_method(name)  # raises for an unregistered name
      if not isinstance(settings, Mapping):
        raise TypeError(f"`options[{name!r}]` must be a mapping such as {{'targets': ['fc2']}}, found {settings!r}.")
      settings = dict(settings)
      if 'targets' in settings:
        settings['targets'] = _as_tuple(settings['targets'], f"options[{name!r}]['targets']")
        _check_targets(settings['targets'], f"options[{name!r}]['targets']")
      options[name] = settings
    object.__setattr__(self, 'options', options)

  def _normalise_heads(self) -> None:
    remove = _as_tuple(self.remove_heads, 'remove_heads')
    _refuse_repeats(remove, 'remove_heads', 'List each head once.')
    object.__setattr__(self, 'remove_heads', remove)
    if self.keep_heads is not None:
      keep = _as_tuple(self.keep_heads, 'keep_heads')
      _refuse_repeats(keep, 'keep_heads', 'List each head once.')
      object.__setattr__(self, 'keep_heads', keep)
      both = set(keep) & set(remove)
      if both:
        raise ValueError(f'`keep_heads` and `remove_heads` both name {sorted(both)}; give only one of them.')
    if not isinstance(self.new_heads, Mapping):
      raise TypeError(
        "`new_heads` must be a mapping like {'my_atac': {'modality': 'atac', 'num_tracks': 4}}, "
        f'found {type(self.new_heads).__name__}.'
      )
    heads = {}
    for name, spec in self.new_heads.items():
      if not isinstance(name, str) or not name:
        raise TypeError(f'`new_heads` keys must be non-empty head names, found {name!r}.')
      if not isinstance(spec, Mapping):
        raise TypeError(f"`new_heads[{name!r}]` must be a mapping with 'modality' and 'num_tracks', found {spec!r}.")
      missing = [k for k in ('modality', 'num_tracks') if k not in spec]
      if missing:
        raise ValueError(
          f'`new_heads[{name!r}]` lacks {missing}; a head spec needs both, e.g. '
          f"{{'modality': 'atac', 'num_tracks': 4}}. Found {dict(spec)!r}."
        )
      check_positive_int(spec['num_tracks'], f'new_heads[{name!r}]["num_tracks"]')
      if not isinstance(spec['modality'], str) or not spec['modality']:
        raise TypeError(f'`new_heads[{name!r}]["modality"]` must be a non-empty string, found {spec["modality"]!r}.')
      heads[name] = dict(spec)
    object.__setattr__(self, 'new_heads', heads)

  @property
  def trains_everything(self) -> bool:
    """True for `mode='full'`: every parameter trains."""
    return 'full' in self.modes

  @property
  def adapter_modes(self) -> tuple[str, ...]:
    """The adapter modes in `mode` (without 'linear' and 'full')."""
    return tuple(m for m in self.modes if m not in BASE_MODES)

  @property
  def has_head_surgery(self) -> bool:
    return bool(self.remove_heads or self.keep_heads is not None or self.new_heads)

  def rules(self) -> list:
    """The placement rules this config asks for: each adapter mode's methods, in mode order."""
    out = []
    for mode in self.adapter_modes:
      for cls in methods_lib.classes_for_mode(mode):
        out += cls.rules_from_config(self)
    return out
