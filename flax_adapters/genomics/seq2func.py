"""An AlphaGenome-style sequence-to-function reference model, in linen.

`Seq2Func` maps one-hot DNA `(batch, length, 4)` to per-assay coverage tracks. It is small
(the presets run on a laptop CPU) but it has the structure, and the module names, that the
AlphaGenome transfer-learning guide targets, so every adapter example in that guide works on it
verbatim:

- `encoder`: a plain `nn.Conv` stem, then six down blocks `down_blocks_0` ... `down_blocks_5`
  (dotted `encoder.down_blocks.N`), each with exactly two weight-standardized convolutions
  `conv1`, `conv2` (`StandardizedConv1D`) and two norms `norm1`, `norm2` (`nn.RMSNorm`).
  Locon targets `['down_blocks.5']` select 2 convs, `['down_blocks.4', 'down_blocks.5']` 4,
  `['down_blocks.3', 'down_blocks.4', 'down_blocks.5']` 6.
- `tower`: transformer blocks `blocks_0` ... (dotted `tower.blocks.N`), each with two sub-blocks
  `mha` (`norm`, `q_proj`, `k_proj`, `v_proj`, `o_proj`, all `nn.Dense`; rotary positions) and
  `mlp` (`norm`, `fc1`, `fc2`). The residual adds live in the parent block,
  `x = x + mha(x); x = x + mlp(x)`, and each sub-block returns one `(..., length, width)` array,
  so Houlsby block adapters on `['mha', 'mlp']` compute `x + adapter(mha(x))`. A final
  `nn.LayerNorm` `tower.norm` follows the blocks.
- `heads`: one submodule per output head (see the heads protocol below).

Heads protocol
--------------
Any linen model can take part in head surgery (removing and adding heads) the same way:

1. The model has a dataclass field `heads`: a mapping `name -> {'modality': str,
   'num_tracks': int}`. Plain dicts (or a sequence of `(name, spec)` pairs) are accepted; the
   model stores them as a hashable, insertion-ordered `flax.core.FrozenDict` of `FrozenDict`s,
   so the module stays hashable (usable as a static argument of `jax.jit`).
   `model.clone(heads=new_mapping)` gives the same model with other heads.
2. Every head's parameters live under `params['heads'][name]`: a parent submodule named `heads`
   holding one submodule per head, named exactly the head's name.
3. `__call__` returns a dict `{head_name: predictions}`.
4. Changing `heads` changes nothing outside `params['heads']`: trunk parameter paths and shapes
   do not depend on the heads.

Here each head is `hidden` (`nn.Dense`, GELU) then `output` (`nn.Dense` to `num_tracks`) and a
softplus (coverage is non-negative), so predictions have shape
`(batch, length // bin_size, num_tracks)`. The modality only picks the head's resolution from
`MODALITY_POOL`: heads read the tower output (one position per `config.bin_size` bp), average-
pooled by the modality's factor first (`chip_histone` marks are broad: 2x coarser).
`model.bin_sizes()` gives the base pairs per output bin of every head.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> config = Seq2FuncConfig.tiny()
  >>> heads = {'atac': {'modality': 'atac', 'num_tracks': 2},
  ...          'chip_histone': {'modality': 'chip_histone', 'num_tracks': 1}}
  >>> model = Seq2Func(config, heads=heads)
  >>> params = model.init(jax.random.key(0), model.dummy_input())['params']
  >>> out = model.apply({'params': params}, jnp.zeros((3, config.seq_len, 4)))
  >>> {name: y.shape for name, y in out.items()}
  {'atac': (3, 8, 2), 'chip_histone': (3, 4, 1)}
  >>> model.bin_sizes()
  {'atac': 16, 'chip_histone': 32}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.core import FrozenDict
from flax.linen.linear import canonicalize_padding

from flax_adapters.heads import head_items

Array = jax.Array
Dtype = Any

# Base pairs per output bin of a head, as a multiple of the tower's bin size, by modality.
# Heads of these modalities may be declared; the factor is the only structural effect of a modality.
MODALITY_POOL: Mapping[str, int] = FrozenDict(
  {
    'atac': 1,
    'dnase': 1,
    'procap': 1,
    'cage': 1,
    'rna_seq': 1,
    'chip_tf': 1,
    'chip_histone': 2,
  }
)

DEFAULT_HEADS: Mapping[str, Mapping[str, Any]] = FrozenDict(
  {
    'atac': FrozenDict({'modality': 'atac', 'num_tracks': 2}),
    'dnase': FrozenDict({'modality': 'dnase', 'num_tracks': 2}),
    'chip_tf': FrozenDict({'modality': 'chip_tf', 'num_tracks': 2}),
  }
)


# --------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class Seq2FuncConfig:
  """Sizes of a `Seq2Func` model.

  Attributes:
    seq_len: input length in base pairs used by `Seq2Func.dummy_input` (the model accepts any
      length divisible by the largest head bin size).
    stem_channels: channels of the stem convolution.
    stem_kernel: kernel width of the stem convolution.
    down_channels: channels of each down block (six blocks; non-decreasing, the residual path
      zero-pads channels).
    down_pools: max-pool factor at the start of each down block (1 = no pooling).
    conv_kernel: kernel width of the down blocks' convolutions.
    num_blocks: number of transformer blocks in the tower.
    num_heads: attention heads.
    head_dim: width of each attention head (even: rotary positions rotate pairs).
    mlp_ratio: MLP hidden width as a multiple of the tower width.
    head_hidden: hidden width of each output head.
    rope_max_wavelength: longest wavelength of the rotary position encoding.

  Examples:
    >>> c = Seq2FuncConfig.tiny()
    >>> c.bin_size, c.tower_length, c.width
    (16, 8, 32)
    >>> c.replace(seq_len=256).tower_length
    16
  """

  seq_len: int = 128
  stem_channels: int = 8
  stem_kernel: int = 9
  down_channels: tuple[int, ...] = (8, 8, 16, 16, 32, 32)
  down_pools: tuple[int, ...] = (1, 2, 2, 2, 2, 1)
  conv_kernel: int = 5
  num_blocks: int = 2
  num_heads: int = 2
  head_dim: int = 16
  mlp_ratio: int = 2
  head_hidden: int = 32
  rope_max_wavelength: float = 1024.0

  def __post_init__(self):
    # Accept lists for the tuple fields, but store tuples (the config must stay hashable).
    for name in ('down_channels', 'down_pools'):
      value = getattr(self, name)
      if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(
          f'Seq2FuncConfig.{name}: expected a sequence of ints, found {type(value).__name__} '
          f'{value!r}. Fix: pass e.g. {name}=(8, 8, 16, 16, 32, 32).'
        )
      object.__setattr__(self, name, tuple(value))
    for name in (
      'seq_len',
      'stem_channels',
      'stem_kernel',
      'conv_kernel',
      'num_blocks',
      'num_heads',
      'head_dim',
      'mlp_ratio',
      'head_hidden',
    ):
      _check_int(
        f'Seq2FuncConfig.{name}', getattr(self, name), minimum=0 if name in ('num_blocks', 'head_hidden') else 1
      )
    for name in ('down_channels', 'down_pools'):
      for v in getattr(self, name):
        _check_int(f'Seq2FuncConfig.{name} entry', v, minimum=1)
    if len(self.down_channels) != 6 or len(self.down_pools) != 6:
      raise ValueError(
        'Seq2FuncConfig: expected 6 down blocks (AlphaGenome targets name down_blocks.0 ... '
        f'down_blocks.5), found down_channels of length {len(self.down_channels)} and '
        f'down_pools of length {len(self.down_pools)}. Fix: give six entries to each.'
      )
    widths = (self.stem_channels,) + self.down_channels
    if any(b < a for a, b in zip(widths, widths[1:])):
      raise ValueError(
        'Seq2FuncConfig.down_channels: expected non-decreasing channels starting at '
        f'stem_channels={self.stem_channels} (the residual path zero-pads channels), found '
        f'{self.down_channels}. Fix: sort them or lower stem_channels.'
      )
    if self.head_dim % 2:
      raise ValueError(
        f'Seq2FuncConfig.head_dim: expected an even number (rotary positions rotate pairs of '
        f'features), found {self.head_dim}. Fix: use {self.head_dim + 1}.'
      )
    if self.seq_len % self.bin_size:
      raise ValueError(
        f'Seq2FuncConfig.seq_len: expected a multiple of the total pooling {self.bin_size} '
        f'(product of down_pools {self.down_pools}), found {self.seq_len}. Fix: use '
        f'seq_len={-(-self.seq_len // self.bin_size) * self.bin_size}.'
      )

  @property
  def bin_size(self) -> int:
    """Base pairs per tower position: the product of `down_pools`."""
    return int(np.prod(self.down_pools))

  @property
  def tower_length(self) -> int:
    """Tower positions for an input of `seq_len` base pairs."""
    return self.seq_len // self.bin_size

  @property
  def width(self) -> int:
    """Feature width of the tower (the last down block's channels)."""
    return self.down_channels[-1]

  def head_bin_size(self, modality: str) -> int:
    """Base pairs per output bin of a head of this modality."""
    return self.bin_size * _modality_pool(modality, 'modality')

  def replace(self, **changes) -> Seq2FuncConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def tiny(cls, **changes) -> Seq2FuncConfig:
    """For tests: 128 bp in, 16 bp bins, 2 transformer blocks of width 32 (~45k params)."""
    return cls(**changes)

  @classmethod
  def small(cls, **changes) -> Seq2FuncConfig:
    """For CPU demos: 1024 bp in, 32 bp bins, 2 transformer blocks of width 64 (~180k params)."""
    return cls(
      **{
        **dict(
          seq_len=1024,
          stem_channels=24,
          stem_kernel=15,
          down_channels=(24, 32, 32, 48, 48, 64),
          down_pools=(2, 2, 2, 2, 2, 1),
          conv_kernel=5,
          num_blocks=2,
          num_heads=4,
          head_dim=16,
          mlp_ratio=2,
          head_hidden=32,
        ),
        **changes,
      }
    )


def _check_int(name: str, value, minimum: int):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name}: expected an int, found {type(value).__name__} {value!r}.')
  if value < minimum:
    raise ValueError(f'{name}: expected an int >= {minimum}, found {value}.')


def _modality_pool(modality, what: str) -> int:
  if not isinstance(modality, str):
    raise TypeError(
      f'{what}: expected a modality name (str), found {type(modality).__name__} '
      f'{modality!r}. Known modalities: {sorted(MODALITY_POOL)}.'
    )
  if modality not in MODALITY_POOL:
    raise ValueError(
      f'{what}: unknown modality {modality!r}; expected one of '
      f'{sorted(MODALITY_POOL)}. Fix: pick the closest assay type, e.g. '
      "'atac' for accessibility or 'chip_tf' for factor binding."
    )
  return MODALITY_POOL[modality]


def normalize_heads(heads) -> FrozenDict:
  """Validates a heads mapping and returns it as a hashable, ordered `FrozenDict`.

  Accepts a mapping `name -> {'modality': str, 'num_tracks': int}` or a sequence of
  `(name, spec)` pairs.

  Examples:
    >>> h = normalize_heads({'my_atac': {'modality': 'atac', 'num_tracks': 4}})
    >>> h['my_atac']['num_tracks'], hash(h) == hash(normalize_heads(dict(h)))
    (4, True)
  """
  out = {}
  for name, spec in head_items(heads):
    if not isinstance(spec, Mapping):
      raise TypeError(
        f'heads[{name!r}]: expected a mapping with keys "modality" and '
        f'"num_tracks", found {type(spec).__name__} {spec!r}.'
      )
    extra = set(spec) - {'modality', 'num_tracks'}
    missing = {'modality', 'num_tracks'} - set(spec)
    if extra or missing:
      raise ValueError(
        f'heads[{name!r}]: expected exactly the keys "modality" and "num_tracks", found '
        f'{sorted(spec)} (missing {sorted(missing)}, unexpected {sorted(extra)}). Fix: '
        f'heads[{name!r}] = {{"modality": "atac", "num_tracks": 4}}.'
      )
    _modality_pool(spec['modality'], f'heads[{name!r}]["modality"]')
    _check_int(f'heads[{name!r}]["num_tracks"]', spec['num_tracks'], minimum=1)
    out[name] = FrozenDict({'modality': spec['modality'], 'num_tracks': int(spec['num_tracks'])})
  return FrozenDict(out)


# --------------------------------------------------------------------------------------------
# Weight-standardized convolution


class StandardizedConv1D(nn.Conv):
  """A 1D `nn.Conv` whose kernel is weight-standardized on every call (as in AlphaGenome).

  The `kernel` param `(kernel_size, in_features // feature_group_count, features)` is
  standardized per output channel over its first two axes, `w = (kernel - mean) /
  sqrt(fan_in * var + eps)` (scaled weight standardization; `scale_by_fan_in=False` gives
  `/ sqrt(var + eps)`), then multiplied by a learned per-output `scale` param (`use_scale`).
  The output is therefore unchanged when a constant is added to one output channel of the
  kernel, and when that channel is multiplied by a positive number.

  Supports every `nn.Conv` field except `mask`; padding may be 'SAME', 'SAME_LOWER', 'VALID',
  'CAUSAL', 'CIRCULAR', 'REFLECT', an int or `[(low, high)]`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> conv = StandardizedConv1D(features=3, kernel_size=(5,))
    >>> v = conv.init(jax.random.key(0), jnp.ones((2, 16, 4)))
    >>> jax.tree.map(jnp.shape, v['params'])
    {'bias': (3,), 'kernel': (5, 4, 3), 'scale': (3,)}
    >>> conv.apply(v, jnp.ones((2, 16, 4))).shape
    (2, 16, 3)
  """

  # Read by flax_adapters: adapter weight deltas cannot be folded into this kernel, because the
  # standardization is recomputed from the kernel on every call (a merged delta would be
  # re-standardized, and its per-channel mean removed). Locon on this layer stays factored after
  # merging. (A class attribute, not a dataclass field.)
  adapter_mergeable = False

  eps: float = 1e-4
  use_scale: bool = True
  scale_by_fan_in: bool = True
  scale_init: Callable = nn.initializers.ones

  def standardized_kernel(self, kernel: Array, scale: Array | None) -> Array:
    """The kernel actually convolved with (computed in at least float32)."""
    dtype = jnp.promote_types(kernel.dtype, jnp.float32)
    k = kernel.astype(dtype)
    mean = jnp.mean(k, axis=(0, 1), keepdims=True)
    var = jnp.var(k, axis=(0, 1), keepdims=True)
    fan_in = k.shape[0] * k.shape[1] if self.scale_by_fan_in else 1
    w = (k - mean) * jax.lax.rsqrt(var * fan_in + self.eps)
    if scale is not None:
      w = w * scale.astype(dtype)
    return w

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    kernel_size = (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
    if len(kernel_size) != 1:
      raise ValueError(
        f'StandardizedConv1D.kernel_size: expected one spatial dimension, found '
        f'{self.kernel_size!r}. Fix: kernel_size=({kernel_size[0]},).'
      )
    if self.mask is not None:
      raise ValueError(
        'StandardizedConv1D.mask: masked kernels are not supported (the mask '
        'would interact with standardization). Fix: leave mask=None.'
      )
    if inputs.ndim < 2:
      raise ValueError(f'StandardizedConv1D inputs: expected (..., length, features), found shape {inputs.shape}.')

    def one(x, name):
      if x is None:
        return 1
      if isinstance(x, int):
        return x
      x = tuple(x)
      if len(x) != 1:
        raise ValueError(f'StandardizedConv1D.{name}: expected an int or a 1-tuple, found {x!r}.')
      return x[0]

    strides = (one(self.strides, 'strides'),)
    input_dilation = (one(self.input_dilation, 'input_dilation'),)
    kernel_dilation = (one(self.kernel_dilation, 'kernel_dilation'),)

    batch_shape = inputs.shape[:-2]
    x = inputs.reshape((-1,) + inputs.shape[-2:])

    padding = canonicalize_padding(self.padding, 1)
    if isinstance(padding, str):
      padding = padding.upper()
      span = (kernel_size[0] - 1) * kernel_dilation[0]
      if padding in ('CIRCULAR', 'REFLECT'):
        mode = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[padding]
        x = jnp.pad(x, [(0, 0), (span // 2, span - span // 2), (0, 0)], mode=mode)
        padding = 'VALID'
      elif padding == 'CAUSAL':
        x = jnp.pad(x, [(0, 0), (span, 0), (0, 0)])
        padding = 'VALID'
      elif padding not in ('SAME', 'SAME_LOWER', 'VALID'):
        raise ValueError(
          f'StandardizedConv1D.padding: expected one of SAME, SAME_LOWER, VALID, CAUSAL, '
          f'CIRCULAR, REFLECT, an int or [(low, high)], found {self.padding!r}.'
        )

    in_features = x.shape[-1]
    if in_features % self.feature_group_count:
      raise ValueError(
        f'StandardizedConv1D.feature_group_count: input features {in_features} are not '
        f'divisible by feature_group_count={self.feature_group_count}.'
      )
    kernel_shape = kernel_size + (in_features // self.feature_group_count, self.features)
    kernel = self.param('kernel', self.kernel_init, kernel_shape, self.param_dtype)
    scale = self.param('scale', self.scale_init, (self.features,), self.param_dtype) if self.use_scale else None
    bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None

    w = self.standardized_kernel(kernel, scale)
    x, w, bias = self.promote_dtype(x, w, bias, dtype=self.dtype)
    if self.conv_general_dilated_cls is not None:
      conv = self.conv_general_dilated_cls()
    elif self.conv_general_dilated is not None:
      conv = self.conv_general_dilated
    else:
      conv = jax.lax.conv_general_dilated
    y = conv(
      x,
      w,
      window_strides=strides,
      padding=padding,
      lhs_dilation=input_dilation,
      rhs_dilation=kernel_dilation,
      dimension_numbers=('NWC', 'WIO', 'NWC'),
      feature_group_count=self.feature_group_count,
      precision=self.precision,
    )
    if bias is not None:
      y = y + bias
    return y.reshape(batch_shape + y.shape[-2:])


# --------------------------------------------------------------------------------------------
# Encoder


class DownBlock(nn.Module):
  """Max-pool, then two pre-activation residual conv units (norm -> GELU -> conv)."""

  features: int
  pool: int
  kernel_size: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.pool > 1:
      x = nn.max_pool(x, (self.pool,), strides=(self.pool,))
    kw = dict(kernel_size=(self.kernel_size,), padding='SAME', dtype=self.dtype, param_dtype=self.param_dtype)
    norm = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = StandardizedConv1D(self.features, name='conv1', **kw)(nn.gelu(nn.RMSNorm(name='norm1', **norm)(x)))
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, self.features - x.shape[-1])]) + h
    h = StandardizedConv1D(self.features, name='conv2', **kw)(nn.gelu(nn.RMSNorm(name='norm2', **norm)(x)))
    return x + h


class Encoder(nn.Module):
  """Stem conv (plain `nn.Conv`, 1 bp resolution) and six down blocks."""

  config: Seq2FuncConfig
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    x = nn.Conv(
      c.stem_channels, (c.stem_kernel,), padding='SAME', dtype=self.dtype, param_dtype=self.param_dtype, name='stem'
    )(x)
    for i, (features, pool) in enumerate(zip(c.down_channels, c.down_pools)):
      x = DownBlock(
        features, pool, c.conv_kernel, dtype=self.dtype, param_dtype=self.param_dtype, name=f'down_blocks_{i}'
      )(x)
    return x


# --------------------------------------------------------------------------------------------
# Transformer tower


def rotary(x: Array, max_wavelength: float) -> Array:
  """Rotary position encoding of `x` `(batch, length, heads, head_dim)` along `length`."""
  length, dim = x.shape[-3], x.shape[-1]
  half = dim // 2
  freq = max_wavelength ** (-np.arange(half, dtype=np.float32) / half)
  angles = np.arange(length, dtype=np.float32)[:, None] * freq[None, :]
  sin = jnp.asarray(np.sin(angles)[:, None, :], x.dtype)
  cos = jnp.asarray(np.cos(angles)[:, None, :], x.dtype)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class MHA(nn.Module):
  """Pre-norm multi-head self-attention sub-block (no residual: the parent adds it)."""

  num_heads: int
  head_dim: int
  rope_max_wavelength: float
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.LayerNorm(name='norm', **kw)(x)
    inner = self.num_heads * self.head_dim
    split = lambda t: t.reshape(t.shape[:-1] + (self.num_heads, self.head_dim))
    q = split(nn.Dense(inner, use_bias=False, name='q_proj', **kw)(h))
    k = split(nn.Dense(inner, use_bias=False, name='k_proj', **kw)(h))
    v = split(nn.Dense(inner, use_bias=False, name='v_proj', **kw)(h))
    q = rotary(q, self.rope_max_wavelength)
    k = rotary(k, self.rope_max_wavelength)
    logits = jnp.einsum('...qhd,...khd->...hqk', q, k) / math.sqrt(self.head_dim)
    weights = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)
    o = jnp.einsum('...hqk,...khd->...qhd', weights.astype(v.dtype), v)
    o = o.reshape(o.shape[:-2] + (inner,))
    return nn.Dense(x.shape[-1], name='o_proj', **kw)(o)


class MLP(nn.Module):
  """Pre-norm feed-forward sub-block (no residual: the parent adds it)."""

  hidden: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.LayerNorm(name='norm', **kw)(x)
    h = nn.gelu(nn.Dense(self.hidden, name='fc1', **kw)(h))
    return nn.Dense(x.shape[-1], name='fc2', **kw)(h)


class TransformerBlock(nn.Module):
  """`x = x + mha(x); x = x + mlp(x)`."""

  config: Seq2FuncConfig
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x + MHA(c.num_heads, c.head_dim, c.rope_max_wavelength, name='mha', **kw)(x)
    x = x + MLP(c.mlp_ratio * x.shape[-1], name='mlp', **kw)(x)
    return x


class Tower(nn.Module):
  """Transformer blocks `blocks_0 ...` and a final `norm`."""

  config: Seq2FuncConfig
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.config.num_blocks):
      x = TransformerBlock(self.config, name=f'blocks_{i}', **kw)(x)
    return nn.LayerNorm(name='norm', **kw)(x)


# --------------------------------------------------------------------------------------------
# Heads


class Head(nn.Module):
  """Average-pool by the modality's factor, `hidden` Dense + GELU, `output` Dense, softplus."""

  modality: str
  num_tracks: int
  hidden: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pool = MODALITY_POOL[self.modality]
    if pool > 1:
      x = nn.avg_pool(x, (pool,), strides=(pool,))
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.hidden:
      x = nn.gelu(nn.Dense(self.hidden, name='hidden', **kw)(x))
    y = nn.Dense(self.num_tracks, name='output', **kw)(x)
    return nn.softplus(y.astype(jnp.promote_types(y.dtype, jnp.float32)))


class Heads(nn.Module):
  """One `Head` submodule per head, named exactly the head's name."""

  specs: FrozenDict
  hidden: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> dict[str, Array]:
    return {
      name: Head(
        spec['modality'], spec['num_tracks'], self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name=name
      )(x)
      for name, spec in self.specs.items()
    }


# --------------------------------------------------------------------------------------------
# The model


class Seq2Func(nn.Module):
  """AlphaGenome-style DNA -> coverage model: conv encoder, transformer tower, per-assay heads.

  Attributes:
    config: sizes (`Seq2FuncConfig.tiny()`, `Seq2FuncConfig.small()`).
    heads: mapping `name -> {'modality': str, 'num_tracks': int}` (see the module docstring);
      defaults to `DEFAULT_HEADS` (`atac`, `dnase`, `chip_tf`, two tracks each).
    dtype: computation dtype (`None`: from inputs and params; e.g. `jnp.bfloat16`).
    param_dtype: parameter dtype (e.g. `jnp.float64` under `jax.enable_x64`).

  `__call__(dna)` takes one-hot DNA `(batch, length, 4)` (length a multiple of the largest head
  bin size) and returns `{head_name: (batch, length // bin_size, num_tracks)}`, non-negative.
  `embed(dna)` returns the tower output `(batch, length // config.bin_size, config.width)`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> model = Seq2Func(Seq2FuncConfig.tiny())
    >>> variables = model.init(jax.random.key(0), model.dummy_input())
    >>> sorted(variables['params']), sorted(variables['params']['heads'])
    (['encoder', 'heads', 'tower'], ['atac', 'chip_tf', 'dnase'])
    >>> model.apply(variables, model.dummy_input(5))['dnase'].shape
    (5, 8, 2)
    >>> model.apply(variables, model.dummy_input(5), method='embed').shape
    (5, 8, 32)
    >>> new = model.clone(heads={'my_atac': {'modality': 'atac', 'num_tracks': 4}})
    >>> new.heads['my_atac']['num_tracks']
    4
  """

  config: Seq2FuncConfig = dataclasses.field(default_factory=Seq2FuncConfig.tiny)
  heads: Any = DEFAULT_HEADS
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if not isinstance(self.config, Seq2FuncConfig):
      raise TypeError(
        f'Seq2Func.config: expected a Seq2FuncConfig, found '
        f'{type(self.config).__name__}. Fix: Seq2Func(Seq2FuncConfig.tiny()).'
      )
    # Stored normalized and hashable; `clone(heads=...)` goes through here again.
    object.__setattr__(self, 'heads', normalize_heads(self.heads))
    super().__post_init__()

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(self.config, **kw)
    self.tower = Tower(self.config, **kw)
    self.heads_module = Heads(self.heads, self.config.head_hidden, name='heads', **kw)

  def _check_input(self, dna):
    if not hasattr(dna, 'shape') or not hasattr(dna, 'dtype'):
      raise TypeError(f'Seq2Func input: expected an array (batch, length, 4), found {type(dna).__name__}.')
    if dna.ndim != 3 or dna.shape[-1] != 4:
      raise ValueError(
        f'Seq2Func input: expected one-hot DNA of shape (batch, length, 4), found '
        f'shape {tuple(dna.shape)}. Fix: add a batch axis / one-hot encode '
        '(flax_adapters.genomics.data.one_hot).'
      )
    if not jnp.issubdtype(dna.dtype, jnp.floating):
      raise TypeError(
        f'Seq2Func input: expected a floating one-hot array, found dtype '
        f'{dna.dtype}. Fix: jax.nn.one_hot(tokens, 4) or x.astype(jnp.float32).'
      )
    multiple = self.config.bin_size * max([MODALITY_POOL[s['modality']] for s in self.heads.values()] + [1])
    if dna.shape[1] % multiple:
      raise ValueError(
        f'Seq2Func input: expected a length that is a multiple of {multiple} (the '
        f'largest head bin size), found length {dna.shape[1]}. Fix: crop or pad '
        f'to {dna.shape[1] // multiple * multiple} or '
        f'{-(-dna.shape[1] // multiple) * multiple}.'
      )

  def embed(self, dna: Array) -> Array:
    """Tower output `(batch, length // config.bin_size, config.width)`."""
    self._check_input(dna)
    return self.tower(self.encoder(dna))

  def __call__(self, dna: Array) -> dict[str, Array]:
    return self.heads_module(self.embed(dna))

  @nn.nowrap
  def dummy_input(self, batch: int = 1, dtype=jnp.float32) -> Array:
    """Zeros of the input shape `(batch, config.seq_len, 4)`, e.g. for `init`."""
    return jnp.zeros((batch, self.config.seq_len, 4), dtype)

  @nn.nowrap
  def bin_sizes(self) -> dict[str, int]:
    """Base pairs per output bin of each head."""
    return {name: self.config.head_bin_size(s['modality']) for name, s in self.heads.items()}

  @nn.nowrap
  def output_shapes(self, batch: int = 1, seq_len: int | None = None) -> dict[str, tuple]:
    """Shape of each head's predictions for inputs `(batch, seq_len, 4)`."""
    seq_len = self.config.seq_len if seq_len is None else seq_len
    return {name: (batch, seq_len // b, self.heads[name]['num_tracks']) for name, b in self.bin_sizes().items()}
