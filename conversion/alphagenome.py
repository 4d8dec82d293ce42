"""AlphaGenome checkpoints of the PyTorch port (genomicsxai's `alphagenome-pytorch`) <-> Flax, both ways.

The key table is explicit: one row per tensor of the port's `AlphaGenome.state_dict()`, naming its
Flax collection (`params` or `buffers`), its path and its layout, generated from the config and the
heads. Every row is checked against `jax.eval_shape` of the Flax model's init, and conversion is
strict both ways: a missing, unexpected or mis-shaped tensor is an error that names it (all of
them, in one message). A checkpoint of another AlphaGenome port is refused with the port it looks
like named.

Layouts: torch `nn.Linear.weight` `[out, in]` is a Dense `kernel` `[in, out]`; a torch `Conv1d`
weight `[out, in, k]` is a Conv `kernel` `[k, in, out]`; the standardized conv's `scale`
`[out, 1, 1]` is `[out]`; the heads' per-organism `[organisms, out, in]` weights are
`[organisms, in, out]`.

Adapters (`port_adapter_state_dict`, `adapted_params_from_port`) follow the port's wrappers:
a wrapped layer's own tensors move to `<layer>.original_layer.*`, LoRA adds `lora_A`/`lora_B`,
IA3 a `scale`, Locon `locon_down`/`locon_up`, Houlsby `adapter.{down,up}_project`, and a Houlsby
block wrapper moves its sub-block to `<block>.block.*`.

Examples:
  >>> from flax_adapters.genomics.alphagenome import AlphaGenomeConfig
  >>> table = key_table(AlphaGenomeConfig())
  >>> len(table)  # the port's state dict: 670 tensors of DeepMind's checkpoint + 7 track-means buffers
  677
  >>> [(r.torch_key, r.collection, '/'.join(r.path), r.layout) for r in table if r.torch_key.startswith('tower.blocks.0.mha.q')]
  [('tower.blocks.0.mha.q_proj.weight', 'params', 'tower/blocks_0/mha/q_proj/kernel', 'linear')]
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from conversion.families.base import _Problems
from conversion.state_dict import load_state_dict, save_safetensors, to_numpy
from flax_adapters import paths as paths_lib
from flax_adapters.genomics.alphagenome import AlphaGenome, AlphaGenomeConfig
from flax_adapters.genomics.alphagenome.config import TRACK_MODALITIES
from flax_adapters.methods import IA3, IA3FF, Houlsby, Locon, LoRA

PORT = "genomicsxai's alphagenome-pytorch (0.3.x)"
LAYOUTS = ('identity', 'linear', 'conv', 'scale', 'organism')

# Where the port keeps the non-track heads (outside its `heads` ModuleDict).
SPECIAL_HEAD_PREFIX = {
  'contact_maps': 'contact_maps_head',
  'splice_sites': 'splice_sites_classification_head',
  'splice_site_usage': 'splice_sites_usage_head',
  'splice_junctions': 'splice_sites_junction_head',
}


@dataclasses.dataclass(frozen=True)
class Row:
  """One tensor: the port's key, the Flax collection and path, and how the layouts differ."""

  torch_key: str
  collection: str
  path: tuple[str, ...]
  layout: str = 'identity'

  @property
  def name(self) -> str:
    return f'{self.collection}/{"/".join(self.path)}'


def to_flax(array: np.ndarray, layout: str) -> np.ndarray:
  if layout == 'linear':
    return array.T
  if layout == 'conv':
    return np.transpose(array, (2, 1, 0))
  if layout == 'scale':
    return array.reshape(array.shape[0])
  if layout == 'organism':
    return np.swapaxes(array, 1, 2)
  return array


def to_torch(array: np.ndarray, layout: str) -> np.ndarray:
  if layout == 'scale':
    out = array.reshape(array.shape[0], 1, 1)
  elif layout == 'conv':
    out = np.transpose(array, (2, 1, 0))
  else:
    out = to_flax(array, layout)  # the other layouts are their own inverse
  # A fresh C-ordered copy: torch.from_numpy shares memory and wants it writable.
  return np.array(out, order='C', copy=True)


def flax_shape(torch_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  return to_flax(np.empty(torch_shape, np.int8), layout).shape


# -- the key table ---------------------------------------------------------------------------


class _Table:
  """Row builders, one per kind of module, so the table reads like the model."""

  def __init__(self):
    self.rows: list[Row] = []

  def add(self, torch_key, path, layout='identity', collection='params'):
    self.rows.append(Row(torch_key, collection, tuple(path.split('/')), layout))

  def linear(self, t, f, bias=True):
    self.add(f'{t}.weight', f'{f}/kernel', 'linear')
    if bias:
      self.add(f'{t}.bias', f'{f}/bias')

  def conv(self, t, f, bias=True, standardized=False):
    self.add(f'{t}.weight', f'{f}/kernel', 'conv')
    if bias:
      self.add(f'{t}.bias', f'{f}/bias')
    if standardized:
      self.add(f'{t}.scale', f'{f}/scale', 'scale')

  def norm(self, t, f, batch=True):
    self.add(f'{t}.weight', f'{f}/scale')
    self.add(f'{t}.bias', f'{f}/bias')
    if batch:
      self.add(f'{t}.running_var', f'{f}/running_var', collection='buffers')

  def conv_block(self, t, f, kernel_size):
    self.norm(f'{t}.norm', f'{f}/norm')
    self.conv(f'{t}.conv', f'{f}/conv', standardized=kernel_size > 1)

  def organism_linear(self, t, f, layout='organism'):
    self.add(f'{t}.weight', f'{f}/kernel', layout)
    self.add(f'{t}.bias', f'{f}/bias')


def key_table(config: AlphaGenomeConfig, heads: Any = None) -> list[Row]:
  """Every tensor of the port's `AlphaGenome(...).state_dict()` for `config` and `heads` (default: the pretrained heads)."""
  c = config
  heads = AlphaGenome(c, heads).heads
  t = _Table()
  t.conv('encoder.dna_embedder.conv1', 'encoder/dna_embedder/conv1')
  t.conv_block('encoder.dna_embedder.block', 'encoder/dna_embedder/block', c.conv_kernel)
  for i in range(c.num_down_blocks):
    for b in ('block1', 'block2'):
      t.conv_block(f'encoder.down_blocks.{i}.{b}', f'encoder/down_blocks_{i}/{b}', c.conv_kernel)
  t.add('organism_embed.weight', 'organism_embed/embedding')
  for i in range(c.num_blocks):
    tp, fp = f'tower.blocks.{i}', f'tower/blocks_{i}'
    if i % 2 == 0:
      s, g = f'{tp}.pair_update.seq2pair', f'{fp}/pair_update/seq2pair'
      t.add(f'{s}.q_r_bias', f'{g}/q_r_bias')
      t.add(f'{s}.k_r_bias', f'{g}/k_r_bias')
      t.norm(f'{s}.norm_seq2pair', f'{g}/norm_seq2pair', batch=False)
      for name, bias in (('linear_q', False), ('linear_k', False), ('linear_pos_features', True)):
        t.linear(f'{s}.{name}', f'{g}/{name}', bias)
      for name, bias in (('linear_y_q', False), ('linear_y_k', False), ('linear_pair', True)):
        t.linear(f'{s}.{name}', f'{g}/{name}', bias)
      r, h = f'{tp}.pair_update.row_attn', f'{fp}/pair_update/row_attn'
      t.norm(f'{r}.norm', f'{h}/norm', batch=False)
      for name, bias in (('linear_q', False), ('linear_k', False), ('linear_v', True)):
        t.linear(f'{r}.{name}', f'{h}/{name}', bias)
      m, n = f'{tp}.pair_update.pair_mlp', f'{fp}/pair_update/pair_mlp'
      t.norm(f'{m}.norm', f'{n}/norm', batch=False)
      t.linear(f'{m}.linear1', f'{n}/linear1')
      t.linear(f'{m}.linear2', f'{n}/linear2')
    t.norm(f'{tp}.attn_bias.norm', f'{fp}/attn_bias/norm')
    t.linear(f'{tp}.attn_bias.proj', f'{fp}/attn_bias/proj', bias=False)
    a, b = f'{tp}.mha', f'{fp}/mha'
    t.norm(f'{a}.norm', f'{b}/norm')
    for p in ('q', 'k', 'v'):
      t.linear(f'{a}.{p}_proj', f'{b}/{p}_proj', bias=False)
      t.norm(f'{a}.norm_{p}', f'{b}/norm_{p}', batch=False)
    t.norm(f'{a}.final_norm', f'{b}/final_norm')
    t.linear(f'{a}.linear_embedding', f'{b}/linear_embedding')
    t.norm(f'{tp}.mlp.norm', f'{fp}/mlp/norm')
    t.linear(f'{tp}.mlp.fc1', f'{fp}/mlp/fc1')
    t.linear(f'{tp}.mlp.fc2', f'{fp}/mlp/fc2')
    t.norm(f'{tp}.mlp.final_norm', f'{fp}/mlp/final_norm')
  for i in range(c.num_down_blocks + 1):
    u, v = f'decoder.up_blocks.{i}', f'decoder/up_blocks_{i}'
    t.add(f'{u}.residual_scale', f'{v}/residual_scale')
    t.conv_block(f'{u}.conv_in', f'{v}/conv_in', c.conv_kernel)
    t.conv_block(f'{u}.pointwise', f'{v}/pointwise', 1)
    t.conv_block(f'{u}.conv_out', f'{v}/conv_out', c.conv_kernel)
  for e, skip in (('embedder_128bp', False), ('embedder_1bp', True)):
    t.conv(f'{e}.project_in', f'{e}/project_in')
    t.add(f'{e}.organism_embed.weight', f'{e}/organism_embed/embedding')
    t.norm(f'{e}.norm', f'{e}/norm')
    if skip:
      t.conv(f'{e}.project_skip', f'{e}/project_skip', bias=False)
  t.add('embedder_pair.organism_embed.weight', 'embedder_pair/organism_embed/embedding')
  t.norm('embedder_pair.norm', 'embedder_pair/norm', batch=False)
  for name, spec in heads.items():
    modality, f = spec['modality'], f'heads/{name}'
    if modality in TRACK_MODALITIES:
      t.add(f'heads.{name}.track_means', f'{f}/track_means', collection='buffers')
      for res in spec['resolutions']:
        t.organism_linear(f'heads.{name}.convs.{res}', f'{f}/convs_{res}')
      for res in spec['resolutions']:
        t.add(f'heads.{name}.residual_scales.{res}', f'{f}/residual_scales_{res}')
    elif modality == 'contact_maps':
      t.organism_linear(f'{SPECIAL_HEAD_PREFIX[name]}.linear', f'{f}/linear', layout='identity')
    else:
      t.organism_linear(f'{SPECIAL_HEAD_PREFIX[name]}.conv', f'{f}/conv')
      if modality == 'splice_junctions':
        for kind in ('neg_acceptor', 'neg_donor', 'pos_acceptor', 'pos_donor'):
          t.add(f'{SPECIAL_HEAD_PREFIX[name]}.rope_params.{kind}', f'{f}/rope_params/{kind}')
  return t.rows


def variable_shapes(model: AlphaGenome) -> dict[tuple[str, ...], Any]:
  """`{(collection, *path): ShapeDtypeStruct}` of the model's variables, from `jax.eval_shape` of its init."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), model.dummy_input()))
  return traverse_util.flatten_dict(shapes)


def _checked_table(model: AlphaGenome) -> tuple[list[Row], dict]:
  table = key_table(model.config, model.heads)
  expected = variable_shapes(model)
  tabled = {(r.collection, *r.path) for r in table}
  if tabled != set(expected):
    # The table and the module disagree: a bug here, not in the user's input.
    raise RuntimeError(
      f'AlphaGenome key table and model disagree: only in the table {sorted(tabled - set(expected))[:6]}, '
      f'only in the model {sorted(set(expected) - tabled)[:6]}.'
    )
  return table, expected


# -- recognising other ports -----------------------------------------------------------------

# (test on a key, the share of keys that must pass it, what the checkpoint is)
_OTHER_PORTS = (
  (
    lambda k: k.startswith('transformer_unet.'),
    0.5,
    "lucidrains' alphagenome-pytorch (github.com/lucidrains/alphagenome): its keys start with "
    "'transformer_unet.'. Its modules are laid out differently (fused QKV, baked standardized convs); convert "
    "DeepMind's weights with genomicsxai's alphagenome-pytorch instead",
  ),
  (
    lambda k: k.startswith('alphagenome/') or '/sequence_encoder/' in k or '/transformer_tower/' in k,
    0.5,
    "DeepMind's JAX/Haiku checkpoint (alphagenome_research): its keys are Haiku paths like "
    "'alphagenome/sequence_encoder/...'. Convert it with genomicsxai's alphagenome-pytorch "
    '(its convert_weights script), then load that',
  ),
  (
    lambda k: k.startswith('module.'),
    0.5,
    "a DistributedDataParallel-wrapped state dict: its keys start with 'module.'. Strip that prefix first",
  ),
  (
    lambda k: '.original_layer.' in k or '.lora_A.' in k or '.locon_down.' in k or '.adapter.down_project.' in k,
    0.0,
    f'a {PORT} model with adapters applied (prepare_for_transfer): its wrapped layers keep their weights under '
    "'.original_layer.'. Save the base model's state dict, or merge (merge_adapters), or read it with "
    'adapted_params_from_port',
  ),
)


def _check_port(keys: list[str], argument: str) -> None:
  """Refuse a checkpoint of another AlphaGenome port (or another wrapping of this one), naming it."""
  for looks_like, share, what in _OTHER_PORTS:
    hits = [k for k in keys if looks_like(k)]
    if hits and len(hits) > share * len(keys):
      raise ValueError(
        f'`{argument}` is not a state dict of {PORT}: it looks like {what}. First such keys: {hits[:3]}.'
      )


# -- torch -> flax ---------------------------------------------------------------------------


def _model(config, heads) -> AlphaGenome:
  if not isinstance(config, AlphaGenomeConfig):
    raise TypeError(f'`config` must be an AlphaGenomeConfig, found {type(config).__name__}.')
  return AlphaGenome(config, heads)


def variables_from_port(
  state_dict: Mapping[str, Any], config: AlphaGenomeConfig | None = None, heads: Any = None
) -> dict:
  """Flax `{'params', 'buffers'}` from the port's `AlphaGenome.state_dict()`.

  Args:
    state_dict: `{key: tensor}` (torch, numpy or jax), e.g. `port_model.state_dict()` or
      `conversion.load_state_dict('model.safetensors')`.
    config: the widths (default `AlphaGenomeConfig()`, the real model's).
    heads: the heads the checkpoint holds (default: the pretrained ones); a fine-tuned checkpoint
      with new heads needs their specs, e.g. `{..., 'my_atac': {'modality': 'atac', 'num_tracks': 4}}`
      (the modality is not stored in the checkpoint).

  Raises:
    ValueError: another port's checkpoint (named), or missing / unexpected / mis-shaped tensors
      (all listed, with the likely fix).
  """
  config = AlphaGenomeConfig() if config is None else config
  model = _model(config, heads)
  if not isinstance(state_dict, Mapping):
    raise TypeError(f'`state_dict` must be a mapping {{key: tensor}}, found {type(state_dict).__name__}.')
  keys = list(state_dict)
  _check_port(keys, 'state_dict')
  table, expected = _checked_table(model)
  problems = _Problems()
  flat = {}
  for row in table:
    want = expected[(row.collection, *row.path)]
    if row.torch_key not in state_dict:
      problems.add(
        'missing key', f'{row.torch_key!r} (for {row.name}, shape {tuple(want.shape)}) is not in the checkpoint.'
      )
      continue
    array = to_numpy(state_dict[row.torch_key], key=row.torch_key)
    if array.dtype.kind != 'f':
      raise TypeError(f'state_dict[{row.torch_key!r}] has dtype {array.dtype}; {row.name} is floating point.')
    if flax_shape(array.shape, row.layout) != tuple(want.shape):
      problems.add(
        'wrong shape',
        f'state_dict[{row.torch_key!r}] has shape {tuple(array.shape)}, but {row.name} expects '
        f'{tuple(want.shape)} (in flax layout). Fix: the config does not match the checkpoint.',
      )
      continue
    flat[(row.collection, *row.path)] = jnp.asarray(np.asarray(to_flax(array, row.layout), dtype=want.dtype))
  known = {r.torch_key for r in table}
  for key in keys:
    if key not in known:
      problems.add('unexpected key', _unexpected(key, state_dict[key], known))
  problems.raise_if_any(f'Cannot convert the checkpoint to AlphaGenome variables ({PORT} layout):')
  return traverse_util.unflatten_dict(flat)


def _unexpected(key: str, value, known) -> str:
  shape = tuple(getattr(value, 'shape', ()))
  if key.startswith('heads.'):
    head = key.split('.')[1]
    fix = (
      f'the checkpoint has a head {head!r} that `heads` does not list; add its spec, e.g. heads={{..., {head!r}: '
      "{'modality': 'atac', 'num_tracks': N, 'num_organisms': 1}}"
    )
  else:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
    fix = f'did you mean {close[0]!r}?' if close else 'it is not part of AlphaGenome at this config'
  return f'{key!r} (shape {shape}) has no place in AlphaGenome. Fix: {fix}.'


def load_port_checkpoint(path: str | os.PathLike, config: AlphaGenomeConfig | None = None, heads: Any = None) -> dict:
  """`variables_from_port` of a `.safetensors` or `.pth` file (read without unpickling code)."""
  return variables_from_port(load_state_dict(path), config, heads)


# -- flax -> torch ---------------------------------------------------------------------------


def port_state_dict(variables: Mapping[str, Any], config: AlphaGenomeConfig | None = None, heads: Any = None) -> dict:
  """The port's state dict (numpy arrays) from Flax `{'params', 'buffers'}`: `load_state_dict(strict=True)` accepts it.

  Adapter leaves are refused: merge them first (`fa.merge_adapters`), or export them with
  `port_adapter_state_dict`.
  """
  config = AlphaGenomeConfig() if config is None else config
  model = _model(config, heads)
  if not isinstance(variables, Mapping) or not {'params', 'buffers'} <= set(variables):
    raise TypeError(
      "`variables` must be {'params': ..., 'buffers': ...} as variables_from_port returns (or model.init gives)."
    )
  table, expected = _checked_table(model)
  flat = traverse_util.flatten_dict({k: variables[k] for k in ('params', 'buffers')})
  problems = _Problems()
  for path in flat:
    if path not in expected:
      problems.add(
        'unexpected path',
        f'{"/".join(path)} is not a variable of AlphaGenome. Fix: merge adapters into the base weights '
        '(fa.merge_adapters) or export them with port_adapter_state_dict.',
      )
  out = {}
  for row in table:
    leaf = flat.get((row.collection, *row.path))
    want = expected[(row.collection, *row.path)]
    if leaf is None:
      problems.add('missing path', f'{row.name} (shape {tuple(want.shape)}) for {row.torch_key!r}.')
      continue
    array = to_numpy(leaf, key=row.name)
    if array.shape != tuple(want.shape):
      problems.add('wrong shape', f'{row.name} has shape {array.shape}, the model {tuple(want.shape)}.')
      continue
    out[row.torch_key] = to_torch(array, row.layout)
  problems.raise_if_any(f'Cannot export AlphaGenome variables to a {PORT} state dict:')
  return out


def save_port_checkpoint(
  path: str | os.PathLike, variables: Mapping[str, Any], config: AlphaGenomeConfig | None = None, heads: Any = None
) -> str:
  """Write `port_state_dict(...)` as safetensors (`AlphaGenome.from_pretrained(path)` reads it)."""
  path = os.fspath(path)
  if not path.endswith('.safetensors'):
    raise ValueError(f'`path` must end in .safetensors (the port reads it by suffix), found {path!r}.')
  save_safetensors(port_state_dict(variables, config, heads), path)
  return path


# -- adapters in the port's layout -----------------------------------------------------------


def _torch_module(path: tuple[str, ...], table_modules: set[str]) -> str:
  name = paths_lib.dotted(path)
  if not any(m == name or m.startswith(name + '.') for m in table_modules):
    raise ValueError(f'{name!r} has adapters but is not a module of the port (adapters on heads have no port layout).')
  return name


# Each method's leaves in the port's adapter wrappers: (port suffix, our leaf, layout). The port
# names them per wrapper class; a Houlsby adapter on a layer sits under the wrapper's `.adapter`.
_PORT_LEAVES = {
  LoRA: (('lora_A.weight', 'lora_a', 'linear'), ('lora_B.weight', 'lora_b', 'linear')),
  Locon: (('locon_down.weight', 'locon_down', 'conv'), ('locon_up.weight', 'locon_up', 'conv')),
  IA3: (('scale', 'ia3_scale', 'identity'),),
  IA3FF: (('scale', 'ia3_ff_scale', 'identity'),),
  Houlsby: (
    ('down_project.weight', 'houlsby_down', 'linear'),
    ('down_project.bias', 'houlsby_down_bias', 'identity'),
    ('up_project.weight', 'houlsby_up', 'linear'),
    ('up_project.bias', 'houlsby_up_bias', 'identity'),
  ),
}


def _adapter_rows(adapted) -> tuple[list[tuple[str, tuple[str, ...], str]], set[str], set[str]]:
  """`(torch key, flax path, layout)` of every adapter leaf, and the wrapped layers and blocks."""
  table_modules = {r.torch_key.rsplit('.', 1)[0] for r in key_table(adapted.base.config, adapted.base.heads)}
  rows, wrapped, blocks = [], set(), set()
  for entry in adapted.plan:
    names = [m.name for m in entry.methods]
    module = _torch_module(entry.site.path, table_modules)
    houlsby_block = any(isinstance(m, Houlsby) and m.placement == 'block' for m in entry.methods)
    if houlsby_block:
      if len(names) > 1:
        raise ValueError(f'{module}: the port wraps a block in one Houlsby adapter only, found {names}.')
      blocks.add(module)
      prefix = f'{module}.adapter'
    else:
      if len(names) > 1:
        raise ValueError(
          f'{module} has {names}; the port wraps a layer in one adapter only (it skips later ones silently), so '
          'this plan has no port layout.'
        )
      wrapped.add(module)
      prefix = module
    f = entry.site.path
    for method in entry.methods:
      leaves = _PORT_LEAVES.get(type(method))
      if leaves is None:
        raise ValueError(
          f'{module}: the port has no {method.name!r} adapter (it has {sorted(c.name for c in _PORT_LEAVES)}).'
        )
      p = f'{prefix}.adapter' if isinstance(method, Houlsby) and not houlsby_block else prefix
      rows += [(f'{p}.{suffix}', (*f, leaf), layout) for suffix, leaf, layout in leaves]
  # Adapters inside a Houlsby-wrapped block sit under its `.block` too (its own adapter does not).
  rows = [
    (k if any(k.startswith(f'{b}.adapter.') for b in blocks) else _in_blocks(k, blocks), p, l) for k, p, l in rows
  ]
  return rows, wrapped, blocks


def _in_blocks(key: str, blocks: set[str]) -> str:
  for b in blocks:
    if key.startswith(b + '.'):
      return f'{b}.block.{key[len(b) + 1 :]}'
  return key


def _adapted_key(key: str, wrapped: set[str], blocks: set[str]) -> str:
  """A base key's name in the port's adapted model (wrapped layers hold `original_layer`, blocks `block`)."""
  module, leaf = key.rsplit('.', 1)
  if module in wrapped:
    key = f'{module}.original_layer.{leaf}'
  return _in_blocks(key, blocks)


def port_adapter_state_dict(adapted, params, buffers, *, include_trunk: bool = True) -> dict:
  """The state dict of the port's model after its `prepare_for_transfer`, from ours: trunk, heads and adapters.

  `adapted` is the `AdaptedModel` from `fa.prepare_for_transfer` on an `AlphaGenome`; the result
  loads with `load_state_dict(strict=True)` into the port's model prepared with the same config.
  With `include_trunk=False` only the heads and the adapters are written (what trained, in the
  port's names): load them with `strict=False` onto the port model prepared from the base weights.
  """
  rows, wrapped, blocks = _adapter_rows(adapted)
  adapter_paths = {p for _, p, _ in rows}
  flat = traverse_util.flatten_dict(params)
  out = {}
  if include_trunk:
    base = traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in adapter_paths})
    config, heads = adapted.base.config, adapted.base.heads
    for k, v in port_state_dict({'params': base, 'buffers': buffers}, config, heads).items():
      out[_adapted_key(k, wrapped, blocks)] = v
  else:
    buffer_tree = traverse_util.flatten_dict({'buffers': buffers})
    for row in key_table(adapted.base.config, adapted.base.heads):
      if row.path[0] == 'heads':
        leaf = flat[row.path] if row.collection == 'params' else buffer_tree[('buffers', *row.path)]
        out[row.torch_key] = to_torch(to_numpy(leaf, key=row.name), row.layout)
  for key, path, layout in rows:
    out[key] = to_torch(to_numpy(flat[path], key='/'.join(path)), layout)
  return out


def adapted_params_from_port(
  state_dict: Mapping[str, Any], adapted, params, *, keep_trunk: bool = False
) -> tuple[dict, dict]:
  """Our `(params, buffers)` for `adapted` from the state dict of the port's adapted model (same config).

  `params` is the tree `fa.prepare_for_transfer` returned (its shapes and dtypes are the template).
  Every key of `state_dict` must be accounted for and every leaf of `params` found. With
  `keep_trunk`, the trunk leaves of `params` are kept instead of converted again (the port model
  must have been prepared from the same base weights, e.g. side by side); heads and adapters are
  still read from `state_dict`, and buffers are then not returned (None).
  """
  rows, wrapped, blocks = _adapter_rows(adapted)
  adapter_keys = {k for k, _, _ in rows}
  table = key_table(adapted.base.config, adapted.base.heads)
  renamed = {_adapted_key(r.torch_key, wrapped, blocks): r for r in table}
  unknown = [k for k in state_dict if k not in renamed and k not in adapter_keys]
  if unknown:
    raise ValueError(
      f'`state_dict` has keys that neither the base nor the adapters of this plan account for: {unknown[:6]}.'
    )
  template = traverse_util.flatten_dict(params)
  if keep_trunk:
    missing = [k for k in renamed if k not in state_dict]
    if missing:
      raise ValueError(f'`state_dict` lacks {missing[:6]} (of {len(missing)}).')
    flat, buffers = dict(template), None
    convert = [(k, r.path, r.layout) for k, r in renamed.items() if r.path[0] == 'heads' and r.collection == 'params']
  else:
    variables = variables_from_port(
      {r.torch_key: state_dict[k] for k, r in renamed.items() if k in state_dict},
      adapted.base.config,
      adapted.base.heads,
    )
    flat, buffers = traverse_util.flatten_dict(variables['params']), variables['buffers']
    convert = []
  for key, path, layout in rows + convert:
    if key not in state_dict:
      raise ValueError(f'`state_dict` lacks the adapter tensor {key!r} (for {"/".join(path)}).')
    array = to_flax(to_numpy(state_dict[key], key=key), layout)
    want = template[path]
    if array.shape != tuple(want.shape):
      raise ValueError(f'state_dict[{key!r}] is {array.shape} in flax layout, {"/".join(path)} is {tuple(want.shape)}.')
    flat[path] = jnp.asarray(array.astype(want.dtype))
  if set(flat) != set(template):
    raise ValueError(f'the converted params differ from `params` in paths: {sorted(set(flat) ^ set(template))[:6]}.')
  return traverse_util.unflatten_dict(flat), buffers
