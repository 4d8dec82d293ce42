"""`TransferConfig`: what to adapt, how, and which heads to keep or add.

The fields and their defaults are those of AlphaGenome's transfer API, so a configuration written for
it reads the same here. Everything is validated on construction: a bad config fails where it is
written, not deep inside a traced forward pass.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

ADAPTER_MODES = ('lora', 'locon', 'ia3', 'houlsby')
MODES = ('linear', 'full') + ADAPTER_MODES
HOULSBY_PLACEMENTS = ('block', 'linear')
HOULSBY_INITS = ('zero_up', 'alphagenome')
HOULSBY_ACTIVATIONS = ('relu', 'gelu', 'silu', 'tanh')

# A target is a substring of a dotted module path, or a regex (`'re:...'` or a compiled pattern).
Target = str | re.Pattern


def _as_tuple(value: Any, name: str) -> tuple:
  if value is None:
    return ()
  if isinstance(value, (str, re.Pattern)):
    return (value,)
  if not isinstance(value, Sequence):
    raise TypeError(f'`{name}` must be a list of strings, found {type(value).__name__}: {value!r}.')
  return tuple(value)


def _check_targets(targets: tuple, name: str) -> None:
  for t in targets:
    if isinstance(t, re.Pattern):
      continue
    if not isinstance(t, str) or not t:
      raise TypeError(
        f'`{name}` entries must be non-empty strings (substrings of module paths such as '
        f"'q_proj'), 're:<regex>' strings or compiled regexes; found {t!r}."
      )
    if t.startswith('re:'):
      try:
        re.compile(t[3:])
      except re.error as e:
        raise ValueError(f'`{name}` entry {t!r} is not a valid regex: {e}.') from None
  duplicates = {t for t in targets if targets.count(t) > 1}
  if duplicates:
    raise ValueError(
      f'`{name}` lists {sorted(map(str, duplicates))} more than once; each target adds one adapter '
      'per matched layer, so list each target once.'
    )


def _check_positive_int(value: Any, name: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'`{name}` must be a positive integer, found {value!r}.')


def _check_positive_number(value: Any, name: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise ValueError(f'`{name}` must be a positive number, found {value!r}.')


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransferConfig:
  """How to transfer a pretrained model: adapter modes, their targets and head surgery.

  `mode` is one of `'linear'`, `'lora'`, `'locon'`, `'ia3'`, `'houlsby'`, `'full'`, or a list of
  them: any subset of the adapter modes, with or without `'linear'`; `'full'` stands alone.

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

  def __post_init__(self):
    modes = _as_tuple(self.mode, 'mode')
    if not modes:
      raise ValueError(f'`mode` must name at least one of {list(MODES)}; found {self.mode!r}.')
    for m in modes:
      if m not in MODES:
        raise ValueError(
          f"`mode` {m!r} is unknown; expected one of {list(MODES)} or a list of them, e.g. mode=['lora', 'locon']."
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
      _check_positive_int(getattr(self, name), name)
    for name in ('lora_alpha', 'locon_alpha'):
      _check_positive_number(getattr(self, name), name)
    if (
      isinstance(self.lora_dropout, bool)
      or not isinstance(self.lora_dropout, (int, float))
      or not 0 <= self.lora_dropout < 1
    ):
      raise ValueError(f'`lora_dropout` must be a number in [0, 1), found {self.lora_dropout!r}.')
    if 'locon' in modes and not self.locon_targets:
      raise ValueError(
        "`locon_targets` is empty but mode includes 'locon'; Locon needs the conv layers to "
        "adapt, e.g. locon_targets=['down_blocks.4', 'down_blocks.5']."
      )
    if 'lora' in modes and not self.lora_targets:
      raise ValueError("`lora_targets` is empty but mode includes 'lora'; name the layers, e.g. ['q_proj', 'v_proj'].")
    if 'ia3' in modes and not (self.ia3_targets or self.ia3_ff_targets):
      raise ValueError("`ia3_targets` and `ia3_ff_targets` are both empty but mode includes 'ia3'.")
    if 'houlsby' in modes and not self.houlsby_targets:
      raise ValueError("`houlsby_targets` is empty but mode includes 'houlsby'; e.g. ['mha', 'mlp'].")
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
    self._normalise_heads()

  def _normalise_heads(self) -> None:
    remove = _as_tuple(self.remove_heads, 'remove_heads')
    object.__setattr__(self, 'remove_heads', remove)
    if self.keep_heads is not None:
      keep = _as_tuple(self.keep_heads, 'keep_heads')
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
      _check_positive_int(spec['num_tracks'], f'new_heads[{name!r}]["num_tracks"]')
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
    return tuple(m for m in self.modes if m in ADAPTER_MODES)

  @property
  def has_head_surgery(self) -> bool:
    return bool(self.remove_heads or self.keep_heads is not None or self.new_heads)

  def lora_scale(self) -> float:
    return self.lora_alpha / (self.lora_rank**0.5 if self.use_rslora else self.lora_rank)

  def locon_scale(self) -> float:
    return self.locon_alpha / self.locon_rank
