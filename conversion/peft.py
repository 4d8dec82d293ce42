"""PEFT adapters <-> flax_adapters: `import_peft`, `export_peft` and `export_merged`.

A PEFT adapter directory is `adapter_config.json` + `adapter_model.safetensors` (or
`adapter_model.bin`). Its keys name torch modules of the class the adapter was made on:

  base_model.model.<torch module>.lora_A.weight   [r, in]    LoRA (Linear and GPT-2's Conv1D alike)
  base_model.model.<torch module>.lora_B.weight   [out, r]
  base_model.model.<torch module>.ia3_l           [out, 1]   IA3; [1, in] for `feedforward_modules`
  base_model.model.<torch module>.<param>                    a full copy of a `modules_to_save` module

Torch modules are tied to flax modules through the family's key table (`Family.rows`): the module
of a torch key `X.weight` is the module of its flax leaf `.../kernel`, never a guessed spelling. A
LoRA pair becomes our `lora_a` `[in, r]` = `lora_A.T` and `lora_b` `[r, out]` = `lora_B.T` (PEFT
keeps both Linear-shaped even for Conv1D, whose own weight is `[in, out]`); `ia3_l` becomes
`ia3_scale` `[out]` or `ia3_ff_scale` `[in]`; `modules_to_save` tensors go through the table with
its layouts, like any checkpoint tensor.

Which modules carry adapters, and with which rank and alpha, is decided exactly as PEFT decides it
(`peft.tuners.tuners_utils.check_target_module_exists`, `peft.utils.other.get_pattern_key`,
`peft.utils.other._set_trainable`), and the file must agree with the config in both directions:

- `target_modules` as a string is a regex that must match the whole module name
  (`re.fullmatch`); as a list, an entry selects a module whose name equals it or ends with
  `'.' + entry`. `exclude_modules` uses the same two rules and wins. `layers_to_transform`
  (with optional `layers_pattern`) then keeps list matches whose first layer index is listed.
- `rank_pattern` / `alpha_pattern` keys are regexes tried in order; the first with
  `re.match(rf'(.*\\.)?({key})$', module_name)` gives the module's rank / alpha, else `r` /
  `lora_alpha` apply.
- `modules_to_save` entries select every module whose name ends with the entry (plain
  `str.endswith`, no dot boundary); `feedforward_modules` likewise (or `re.fullmatch` if a string).
  A module selected by `modules_to_save` is never a LoRA/IA3 target.

An adapter made on the family's bare trunk class (`GPT2Model`: `h.0.attn.c_attn`) or on a wrapper
(`BertForMaskedLM`: `bert.encoder...`) is read with the family's prefix conventions (those of
`Family.normalize_keys`); its patterns are matched against its own names. Export always writes for
the family's class (`Family.hf_class_name`).

`fan_in_fan_out` only tells PEFT how the base weight is laid out, and PEFT corrects it per layer
from the layer's class (with a warning); the table knows each layer's class (`Layout.TRANSPOSE`:
nn.Linear; `Layout.IDENTITY` kernel: HF Conv1D), so import follows the layer and export writes
`fan_in_fan_out=True` exactly when a target is a Conv1D (GPT-2).

Anything PEFT can express that this module cannot reproduce exactly is refused with an error that
names the option and a way out; nothing in a file is ever dropped silently. Refused on import:
PEFT types other than LoRA and IA3, DoRA, `lora_bias`, `bias != 'none'`, `target_parameters`,
layer replication, trainable tokens, activated LoRA, QALoRA, initialisations that rewrite the
base (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA), LoRA on embeddings, `modules_to_save` of an embedding
tied to the LM head, any option this module does not know, and the option combinations PEFT's own
config classes refuse (`layers_to_transform` / `layers_pattern` with a regex `target_modules`,
`layers_pattern` without `layers_to_transform`, IA3 `feedforward_modules` outside `target_modules`).
`lora_dropout` carries over: it acts in training only, when the adapted model's apply gets
`rngs={'adapter_dropout': key}`.

Granularity: torch and flax modules correspond one to one in the BERT, LLaMA and GPT-2 families
(GPT-2's `c_attn` is one fused Conv1D in torch and one Dense in flax), so no adapter ever has to be
split or joined. A family whose flax model fused what torch keeps apart (or the reverse) would
need that (LoRA on q/k/v <-> on a fused qkv kernel: A concatenated along the rank axis, B
block-diagonal, rank r·n); it is not implemented, and `module_map` would not pair such modules,
so import reports them as modules the flax model lacks and export as layers the table does not map.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from conversion.families import Family, get_family
from conversion.key_mapping import KeyMapping, Layout
from conversion.pretrained import family_of, save_pretrained
from conversion.state_dict import load_state_dict, read_json_object, save_safetensors, to_numpy, write_json
from flax_adapters import paths as paths_lib
from flax_adapters.forward import AdaptedModel, check_adapter_leaves
from flax_adapters.merge import merge_adapters
from flax_adapters.methods import LEAF_NAMES, method_from_peft
from flax_adapters.placement import adapt
from flax_adapters.tracing import trace_model
from flax_adapters.tree import get_subtree

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILES = ('adapter_model.safetensors', 'adapter_model.bin')
PREFIX = 'base_model.model.'
SUPPORTED_TYPES = ('LORA', 'IA3')
DEFAULT_TASK_TYPES = {'llama': 'CAUSAL_LM', 'gpt2': 'CAUSAL_LM', 'bert': 'FEATURE_EXTRACTION'}
# peft.TaskType's values (peft 0.21): what PeftConfig accepts as task_type.
TASK_TYPES = ('SEQ_CLS', 'SEQ_2_SEQ_LM', 'CAUSAL_LM', 'TOKEN_CLS', 'QUESTION_ANS', 'FEATURE_EXTRACTION')
_DEFAULT = object()
_MAX_LISTED = 12

# `init_lora_weights` values that only choose how fresh weights are drawn. The others (PiSSA, OLoRA,
# CorDA, LoftQ, LoRA-GA) rewrite the base weights too, so their adapters need that modified base.
_PLAIN_INITS = (True, False, None, 'gaussian', 'eva', 'orthogonal')


# -- what the config says --------------------------------------------------------------------


def _refuse(option: str, value: Any, why: str, fix: str) -> ValueError:
  return ValueError(f'{CONFIG_FILE} sets {option}={value!r}: {why}. Fix: {fix}.')


_MERGE_FIX = (
  'merge the adapter in PyTorch (PeftModel.merge_and_unload()), save the merged model, and '
  'convert that with conversion.load_pretrained'
)

# Options that must keep their neutral value: (field, neutral values, what it means).
_NEUTRAL_LORA = (
  ('use_dora', (False, None), 'DoRA (a learned magnitude vector per output feature) is not implemented'),
  ('lora_bias', (False, None), 'LoRA with a trained bias on lora_B is not implemented'),
  ('target_parameters', (None, [], ()), 'LoRA on raw nn.Parameters (e.g. MoE experts) is not implemented'),
  ('layer_replication', (None, [], ()), "layer replication changes the model's depth; not implemented"),
  ('trainable_token_indices', (None, [], {}), 'trainable token rows of an embedding are not implemented'),
  (
    'alora_invocation_tokens',
    (None, [], ()),
    'activated LoRA (applied only after invocation tokens) is not implemented',
  ),
  ('use_qalora', (False, None), 'QALoRA (quantization-group pooling of the input) is not implemented'),
  ('use_bdlora', (False, None, {}), 'block-diagonal LoRA is not implemented'),
  ('megatron_config', (None, {}), 'Megatron-parallel LoRA layers are not implemented'),
  ('arrow_config', (None, {}), 'Arrow routing between LoRA experts is not implemented'),
  ('kasa_config', (None, {}), 'KaSA (singular-value adaptation) is not implemented'),
  ('monteclora_config', (None, {}), 'MonteCLoRA is not implemented'),
  ('velora_config', (None, {}), 'VeLoRA is not implemented'),
  ('loftq_config', (None, {}), 'LoftQ rewrites the (quantized) base weights, so the adapter only fits that base'),
)
# Fields read and honoured, or informational only.
_KNOWN = {
  'common': (
    'peft_type',
    'task_type',
    'auto_mapping',
    'peft_version',
    'base_model_name_or_path',
    'revision',
    'inference_mode',
    'target_modules',
    'exclude_modules',
    'fan_in_fan_out',
    'modules_to_save',
  ),
  # (IA3Config has no layers_to_transform: PEFT ignores it there, so for IA3 it is an unknown option.)
  'LORA': (
    'layers_to_transform',
    'layers_pattern',
    'r',
    'lora_alpha',
    'lora_dropout',
    'bias',
    'use_rslora',
    'init_lora_weights',
    'rank_pattern',
    'alpha_pattern',
    'megatron_core',
    'qalora_group_size',
    'runtime_config',
    'eva_config',
    'corda_config',
    'lora_ga_config',
    'ensure_weight_tying',
  ),
  'IA3': ('feedforward_modules', 'init_ia3_weights'),
}


@dataclasses.dataclass(frozen=True)
class PeftSpec:
  """An `adapter_config.json`, checked: everything import and export act on.

  Attributes:
    peft_type: `'LORA'` or `'IA3'`.
    raw: the JSON as read (or as written, for export).
  """

  peft_type: str
  raw: Mapping[str, Any]

  def get(self, key, default=None):
    value = self.raw.get(key, default)
    return default if value is None else value

  @property
  def r(self) -> int:
    return int(self.get('r', 8))

  @property
  def lora_alpha(self) -> float:
    return self.get('lora_alpha', 8)

  # -- PEFT's matching rules, in one place ---------------------------------------------------

  def targets(self, name: str, kind: str | None = None) -> bool:
    """Whether PEFT puts this adapter on module `name` (`check_target_module_exists`)."""
    exclude = self.raw.get('exclude_modules')
    if exclude:
      if isinstance(exclude, str):
        if re.fullmatch(exclude, name):
          return False
      elif name in exclude or any(name.endswith(f'.{e}') for e in exclude):
        return False
    for m in self.raw.get('modules_to_save') or ():
      if re.match(rf'(^|.*\.){m}($|\..*)', name):
        return False
    target = self.raw.get('target_modules')
    if target is None:
      return False
    if isinstance(target, str):
      if target.lower() == 'all-linear':
        return kind in ('linear', 'conv1d') and name != 'lm_head'
      return re.fullmatch(target, name) is not None
    if name in target:
      return True
    if not any(name.endswith(f'.{t}') for t in target):
      return False
    indexes = self.raw.get('layers_to_transform') if self.peft_type == 'LORA' else None
    if indexes is None or (isinstance(indexes, list) and not indexes):
      return True
    pattern = self.raw.get('layers_pattern')
    match = None
    if not pattern:
      match = re.match(r'.*?\.[^.]*\.(?P<idx>\d+)\.', name)
    else:
      for p in [pattern] if isinstance(pattern, str) else pattern:
        match = re.match(rf'(?:^|.*?\.){p}\.(?P<idx>\d+)\.', name)
        if match is not None:
          break
    if match is None:
      return False
    index = int(match.group('idx'))
    return index == indexes if isinstance(indexes, int) else index in indexes

  def deselection(self, name: str, kind: str | None = None) -> str:
    """Which option keeps module `name` from being a target, in words (for error messages)."""
    raw = self.raw
    bare = {k: v for k, v in raw.items() if k not in ('exclude_modules', 'modules_to_save', 'layers_to_transform')}
    if not PeftSpec(self.peft_type, bare).targets(name, kind):
      return f'target_modules={raw.get("target_modules")!r} does not select module {name!r}'
    with_layers = {**bare, 'layers_to_transform': raw.get('layers_to_transform')}
    if not PeftSpec(self.peft_type, with_layers).targets(name, kind):
      return (
        f'layers_to_transform={raw.get("layers_to_transform")!r} (layers_pattern={raw.get("layers_pattern")!r}) '
        f'leaves out module {name!r}'
      )
    if not PeftSpec(self.peft_type, {**raw, 'modules_to_save': None}).targets(name, kind):
      return f'exclude_modules={raw.get("exclude_modules")!r} excludes module {name!r}'
    return (
      f'modules_to_save={raw.get("modules_to_save")!r} trains module {name!r} (or a module holding it) whole, '
      'and PEFT never adapts such a module'
    )

  def saves(self, name: str) -> bool:
    """Whether `modules_to_save` selects module `name` (PEFT's `_set_trainable`: plain endswith)."""
    return any(name.endswith(m) for m in self.raw.get('modules_to_save') or ())

  def feedforward(self, name: str) -> bool:
    ff = self.raw.get('feedforward_modules')
    if not ff:
      return False
    if isinstance(ff, str):
      return re.fullmatch(ff, name) is not None
    return any(name.endswith(m) for m in ff)

  def module_settings(self, name: str) -> dict[str, Any]:
    """The PEFT settings of module `name` that decide its adapter (what `Method.from_peft_settings` reads)."""
    if self.peft_type == 'LORA':
      r, alpha = self.rank_alpha(name)
      return {
        'r': r,
        'lora_alpha': _number(alpha),
        'use_rslora': bool(self.raw.get('use_rslora', False)),
        # lora_dropout acts in training only: on when apply gets rngs={'adapter_dropout': key}.
        'lora_dropout': float(self.raw.get('lora_dropout') or 0.0),
      }
    return {'feedforward': self.feedforward(name)}

  def describe_settings(self, name: str) -> str:
    """Where module `name`'s settings come from, for error messages."""
    if self.peft_type == 'LORA':
      rank_pattern = self.raw.get('rank_pattern')
      return (
        f'rank {self.rank_alpha(name)[0]} from r={self.r}{f", rank_pattern={rank_pattern}" if rank_pattern else ""}'
      )
    return 'feedforward: [1, in]' if self.feedforward(name) else '[out, 1]'

  def rank_alpha(self, name: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives module `name` (`get_pattern_key` over the pattern dicts)."""
    rank_pattern = self.raw.get('rank_pattern') or {}
    alpha_pattern = self.raw.get('alpha_pattern') or {}
    return (
      int(rank_pattern.get(pattern_key(rank_pattern, name), self.r)),
      alpha_pattern.get(pattern_key(alpha_pattern, name), self.lora_alpha),
    )


def pattern_key(pattern_keys, name: str) -> str:
  """PEFT's `get_pattern_key`: the first key that, as a regex, matches a dotted suffix of `name`.

  Examples:
    >>> pattern_key(['q_proj', 'layers.1.self_attn.q_proj'], 'model.layers.1.self_attn.q_proj')
    'q_proj'
    >>> pattern_key(['v_proj'], 'model.layers.1.self_attn.q_proj')
    'model.layers.1.self_attn.q_proj'
  """
  for key in pattern_keys:
    if re.match(rf'(.*\.)?({key})$', name):
      return key
  return name


def parse_peft_config(raw: Mapping[str, Any], *, source: str = CONFIG_FILE) -> PeftSpec:
  """Check an `adapter_config.json` dict: a supported type, no option we cannot honour exactly."""
  if not isinstance(raw, Mapping):
    raise TypeError(f'{source} must hold a JSON object, found {type(raw).__name__}.')
  # PEFT's own `to_dict()` holds sets where its JSON holds lists.
  raw = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in raw.items()}
  peft_type = raw.get('peft_type')
  if peft_type not in SUPPORTED_TYPES:
    raise ValueError(
      f'{source} has peft_type={peft_type!r}; import_peft reads {list(SUPPORTED_TYPES)} only '
      '(LoHa, LoKr, AdaLoRA, OFT, BOFT, VeRA, prompt tuning, ... are not implemented). '
      f'Fix: {_MERGE_FIX}.'
    )
  if peft_type == 'LORA':
    for field, neutral, why in _NEUTRAL_LORA:
      value = raw.get(field)
      if not any(value == n and type(value) is type(n) for n in neutral if n is not None) and value is not None:
        raise _refuse(field, value, why, f'train the adapter without it, or {_MERGE_FIX}')
    bias = raw.get('bias', 'none')
    if bias != 'none':
      raise _refuse(
        'bias',
        bias,
        "PEFT then also trains the base layers' biases, which is not implemented",
        f"train with bias='none' (name the layers in modules_to_save to train them whole), or {_MERGE_FIX}",
      )
    init = raw.get('init_lora_weights', True)
    if init not in _PLAIN_INITS:
      raise _refuse(
        'init_lora_weights',
        init,
        'this initialisation rewrites the base weights, so the adapter only fits that modified base',
        'save the adapter with path_initial_model_for_weight_conversion '
        f'(PEFT then writes a plain LoRA), or {_MERGE_FIX}',
      )
  _check_values(raw, peft_type, source)
  known = set(_KNOWN['common']) | set(_KNOWN.get(peft_type, ())) | {f for f, _, _ in _NEUTRAL_LORA}
  unknown = {k: v for k, v in raw.items() if k not in known and v not in (None, False, {}, [], '', 0)}
  if unknown:
    k = sorted(unknown)[0]
    raise _refuse(
      k,
      unknown[k],
      f'import_peft does not know this {peft_type} option (newer PEFT?), so it cannot promise the same outputs',
      f'leave it at its default, or {_MERGE_FIX}',
    )
  targets = raw.get('target_modules')
  if not targets or not isinstance(targets, (str, list)):
    raise ValueError(f'{source} has target_modules={targets!r}; expected a regex string or a list of module names.')
  _check_patterns(raw, source)
  _check_combinations(raw, peft_type, source)
  return PeftSpec(peft_type=peft_type, raw=dict(raw))


def _check_combinations(raw: Mapping[str, Any], peft_type: str, source: str) -> None:
  """Option combinations that PEFT's own config classes refuse (`LoraConfig` / `IA3Config.__post_init__`).

  `PeftModel.from_pretrained` cannot load such a config, and reading it anyway would mean dropping
  an option (layers_to_transform with a regex target_modules) or guessing what it meant.
  """
  targets = raw.get('target_modules')
  if peft_type == 'LORA':
    for field in ('layers_to_transform', 'layers_pattern'):
      if isinstance(targets, str) and raw.get(field) is not None:
        raise ValueError(
          f'{source} sets {field}={raw[field]!r} with target_modules as a regex string ({targets!r}); PEFT applies '
          f'{field} to a list of module names only and refuses this config (LoraConfig: "`{field}` cannot be '
          'used when `target_modules` is a str"). Fix: select the layers inside the regex (e.g. '
          r"'.*\.layers\.1\..*q_proj'), or give target_modules as a list of names."
        )
    if raw.get('layers_pattern') and raw.get('layers_to_transform') is None:
      raise ValueError(
        f'{source} sets layers_pattern={raw["layers_pattern"]!r} but layers_to_transform=None; PEFT refuses this '
        'config (a layers_pattern only says where the index of layers_to_transform is). Fix: add '
        'layers_to_transform (the layer indexes to adapt), or set layers_pattern to null.'
      )
  feedforward = raw.get('feedforward_modules')
  if peft_type == 'IA3' and isinstance(feedforward, list) and isinstance(targets, list):
    extra = sorted(set(feedforward) - set(targets))
    if extra:
      raise ValueError(
        f'{source} has feedforward_modules entries {extra} that are not in target_modules={targets!r}; PEFT refuses '
        'this config (IA3Config: "`feedforward_modules` should be a subset of `target_modules`"; the entries are '
        'compared as strings). Fix: list each feedforward module in target_modules under the same name.'
      )


def _non_finite(value, where: str):
  """The first NaN/inf number inside a JSON value, as (where, value), else None."""
  if isinstance(value, float) and not math.isfinite(value):
    return where, value
  items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, list) else ()
  for key, item in items:
    found = _non_finite(item, f'{where}[{key!r}]')
    if found:
      return found
  return None


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_values(raw: Mapping[str, Any], peft_type: str, source: str) -> None:
  """Every number is finite and of its kind: ranks positive ints, alphas positive, dropout a probability."""
  for key, value in raw.items():
    found = _non_finite(value, key)
    if found:
      raise ValueError(
        f'{source} has {found[0]}={found[1]!r}; PEFT config numbers must be finite (NaN/Infinity give NaN outputs).'
      )
  if peft_type != 'LORA':
    return
  rank = raw.get('r', 8)
  if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
    raise ValueError(f'{source} has r={rank!r}; expected a positive integer rank (PEFT refuses {rank!r} too).')
  alpha = raw.get('lora_alpha', 8)
  if not _is_number(alpha) or alpha <= 0:
    raise ValueError(f'{source} has lora_alpha={alpha!r}; expected a positive number.')
  for field, ok, expected in (
    ('rank_pattern', lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, 'a positive integer rank'),
    ('alpha_pattern', lambda v: _is_number(v) and v > 0, 'a positive number'),
  ):
    pattern = raw.get(field) or {}
    if not isinstance(pattern, Mapping):
      raise ValueError(f'{source} has {field}={pattern!r}; expected an object {{module regex: value}}.')
    for key, value in pattern.items():
      if not ok(value):
        raise ValueError(f'{source} has {field}[{key!r}]={value!r}; expected {expected}.')
  dropout = raw.get('lora_dropout') or 0.0
  if not _is_number(dropout) or not 0 <= dropout < 1:
    raise ValueError(f'{source} has lora_dropout={dropout!r}; expected a probability in [0, 1).')
  if raw.get('use_rslora') is not None and not isinstance(raw['use_rslora'], bool):  # null: PEFT's falsy default
    raise ValueError(f'{source} has use_rslora={raw["use_rslora"]!r}; expected true or false.')


def _check_patterns(raw: Mapping[str, Any], source: str) -> None:
  """Every name list holds strings and every regex compiles, in the form PEFT's matching uses it."""

  def compiles(field: str, pattern, form: str = '{}') -> None:
    if not isinstance(pattern, str):
      raise ValueError(f'{source} has {field}={pattern!r}; expected a string.')
    try:
      re.compile(form.format(pattern))
    except re.error as e:
      raise ValueError(f'{source} has {field}={pattern!r}, which is not a valid regular expression ({e}).') from None

  for field in ('target_modules', 'exclude_modules', 'feedforward_modules'):
    value = raw.get(field)
    if value is None:
      continue
    if isinstance(value, str):
      compiles(field, value)
    elif isinstance(value, list):
      for i, entry in enumerate(value):
        if not isinstance(entry, str):
          raise ValueError(f'{source} has {field}[{i}]={entry!r}; expected a module name (a string).')
    else:
      raise ValueError(f'{source} has {field}={value!r}; expected a regex string or a list of module names.')
  saved = raw.get('modules_to_save') or []
  if not isinstance(saved, list):
    raise ValueError(f'{source} has modules_to_save={saved!r}; expected a list of module names.')
  for i, entry in enumerate(saved):
    # PEFT matches these inside a regex (check_target_module_exists), so they must compile there.
    compiles(f'modules_to_save[{i}]', entry, r'(^|.*\.){}($|\..*)')
  for field in ('rank_pattern', 'alpha_pattern'):
    for key in raw.get(field) or {}:
      compiles(f'{field} key', key, r'(.*\.)?({})$')
  layers = raw.get('layers_pattern')
  for entry in [layers] if isinstance(layers, str) else layers or []:
    compiles('layers_pattern', entry, r'(?:^|.*?\.){}\.(?P<idx>\d+)\.')
  indexes = raw.get('layers_to_transform')
  if indexes is not None and not (
    (isinstance(indexes, int) and not isinstance(indexes, bool))
    or (isinstance(indexes, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in indexes))
  ):
    raise ValueError(f'{source} has layers_to_transform={indexes!r}; expected a layer index or a list of them.')


def read_peft_config(adapter_dir: str | os.PathLike) -> PeftSpec:
  """Read and check `adapter_dir/adapter_config.json`."""
  path = os.path.join(os.fspath(adapter_dir), CONFIG_FILE)
  if not os.path.isfile(path):
    # PEFT saves an adapter named other than 'default' into a subfolder of that name.
    root = os.fspath(adapter_dir)
    named = sorted(
      d for d in (os.listdir(root) if os.path.isdir(root) else ()) if os.path.isfile(os.path.join(root, d, CONFIG_FILE))
    )
    hint = (
      f' It holds the named adapter(s) {named} (PEFT saves a non-default adapter_name in a subfolder): pass '
      f'adapter_dir={os.path.join(root, named[0])!r}.'
      if named
      else ''
    )
    raise FileNotFoundError(f'adapter_dir={root!r} has no {CONFIG_FILE}; it is not a PEFT adapter directory.{hint}')
  return parse_peft_config(read_json_object(path, 'PEFT adapter config'), source=path)


def read_peft_weights(adapter_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """The adapter tensors as numpy arrays: safetensors, or a `.bin` read with `weights_only=True`."""
  for name in WEIGHTS_FILES:
    path = os.path.join(os.fspath(adapter_dir), name)
    if os.path.isfile(path):
      return load_state_dict(path)
  raise FileNotFoundError(f'adapter_dir={os.fspath(adapter_dir)!r} has none of {WEIGHTS_FILES}.')


# -- torch modules <-> flax modules, from the family's table ---------------------------------


@dataclasses.dataclass(frozen=True)
class ModuleMap:
  """The family's torch modules and their flax counterparts, for one config.

  Attributes:
    kind: torch module name -> `'linear'` (nn.Linear, `[out, in]`), `'conv1d'` (HF Conv1D, `[in, out]`),
      `'embedding'`, `'norm'`, `'container'`, or `'tied'` (a head that shares the embedding and
      has no parameter of its own in flax).
    flax: torch module name -> flax module path.
    torch: flax module path -> torch module name.
    params: torch module name -> the table rows of its own and its submodules' parameters.
  """

  kind: Mapping[str, str]
  flax: Mapping[str, tuple[str, ...]]
  torch: Mapping[tuple[str, ...], str]
  params: Mapping[str, tuple[KeyMapping, ...]]
  tied_embedding: str | None = None

  def names(self) -> list[str]:
    return sorted(self.kind)


def module_map(family: Family, config: Any) -> ModuleMap:
  """Tie each torch module of `family.hf_class_name` to its flax module via `family.key_table`."""
  kind: dict[str, str] = {}
  flax: dict[str, tuple[str, ...]] = {}
  params: dict[str, list[KeyMapping]] = {}
  leaf_kind = {'kernel': None, 'embedding': 'embedding', 'scale': 'norm'}
  for m in family.key_table(config):
    module, _ = m.torch_key.rsplit('.', 1)
    fmodule = m.flax_path[:-1]
    if m.flax_path[-1] == 'kernel':
      kind[module] = 'linear' if m.layout is Layout.TRANSPOSE else 'conv1d'
    elif m.flax_path[-1] in leaf_kind:
      kind[module] = leaf_kind[m.flax_path[-1]]
    else:
      kind.setdefault(module, 'other')
    flax[module] = fmodule
    parts = module.split('.')
    for i in range(1, len(parts)):
      params.setdefault('.'.join(parts[:i]), []).append(m)
      kind.setdefault('.'.join(parts[:i]), 'container')
    params.setdefault(module, []).append(m)
    # Containers: the flax prefix whose spellings include the torch prefix.
    for k in range(1, len(fmodule)):
      for spelled in paths_lib.spellings(fmodule[:k]):
        if module == spelled or module.startswith(spelled + '.'):
          flax.setdefault(spelled, fmodule[:k])
          break
  tied = None
  if family.tied_head is not None and getattr(config, 'tie_word_embeddings', False):
    head = family.tied_head[0].rsplit('.', 1)[0]
    kind[head] = 'tied'
    tied = family.tied_head[1].rsplit('.', 1)[0]
  torch = {v: k for k, v in flax.items()}
  return ModuleMap(
    kind=kind, flax=flax, torch=torch, params={k: tuple(v) for k, v in params.items()}, tied_embedding=tied
  )


# -- reading a PEFT directory onto a flax model ----------------------------------------------


class _Problems:
  def __init__(self):
    self.lines: list[str] = []

  def add(self, kind: str, line: str) -> None:
    self.lines.append(f'  - {kind}: {line}')

  def raise_if_any(self, headline: str) -> None:
    if self.lines:
      more = [f'  - ... and {len(self.lines) - _MAX_LISTED} more'] if len(self.lines) > _MAX_LISTED else []
      raise ValueError('\n'.join([headline] + self.lines[:_MAX_LISTED] + more))


def _naming(family: Family, keys: Sequence[str]):
  """`(to_ours, to_theirs)` for names in a file: the family's prefix conventions, as `normalize_keys` applies them.

  An adapter made on a wrapper class (`BertForSequenceClassification`: `bert.encoder...`) or on the
  bare trunk (`GPT2Model`: `h.0...`) names modules differently from the family's class; PEFT's
  patterns match their names, the table ours.
  """
  if family.wrapper_prefix and any(k.startswith(family.wrapper_prefix) for k in keys):
    w = family.wrapper_prefix
    return (lambda theirs: theirs.removeprefix(w)), (lambda ours: w + ours)
  if family.names_bare_trunk(keys):
    t = family.trunk_prefix
    return (lambda theirs: t + theirs), (lambda ours: ours[len(t) :] if ours.startswith(t) else None)
  return (lambda theirs: theirs), (lambda ours: ours)


_LORA_SUFFIXES = {'lora_A.weight': 'A', 'lora_B.weight': 'B', 'ia3_l': 'ia3'}
_REFUSED_SUFFIXES = {
  'lora_A.bias': 'lora_bias (a bias on lora_B) is not implemented',
  'lora_B.bias': 'lora_bias (a bias on lora_B) is not implemented',
  'lora_magnitude_vector': 'DoRA (use_dora) is not implemented',
  'lora_magnitude_vector.weight': 'DoRA (use_dora) is not implemented',
  'lora_embedding_A': 'LoRA on an embedding layer is not implemented (LoRA adapts Dense layers)',
  'lora_embedding_B': 'LoRA on an embedding layer is not implemented (LoRA adapts Dense layers)',
}


def _split_key(key: str) -> tuple[str, str]:
  for suffix in list(_LORA_SUFFIXES) + list(_REFUSED_SUFFIXES):
    if key.endswith('.' + suffix):
      return key[: -len(suffix) - 1], suffix
  return key, ''


def _shape(shape) -> str:
  return str(tuple(int(d) for d in shape))


def _escaped(path: Sequence[str]) -> re.Pattern:
  return re.compile(re.escape(paths_lib.dotted(path)))


def _resolve_family(family, config, model) -> tuple[Family, Any]:
  if config is None:
    config = getattr(model, 'config', None)
    if config is None:
      raise TypeError(
        '`config` is required: the family config the flax model was built from '
        '(e.g. the third value load_pretrained returns).'
      )
  if family is None:
    family = family_of(config)
  elif isinstance(family, str):
    family = get_family(family)
  elif not isinstance(family, Family):
    raise TypeError(
      f"`family` must be a family name ('bert', 'llama', 'gpt2') or a Family, found {type(family).__name__}."
    )
  family.key_table(config)  # raises if config is not this family's
  return family, config


def _example_args(example_args):
  return example_args or (jax.ShapeDtypeStruct((1, 8), jnp.int32),)


def import_peft(
  adapter_dir: str | os.PathLike,
  model: nn.Module,
  params,
  *example_args,
  family: str | Family | None = None,
  config: Any = None,
  rng: jax.Array | None = None,
) -> tuple[AdaptedModel, Any]:
  """Load a PEFT LoRA or IA3 adapter directory onto a converted flax model.

  Args:
    adapter_dir: a directory written by PEFT's `save_pretrained` (`adapter_config.json` +
      `adapter_model.safetensors`, or `adapter_model.bin`, read with `weights_only=True`).
    model: the flax model of the base (e.g. from `conversion.load_pretrained`).
    params: its params (base weights, without adapters).
    *example_args: inputs to trace the model with; default one `[1, 8]` int32 batch of ids.
    family: `'llama'`, `'gpt2'`, `'bert'` or a `Family`; default: from the config's class.
    config: the family config of `model`; default `model.config`.
    rng: unused randomness for `adapt` (every adapter leaf is overwritten by the file's values).

  Returns:
    `(adapted_model, params)`: `adapted_model.apply({'params': params}, ids)` gives the adapted
    outputs (PEFT's, to float rounding); `modules_to_save` modules train whole and hold the file's
    weights. `lora_dropout` carries over to the LoRA methods (active in training only, given the
    'adapter_dropout' rng stream).

  Raises:
    ValueError: an unsupported PEFT type or option, a key whose module the flax model lacks, a
      missing, unexpected or mis-shaped tensor (all listed together).
  """
  if isinstance(model, AdaptedModel):
    raise TypeError(
      '`model` is an AdaptedModel, which already carries adapters; import_peft puts a PEFT adapter on a base '
      'model. Pass the base model (adapted.base) and the base params, without adapter leaves.'
    )
  if not isinstance(params, Mapping):
    raise TypeError(
      f"`params` must be the base model's params (a dict of arrays, e.g. from conversion.load_pretrained), found "
      f'{type(params).__name__}.'
    )
  family, config = _resolve_family(family, config, model)
  spec = read_peft_config(adapter_dir)
  tensors = read_peft_weights(adapter_dir)
  mm = module_map(family, config)
  problems = _Problems()
  found, saved_tensors, saved, targeted, their_name, base_copies = _sort_tensors(spec, tensors, mm, family, problems)
  shapes = family.param_shapes(config)
  sites = trace_model(model, *_example_args(example_args)).sites
  methods, values = _adapter_values(spec, mm, targeted, found, sites, problems)
  base_updates, saved_flax = _saved_values(mm, saved, saved_tensors, their_name, shapes, family, problems)
  rows = {m.torch_key: m for ms in mm.params.values() for m in ms}
  for torch_key, (file_key, array) in base_copies.items():
    if mm.kind.get(torch_key.rsplit('.', 1)[0]) == 'tied' and torch_key.rsplit('.', 1)[0] in targeted:
      continue  # a copy of a tied head's weight: the head is refused as a target (_adapter_values)
    m = rows.get(torch_key)
    want = shapes[m.flax_path].shape if m is not None else None
    if m is None or m.layout.flax_shape(array.shape) != tuple(want):
      problems.add(
        'wrong shape' if m is not None else 'unexpected key',
        f'{file_key!r} (shape {_shape(array.shape)}) is a copy of the base weight {torch_key!r}, which '
        f'{"has another shape in the flax model" if m is not None else "the family table does not map"}. '
        'Fix: the base model config does not match the one the adapter was trained on.',
      )
      continue
    base_updates[m.flax_path] = m.layout.to_flax(array)
  if not methods and not problems.lines:
    problems.add(
      'empty',
      f'target_modules={spec.raw.get("target_modules")!r} selects no module of '
      f'{family.hf_class_name} that the file adapts.',
    )
  problems.raise_if_any(
    f'Cannot import the PEFT {spec.peft_type} adapter in {os.fspath(adapter_dir)!r} onto '
    f'{family.model_class.__name__} ({family.hf_class_name} module names):'
  )

  flat = traverse_util.flatten_dict(params)
  for path, value in base_updates.items():
    flat[path] = jnp.asarray(value, dtype=flat[path].dtype)
  params = traverse_util.unflatten_dict(flat)
  adapted, params = adapt(
    model,
    params,
    {_escaped(p): m for p, m in methods.items()},
    *_example_args(example_args),
    rng=rng,
    modules_to_save=[_escaped(p) for p in saved_flax],
  )
  flat = traverse_util.flatten_dict(params)
  for path, leaves in values.items():
    for name, value in leaves.items():
      old = flat[path + (name,)]
      flat[path + (name,)] = jnp.asarray(np.reshape(value, old.shape), dtype=old.dtype)
  return adapted, traverse_util.unflatten_dict(flat)


def _sort_tensors(spec: PeftSpec, tensors, mm: ModuleMap, family: Family, problems: _Problems):
  """File tensors grouped as adapter tensors per module and modules_to_save tensors; what the config selects."""
  stripped = {}
  for key in tensors:
    if not key.startswith(PREFIX):
      problems.add(
        'unexpected key',
        f'{key!r} does not start with {PREFIX!r}, as every key PEFT saves does. '
        'Fix: this is not a PEFT adapter file, or it was renamed.',
      )
      continue
    stripped[key[len(PREFIX) :]] = key
  to_ours, their_name = _naming(family, list(stripped))

  # What the config selects, by PEFT's rules, over the modules torch has (matched in their naming).
  saved = [n for n in mm.names() if their_name(n) is not None and spec.saves(their_name(n))]
  nested = [n for n in saved if any(n.startswith(s + '.') for s in saved)]
  saved = [n for n in saved if n not in nested]
  for n in nested:
    outer = next(s for s in saved if n.startswith(s + '.'))
    problems.add(
      'unsupported',
      f'modules_to_save={spec.raw.get("modules_to_save")!r} selects {their_name(outer)!r} and, inside it, '
      f'{their_name(n)!r} (PEFT matches modules_to_save with str.endswith), so PEFT wraps a module inside a '
      'wrapped module and cannot load this adapter itself (PeftModel.from_pretrained raises KeyError). '
      'Fix: name the modules by their full names, or list the submodules that train.',
    )
  targeted = {}
  for name in mm.names():
    theirs = their_name(name)
    if (
      theirs is not None
      and spec.targets(theirs, mm.kind[name])
      and not any(name == s or name.startswith(s + '.') for s in saved)
    ):
      targeted[name] = theirs

  found: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
  saved_tensors: dict[str, tuple[str, np.ndarray]] = {}
  base_copies: dict[str, tuple[str, np.ndarray]] = {}
  model_name = family.model_class.__name__
  # What save_embedding_layers=True writes in full: the input embedding and the (untied) LM head.
  head = family.tied_head[0].rsplit('.', 1)[0] if family.tied_head else None
  base_keys = {
    m.torch_key for module, ms in mm.params.items() for m in ms if mm.kind.get(module) == 'embedding' or module == head
  }
  adapted_modules, unknown_modules = set(), set()
  for theirs, file_key in stripped.items():
    ours = to_ours(theirs)
    module, suffix = _split_key(ours)
    if suffix in _LORA_SUFFIXES:
      adapted_modules.add(module)
      if module not in mm.kind:
        unknown_modules.add(_split_key(theirs)[0])
    if suffix in _REFUSED_SUFFIXES:
      problems.add('unsupported', f'{file_key!r}: {_REFUSED_SUFFIXES[suffix]}. Fix: {_MERGE_FIX}.')
    elif suffix:
      if mm.kind.get(module) == 'tied' and module in targeted:
        continue  # reported once for the module (_adapter_values)
      if module not in mm.kind or mm.kind[module] == 'tied':
        tied = '; its head is tied to the input embedding' if mm.kind.get(module) == 'tied' else ''
        problems.add(
          'unknown module',
          f'{file_key!r} adapts target module {module!r} that the flax model lacks '
          f'({model_name} has no such layer{tied}). Fix: load the adapter onto the model class it was '
          'made for, or drop this module from target_modules.',
        )
      elif (suffix == 'ia3_l') != (spec.peft_type == 'IA3'):
        problems.add('unexpected key', f'{file_key!r} is not a {spec.peft_type} tensor (peft_type={spec.peft_type!r}).')
      elif module not in targeted:
        problems.add(
          'unexpected key',
          f"{file_key!r}: adapter_config.json's {spec.deselection(their_name(module) or module, mm.kind[module])}, "
          'so PEFT would not load this tensor. Fix: the config does not describe these weights.',
        )
      else:
        found.setdefault(module, {})[suffix] = (file_key, tensors[file_key])
    elif any(ours.startswith(s + '.') for s in saved):
      saved_tensors[ours] = (file_key, tensors[file_key])
    elif '.base_layer.' in ours and ours.rsplit('.base_layer.', 1)[0] in targeted:
      # PEFT (save_embedding_layers='auto') also saves a full copy of the base weight of a targeted
      # lm_head / embed_tokens as `<module>.base_layer.<param>`; PEFT loads it into the base layer.
      module, param = ours.rsplit('.base_layer.', 1)
      base_copies[f'{module}.{param}'] = (file_key, tensors[file_key])
    elif ours in base_keys:
      # save_embedding_layers=True (a resized vocabulary): full copies of the embedding / lm_head
      # weights, which PEFT loads into the base model.
      base_copies[ours] = (file_key, tensors[file_key])
    elif spec.saves(theirs.rsplit('.', 1)[0]) and ours.rsplit('.', 1)[0] not in mm.kind:
      problems.add(
        'unknown module',
        f'{file_key!r} belongs to modules_to_save module {ours.rsplit(".", 1)[0]!r}, a '
        f'module that the flax model lacks ({model_name} has no such layer). Fix: load the adapter onto '
        'the model class it was made for.',
      )
    else:
      problems.add(
        'unexpected key',
        f'{file_key!r} is neither a LoRA/IA3 tensor of a targeted module nor part of '
        f'a modules_to_save module (modules_to_save={spec.raw.get("modules_to_save")!r}).',
      )
  if adapted_modules and len(unknown_modules) == len(adapted_modules):
    # Not one adapted module exists here: the adapter was made for another architecture. Say so first.
    problems.lines.insert(
      0,
      f'  - wrong model: none of the {len(adapted_modules)} modules the file adapts (e.g. '
      f'{sorted(unknown_modules)[0]!r}) is a module of {family.hf_class_name} (family {family.name!r}); the adapter '
      f'was made for another model (its config names base_model_name_or_path='
      f'{spec.raw.get("base_model_name_or_path")!r}). Fix: import it onto a base model of that architecture.',
    )
  return found, saved_tensors, saved, targeted, their_name, base_copies


def _adapter_values(spec: PeftSpec, mm: ModuleMap, targeted, found, sites, problems: _Problems):
  """`{flax module path: method}` and `{flax module path: {leaf: value}}` for every targeted module.

  The method for a module is the registered one that reads PEFT's `peft_type` with this module's
  settings (rank/alpha for LoRA, feedforward or not for IA3); it says which tensors it needs.
  """
  methods: dict[tuple[str, ...], Any] = {}
  values: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
  for name, theirs in sorted(targeted.items()):
    kind = mm.kind[name]
    if kind not in ('linear', 'conv1d'):
      # PEFT refuses to adapt anything else, so a container it matched never holds tensors.
      if kind == 'tied':
        problems.add(
          'unsupported',
          f'target_modules selects {theirs!r}, which the torch model ties to the input embedding: the flax '
          'model computes the logits with the embedding matrix and has no separate head layer to adapt. Fix: '
          f'untie the head in the base model (tie_word_embeddings=False, with a weight of its own), drop '
          f'{theirs!r} from target_modules, or {_MERGE_FIX}.',
        )
      elif name in found or kind != 'container':
        what = {'embedding': 'an embedding', 'norm': 'a norm layer', 'container': 'a container of layers'}.get(
          kind, f'a {kind} layer'
        )
        problems.add(
          'unsupported',
          f'target_modules selects {theirs!r}, {what}; {spec.peft_type} here adapts '
          'Linear and Conv1D layers only. Fix: narrow target_modules to the linear layers.',
        )
      continue
    fpath = mm.flax[name]
    site = sites[fpath]
    settings = spec.module_settings(theirs)
    method = method_from_peft(spec.peft_type, settings)
    want = method.peft_shapes(site)
    have = found.get(name, {})
    fan_in, fan_out = math.prod(site.size(site.feature_in)), math.prod(site.size(site.feature_out))
    hint = f' ({spec.describe_settings(theirs)}; layer {fan_in} -> {fan_out})'
    ok = True
    for suffix, shape in want.items():
      if suffix not in have:
        problems.add(
          'missing key',
          f'{PREFIX + theirs + "." + suffix!r} (shape {_shape(shape)}) is not in the file, '
          f'but target_modules selects {theirs!r} in this model. Fix: import it onto the base model it was made '
          f'for (base_model_name_or_path={spec.raw.get("base_model_name_or_path")!r}; a model with more layers or '
          'other modules than that one has modules the file has no weights for), or the file is incomplete.',
        )
        ok = False
      elif tuple(have[suffix][1].shape) != tuple(shape):
        problems.add(
          'wrong shape',
          f'{have[suffix][0]!r} has shape {_shape(have[suffix][1].shape)}, expected '
          f'{_shape(shape)}{hint}. Fix: check r/rank_pattern/feedforward_modules, and that the base '
          'model config matches the one the adapter was trained on.',
        )
        ok = False
    if ok:
      methods[fpath] = method
      values[fpath] = method.from_peft(site, {suffix: have[suffix][1] for suffix in want})
  return methods, values


def _saved_values(mm: ModuleMap, saved, saved_tensors, their_name, shapes, family: Family, problems: _Problems):
  """Flax base leaves replaced by the modules_to_save tensors (through the table), and those modules' paths."""
  updates = {}
  flax_paths = []
  for name in saved:
    theirs = their_name(name)
    if mm.kind.get(name) == 'tied' or (
      mm.tied_embedding and (mm.tied_embedding == name or mm.tied_embedding.startswith(name + '.'))
    ):
      problems.add(
        'unsupported',
        f'modules_to_save selects {theirs!r}, which the torch model ties to '
        f'{"the input embedding" if mm.kind.get(name) == "tied" else "its LM head"}; PEFT trains an untied '
        'copy, which this flax model (one shared matrix) cannot hold. Fix: set tie_word_embeddings=False '
        'in the base model, or do not train that module.',
      )
      for key in [k for k in saved_tensors if k.startswith(name + '.')]:
        saved_tensors.pop(key)  # this module's tensors: refused above, not unexpected
      continue
    if name not in mm.flax:
      problems.add(
        'unknown module',
        f'modules_to_save selects {theirs!r}, whose parameters do not map to one flax '
        'module. Fix: name a whole layer in modules_to_save.',
      )
      continue
    flax_paths.append(mm.flax[name])
    for m in mm.params[name]:
      key = f'{PREFIX}{their_name(m.torch_key)}'
      if m.torch_key not in saved_tensors:
        problems.add('missing key', f'{key!r} (modules_to_save {theirs!r}) is not in the file.')
        continue
      array = saved_tensors.pop(m.torch_key)[1]
      want = shapes[m.flax_path].shape
      if m.layout.flax_shape(array.shape) != tuple(want):
        problems.add(
          'wrong shape',
          f'{key!r} has shape {_shape(array.shape)}, but flax {"/".join(m.flax_path)} '
          f'expects {_shape(want)}{" after transposing" if m.layout is Layout.TRANSPOSE else ""}. '
          'Fix: the base model config does not match the one the adapter was trained on.',
        )
        continue
      updates[m.flax_path] = m.layout.to_flax(array)
  for file_key, array in saved_tensors.values():
    problems.add(
      'unexpected key',
      f'{file_key!r} (shape {_shape(array.shape)}) is not a parameter of the '
      f'modules_to_save module in {family.model_class.__name__}.',
    )
  return updates, flax_paths


def _number(x):
  x = float(x)
  return int(x) if x.is_integer() else x


# -- writing a PEFT directory from a flax model ----------------------------------------------


def _most_common(values):
  return Counter(values).most_common(1)[0][0]


# Task types whose PeftModel subclass needs a generating model (prepare_inputs_for_generation).
_GENERATING_TASKS = ('CAUSAL_LM', 'SEQ_2_SEQ_LM')


def check_task_type(task_type, family: Family | None = None) -> None:
  """`task_type` is one PEFT knows (peft.TaskType), or None; PEFT refuses to load any other. With a
  `family`, also one its class loads under: CAUSAL_LM needs an LM class, SEQ_2_SEQ_LM an encoder-decoder."""
  if task_type is not _DEFAULT and task_type is not None and task_type not in TASK_TYPES:
    raise ValueError(f'`task_type`={task_type!r} is not a PEFT task type; expected one of {list(TASK_TYPES)} or None.')
  if family is None or task_type not in _GENERATING_TASKS:
    return
  generates = DEFAULT_TASK_TYPES.get(family.name) == 'CAUSAL_LM'
  if task_type == 'SEQ_2_SEQ_LM' or not generates:
    fits = [t for t in TASK_TYPES if t not in _GENERATING_TASKS or (t == 'CAUSAL_LM' and generates)]
    raise ValueError(
      f'`task_type`={task_type!r} cannot be loaded onto {family.hf_class_name}: PEFT wraps that task in a class that '
      f'generates text, which {family.hf_class_name} does not. Expected one of {fits} or None (default '
      f'{DEFAULT_TASK_TYPES.get(family.name)!r}).'
    )


def export_peft(
  adapter_dir: str | os.PathLike,
  model: AdaptedModel,
  params,
  *,
  family: str | Family | None = None,
  config: Any = None,
  base_model_name_or_path: str | None = None,
  task_type: str | None = _DEFAULT,
) -> dict[str, Any]:
  """Write the adapters of `model` as a PEFT directory that `PeftModel.from_pretrained` loads.

  The directory holds `adapter_config.json` and `adapter_model.safetensors` for the family's
  torch class (`LlamaForCausalLM`, `GPT2LMHeadModel`, `BertModel`). `target_modules` lists the
  adapted torch modules by full name; ranks and alphas that differ from the most common ones go to
  `rank_pattern` / `alpha_pattern` (full names too); `fan_in_fan_out` is set when a target is an HF
  Conv1D; IA3_FF modules are `feedforward_modules`; modules that train whole (`modules_to_save`,
  unfrozen norms) are written as PEFT `modules_to_save`. The config is checked against PEFT's
  matching rules before anything is written.

  Args:
    adapter_dir: output directory (created; existing adapter files are replaced).
    model: the `AdaptedModel` (from `import_peft`, `adapt` or `prepare_for_transfer`).
    params: its params, with adapter leaves.
    family: `'llama'`, `'gpt2'`, `'bert'` or a `Family`; default: from the config's class.
    config: the family config; default `model.base.config`.
    base_model_name_or_path: recorded in the config (what `AutoPeftModel` would load the base from).
    task_type: PEFT task type; default `'CAUSAL_LM'` for LLaMA/GPT-2, `'FEATURE_EXTRACTION'` for BERT.

  Returns:
    The `adapter_config.json` dict written.

  Raises:
    ValueError: adapters PEFT cannot express for this model (Houlsby, Locon, LoRA mixed with IA3,
      IA3 and IA3_FF on one module, an adapter on a module that also trains whole, trained heads or
      tied embeddings, full fine-tuning).
  """
  if not isinstance(model, AdaptedModel):
    raise TypeError(
      f'`model` must be an AdaptedModel (from import_peft, adapt or prepare_for_transfer), found {type(model).__name__}.'
    )
  check_task_type(task_type)
  if os.path.exists(adapter_dir) and not os.path.isdir(adapter_dir):
    raise FileExistsError(
      f'adapter_dir={os.fspath(adapter_dir)!r} is a file; export_peft writes a directory (adapter_config.json + '
      f'{WEIGHTS_FILES[0]}). Name a directory.'
    )
  family, config = _resolve_family(family, config, model.base)
  check_task_type(task_type, family)
  check_adapter_leaves(params, model)
  mm = module_map(family, config)
  fail = lambda why, fix: ValueError(f'export_peft cannot write this model as a PEFT adapter: {why}. Fix: {fix}.')

  # Each method says whether PEFT can hold it (its peft_type) and, if not, why.
  for e in model.plan:
    for m in e.methods:
      if m.peft_type is None:
        raise ValueError(f'export_peft cannot write this model as a PEFT adapter: {m.peft_refusal(e.site)}.')
  types = sorted({m.peft_type for e in model.plan for m in e.methods})
  if len(types) > 1:
    raise fail(
      f'it mixes {" and ".join(types)} adapters, but a PEFT directory holds one adapter type',
      f'export one model per type ({", ".join(types)} sites apart), or export_merged',
    )
  if not model.plan:
    raise fail('the model has no adapters', 'export the base with save_pretrained, or add adapters')
  peft_type = types[0]
  for e in model.plan:
    if len(e.methods) > 1:
      raise fail(
        f'{paths_lib.dotted(e.site.path)} has both {" and ".join(m.name for m in e.methods)}, but PEFT keeps one '
        f'{peft_type} adapter per module',
        'keep one of them on that layer, or export_merged',
      )

  trainable = model.trainable
  if trainable.everything:
    raise fail('every weight trains (full fine-tuning), which is not an adapter', 'export with export_merged')
  if trainable.heads:
    raise fail(f'heads {trainable.heads} train, and {family.hf_class_name} has no such module', 'export_merged')

  targets: dict[str, tuple[str, ...]] = {}
  for e in model.plan:
    torch_name = mm.torch.get(e.site.path)
    if torch_name is None or mm.kind.get(torch_name) not in ('linear', 'conv1d'):
      raise fail(
        f'{paths_lib.dotted(e.site.path)} is not a Linear/Conv1D layer of {family.hf_class_name}',
        'adapt only the linear layers the family table maps',
      )
    targets[torch_name] = e.site.path
  saved: dict[str, tuple[str, ...]] = {}
  for path in trainable.norms + trainable.others:
    torch_name = mm.torch.get(tuple(path))
    flax_leaves = {k for k in traverse_util.flatten_dict(get_subtree(params, path)) if k[-1] not in LEAF_NAMES}
    mapped = {m.flax_path[len(path) :] for m in mm.params.get(torch_name, ())} if torch_name else set()
    if torch_name is None or flax_leaves != mapped:
      raise fail(
        f'{paths_lib.dotted(path)} trains whole but is not one module of {family.hf_class_name}',
        'train whole layers only (modules_to_save names a layer), or export_merged',
      )
    if torch_name in targets or any(t.startswith(torch_name + '.') for t in targets):
      raise fail(
        f'{torch_name} both trains whole and carries an adapter; PEFT never adapts a modules_to_save module',
        'drop it from modules_to_save, or export_merged',
      )
    if mm.tied_embedding and (mm.tied_embedding == torch_name or mm.tied_embedding.startswith(torch_name + '.')):
      raise fail(
        f'{torch_name} trains whole, but {family.hf_class_name} ties it to its LM head and PEFT would '
        'train an untied copy',
        'export_merged',
      )
    saved[torch_name] = tuple(path)
  # PEFT selects modules_to_save by plain `str.endswith`: a name that is also the tail of another module's
  # name (BERT's 'embeddings' of 'embeddings.word_embeddings') would wrap that module too, nested inside
  # the first, and PeftModel.from_pretrained then fails. Name such a module by its parameter-holding
  # submodules instead (each a full, unambiguous name).
  for torch_name in list(saved):
    if any(n != torch_name and n.endswith(torch_name) for n in mm.names()):
      path = saved.pop(torch_name)
      for m in mm.params[torch_name]:
        module = m.torch_key.rsplit('.', 1)[0]
        saved[module] = mm.flax[module]

  state: dict[str, np.ndarray] = {}
  cfg: dict[str, Any] = {
    'peft_type': peft_type,
    'task_type': DEFAULT_TASK_TYPES.get(family.name) if task_type is _DEFAULT else task_type,
    'base_model_name_or_path': base_model_name_or_path,
    'revision': None,
    'inference_mode': True,
    'target_modules': sorted(targets),
    'exclude_modules': None,
    'fan_in_fan_out': any(mm.kind[t] == 'conv1d' for t in targets),
    'modules_to_save': sorted(saved) or None,
  }
  by_path = {e.site.path: e for e in model.plan}
  settings: dict[str, dict[str, Any]] = {}
  for t, path in targets.items():
    entry = by_path[path]
    tensors, settings[t] = entry.methods[0].to_peft(entry.site, get_subtree(params, path))
    state.update({f'{PREFIX}{t}.{suffix}': array for suffix, array in tensors.items()})
  dropouts = {t: s['lora_dropout'] for t, s in settings.items() if 'lora_dropout' in s}
  if len(set(dropouts.values())) > 1:
    by_value = {}
    for t, v in sorted(dropouts.items()):
      by_value.setdefault(v, []).append(t)
    raise fail(
      f'its LoRA modules use different dropouts ({by_value}), but adapter_config.json has one lora_dropout '
      'for all modules',
      'give every LoRA module the same dropout, or keep the flax adapter checkpoint (save_adapters)',
    )
  cfg.update(_peft_config_fields(peft_type, settings))
  flat = traverse_util.flatten_dict(params)
  for torch_name in saved:
    for m in mm.params[torch_name]:
      state[f'{PREFIX}{m.torch_key}'] = m.layout.to_torch(to_numpy(flat[m.flax_path]))

  _check_written(cfg, mm, targets, saved, peft_type, settings)
  os.makedirs(adapter_dir, exist_ok=True)
  for stale in WEIGHTS_FILES[1:]:
    if os.path.exists(os.path.join(adapter_dir, stale)):
      os.remove(os.path.join(adapter_dir, stale))
  save_safetensors(state, os.path.join(adapter_dir, WEIGHTS_FILES[0]))
  write_json(os.path.join(adapter_dir, CONFIG_FILE), cfg)
  return cfg


def _peft_config_fields(peft_type: str, settings: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """adapter_config.json's fields for these per-module settings (`Method.to_peft`), in PEFT's encoding.

  LoRA: the most common rank and alpha become `r` / `lora_alpha`, the others `rank_pattern` /
  `alpha_pattern` by full module name. IA3: the input-scaling modules are `feedforward_modules`.
  """
  if peft_type == 'IA3':
    return {'feedforward_modules': sorted(t for t, s in settings.items() if s['feedforward']), 'init_ia3_weights': True}
  use_rslora = {s['use_rslora'] for s in settings.values()} == {True}
  # Mixed rsLoRA/plain: write all as plain LoRA with alpha' = alpha·sqrt(r) (the same scale exactly).
  alphas = {
    t: s['lora_alpha'] if s['use_rslora'] == use_rslora else s['lora_alpha'] * math.sqrt(s['r'])
    for t, s in settings.items()
  }
  r = _most_common([s['r'] for s in settings.values()])
  alpha = _most_common(list(alphas.values()))
  return {
    'r': int(r),
    'lora_alpha': _number(alpha),
    'use_rslora': use_rslora,
    'rank_pattern': {t: int(s['r']) for t, s in settings.items() if s['r'] != r},
    'alpha_pattern': {t: _number(a) for t, a in alphas.items() if a != alpha},
    'lora_dropout': max(s['lora_dropout'] for s in settings.values()),
    'bias': 'none',
    'init_lora_weights': True,
    'use_dora': False,
    'lora_bias': False,
    'layers_to_transform': None,
    'layers_pattern': None,
  }


def _check_written(cfg, mm: ModuleMap, targets, saved, peft_type, settings) -> None:
  """The config we write must select, by PEFT's own rules, exactly what we mean (else: our bug)."""
  spec = PeftSpec(peft_type, cfg)
  got_saved = {n for n in mm.names() if spec.saves(n)}
  got_targets = {n for n in mm.names() if spec.targets(n, mm.kind[n])}
  wrong = []
  if got_saved != set(saved):
    wrong.append(f'modules_to_save selects {sorted(got_saved ^ set(saved))} wrongly')
  if got_targets != set(targets):
    wrong.append(f'target_modules selects {sorted(got_targets ^ set(targets))} wrongly')
  for t in targets:
    meant = method_from_peft(peft_type, settings[t])
    read = method_from_peft(peft_type, spec.module_settings(t))
    if not read.same_effect(meant):
      wrong.append(f'{t} reads back as {read} instead of {meant}')
  if wrong:
    raise RuntimeError('export_peft built a config that PEFT would read differently (a bug): ' + '; '.join(wrong))


# -- merged weights --------------------------------------------------------------------------


def export_merged(
  out_dir: str | os.PathLike,
  model: AdaptedModel,
  params,
  *,
  family: str | Family | None = None,
  config: Any = None,
  dtype: str | None = None,
) -> None:
  """Fold every adapter into its kernel and write an HF model directory (`config.json` + safetensors).

  `transformers`' `from_pretrained` (and `load_state_dict(strict=True)`) load the result into the
  family's class; it equals PEFT's `merge_and_unload()` of the same adapter.

  Raises:
    ValueError: an adapter that cannot fold (Houlsby; Locon on a weight-standardized conv).
  """
  if not isinstance(model, AdaptedModel):
    raise TypeError(f'`model` must be an AdaptedModel, found {type(model).__name__}.')
  family, config = _resolve_family(family, config, model.base)
  served, merged = merge_adapters(model, params)
  if isinstance(served, AdaptedModel):
    left = {paths_lib.dotted(e.site.path): [m.name for m in e.methods] for e in served.plan}
    raise ValueError(
      f'export_merged: adapters {left} cannot be folded into the base weights, so no plain '
      f'{family.hf_class_name} checkpoint can hold them. Fix: keep the flax adapter checkpoint '
      '(save_adapters) for these.'
    )
  save_pretrained(out_dir, merged, config, dtype=dtype)


# -- adapter checkpoints written by import_peft ----------------------------------------------


def restore_adapted(directory: str | os.PathLike, model: nn.Module, params, *example_args):
  """Rebuild `(adapted_model, params)` from a `save_adapters` checkpoint onto its base.

  `flax_adapters.restore_transfer` with this family's default example input: checkpoints made with
  a `TransferConfig` are prepared with it; those made with `adapt` (such as `import_peft`'s, which
  carry per-module ranks) are rebuilt from the saved plan and trainable modules.
  """
  from flax_adapters.checkpoint import restore_transfer  # pylint: disable=g-import-not-at-top

  return restore_transfer(directory, model, params, *_example_args(example_args))
