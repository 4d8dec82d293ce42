"""LoRA: a low-rank delta `scale · (x·A)·B` beside a linear layer (Hu et al., 2021).

A has the kernel's input axes and a rank axis, B the rank axis and the kernel's output axes, so a
multi-axis attention kernel `(d, heads, head_dim)` gets A `(d, r)` and B `(r, heads, head_dim)`.
A is uniform(±1/sqrt(fan_in)), B zeros: the adapted layer starts equal to the base layer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flax_adapters.methods.base import (
  AdapterError,
  Method,
  check_dropout,
  check_positive_int,
  check_positive_number,
  fold_dtype,
  kaiming_uniform,
  require_kernel_letters,
)
from flax_adapters.tracing import LINEAR_KINDS, RANK, Contraction, Site

HIGHEST = jax.lax.Precision.HIGHEST


def _factored(specs, scale, x, a, b):
  """`scale · (x·A)·B`; `specs` are the einsum subscripts (x, A, x·A, B, y).

  Plain JAX, differentiated by JAX in both modes. When the kernel's input axes end `x` and its
  output axes end `y` (a Dense layer), the leading (token) axes are flattened into one, so each
  product, and each of its gradients (B's `(x·A)ᵀ·g` included), is one 2-D GEMM: with the token
  axes apart, reverse mode yields `transpose(dot(g, x·A))`, which XLA:CPU runs as a transposed copy
  of `g` first (2-3% of a GPT-2 LoRA step; `+lora_flat` in benchmarks/README.md's ablation).
  A custom VJP would do the same but cost every user `jax.jvp`, `jax.jacfwd` and Hessian-vector
  products through adapted layers.
  """
  xs, as_, ts, bs, ys = specs
  kin, kout, rest = as_[:-1], bs[1:], ts[:-1]
  scale = jnp.asarray(scale, x.dtype)
  if rest and xs == rest + kin and ys == rest + kout:
    lead = x.shape[: len(rest)]
    a2 = a.reshape(-1, a.shape[-1])
    t = (x.reshape(-1, a2.shape[0]) @ a2) * scale
    y = t @ b.reshape(b.shape[0], -1)
    return y.reshape(lead + b.shape[1:])
  t = jnp.einsum(f'{xs},{as_}->{ts}', x, a) * scale
  return jnp.einsum(f'{ts},{bs}->{ys}', t, b)


def _fans(site: Site) -> tuple[int, int]:
  return math.prod(site.size(site.feature_in)), math.prod(site.size(site.feature_out))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRA(Method):
  """Low-rank adaptation of a Dense, DenseGeneral or Einsum kernel.

  Examples:
    >>> LoRA(rank=8, alpha=16).scale
    2.0
    >>> LoRA(rank=16, alpha=16, use_rslora=True).scale
    4.0
  """

  name = 'lora'
  leaf_names = ('lora_a', 'lora_b')
  stage = 'additive'
  kinds = LINEAR_KINDS
  peft_type = 'LORA'

  # Rank r of the delta.
  rank: int = 8
  # The delta is scaled by alpha / r (alpha / sqrt(r) with use_rslora).
  alpha: float = 16.0
  use_rslora: bool = False
  # Dropout on the LoRA branch's input during training (PEFT's `lora_dropout`); it is active only
  # when apply is given the 'adapter_dropout' rng stream.
  dropout: float = 0.0
  # A rank above min(fan_in, fan_out) only wastes parameters; new adapters refuse it, but an imported
  # one (PEFT allows any r) must keep its trained rank, and (x·A)·B is exact for any rank.
  allow_excess_rank: bool = dataclasses.field(default=False, compare=False, repr=False)

  def __post_init__(self):
    check_positive_int(self.rank, 'rank')
    check_positive_number(self.alpha, 'alpha')
    if not isinstance(self.use_rslora, bool):
      raise TypeError(f'`use_rslora` must be a bool, found {self.use_rslora!r}.')
    object.__setattr__(self, 'dropout', check_dropout(self.dropout, 'dropout'))

  @classmethod
  def rules_from_config(cls, config):
    from flax_adapters.rules import Rule  # pylint: disable=g-import-not-at-top

    if not config.lora_targets:
      raise ValueError("`lora_targets` is empty but mode includes 'lora'; name the layers, e.g. ['q_proj', 'v_proj'].")
    method = cls(
      rank=config.lora_rank, alpha=config.lora_alpha, use_rslora=config.use_rslora, dropout=float(config.lora_dropout)
    )
    return [Rule(target=t, methods=(method,), argument='lora_targets') for t in config.lora_targets]

  @property
  def needs_rng(self) -> bool:
    return self.dropout > 0

  @property
  def scale(self) -> float:
    return float(self.alpha / (np.sqrt(self.rank) if self.use_rslora else self.rank))

  def same_effect(self, other) -> bool:
    return (
      isinstance(other, LoRA)
      and (other.rank, other.dropout) == (self.rank, self.dropout)
      and math.isclose(other.scale, self.scale, rel_tol=1e-12)
    )

  def check(self, site: Site) -> None:
    if site.kind == 'conv':
      raise AdapterError(
        f'LoRA targets linear layers, but {site.describe()} is a convolution; adapt convolutions '
        "with Locon: add 'locon' to mode and this layer to `locon_targets`."
      )
    if site.kind == 'conv_other':
      raise AdapterError(
        f'LoRA targets linear layers, but {site.describe()} is a transposed or unshared-weight '
        'convolution, which neither LoRA nor Locon adapts; leave it out of the targets, or train it whole '
        f"(modules_to_save=['{site.name}'])."
      )
    if site.kind not in LINEAR_KINDS or site.kernel_shape is None:
      raise AdapterError(
        f'LoRA needs a linear layer (Dense, DenseGeneral, Einsum), but {site.describe()} is not '
        "one. Narrow the target (e.g. 'mha.q_proj'), or declare `adapter_kind = 'dense'` on a "
        'custom linear module.'
      )
    require_kernel_letters('LoRA', site)
    fan_in, fan_out = _fans(site)
    if self.rank > min(fan_in, fan_out) and not self.allow_excess_rank:
      raise AdapterError(
        f'`lora_rank`={self.rank} is larger than {site.describe()} allows: its kernel '
        f'{site.kernel_shape} maps {fan_in} inputs to {fan_out} outputs, so the rank can be at '
        f'most {min(fan_in, fan_out)}. Lower `lora_rank` (or, to keep a trained adapter of that rank, '
        'use `LoRA(..., allow_excess_rank=True)`).'
      )

  def to_json(self) -> dict:
    out = super().to_json()
    if not self.allow_excess_rank:  # as checkpoints written before the field existed
      del out['allow_excess_rank']
    return out

  def layout(self, site: Site) -> dict[str, str]:
    return {'lora_a': site.feature_in + RANK, 'lora_b': RANK + site.feature_out}

  def shapes(self, site: Site) -> dict[str, tuple[int, ...]]:
    return {
      'lora_a': site.size(site.feature_in) + (self.rank,),
      'lora_b': (self.rank,) + site.size(site.feature_out),
    }

  def init(self, rng, site: Site, dtype) -> dict[str, jax.Array]:
    shapes = self.shapes(site)
    return {
      'lora_a': kaiming_uniform(rng, shapes['lora_a'], _fans(site)[0], dtype),
      'lora_b': jnp.zeros(shapes['lora_b'], dtype),
    }

  def apply(self, site: Site, leaves: Mapping[str, jax.Array], x, y, call: Contraction, rng=None):
    dt = y.dtype
    if rng is not None and self.dropout > 0:
      keep = jax.random.bernoulli(rng, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
    kin, kout = site.feature_in, site.feature_out
    rest = ''.join(c for c in call.x if c not in kin)
    # Factored: (x·A) is only r wide; the scale is applied there, where it is cheapest.
    specs = (call.x, f'{kin}{RANK}', f'{rest}{RANK}', f'{RANK}{kout}', call.y)
    return y + _factored(specs, self.scale, x.astype(dt), leaves['lora_a'].astype(dt), leaves['lora_b'].astype(dt))

  def delta(self, site: Site, leaves: Mapping[str, jax.Array], dtype) -> jax.Array:
    """The weight delta `scale · A·B`, laid out like the kernel."""
    a = leaves['lora_a'].astype(dtype)
    b = leaves['lora_b'].astype(dtype)
    d = jnp.einsum(f'{site.feature_in}{RANK},{RANK}{site.feature_out}->{site.kernel}', a, b, precision=HIGHEST)
    return d * jnp.asarray(self.scale, dtype)

  def fold(self, site, leaves, module_params):
    if not site.mergeable:
      return None
    kernel = module_params['kernel']
    dtype = fold_dtype(kernel)
    merged = kernel.astype(dtype) + self.delta(site, leaves, dtype)
    return {**module_params, 'kernel': merged.astype(kernel.dtype)}

  # -- PEFT: lora_A.weight [r, in], lora_B.weight [out, r] (Linear-shaped, also on HF Conv1D) ------

  def peft_shapes(self, site):
    fan_in, fan_out = _fans(site)
    return {'lora_A.weight': (self.rank, fan_in), 'lora_B.weight': (fan_out, self.rank)}

  def to_peft(self, site, leaves):
    a = np.asarray(leaves['lora_a'], np.float32).reshape(-1, self.rank)
    b = np.asarray(leaves['lora_b'], np.float32).reshape(self.rank, -1)
    tensors = {'lora_A.weight': np.ascontiguousarray(a.T), 'lora_B.weight': np.ascontiguousarray(b.T)}
    settings = {'r': self.rank, 'lora_alpha': self.alpha, 'use_rslora': self.use_rslora, 'lora_dropout': self.dropout}
    return tensors, settings

  @classmethod
  def from_peft_settings(cls, settings):
    return cls(
      rank=settings['r'],
      alpha=settings['lora_alpha'],
      use_rslora=bool(settings.get('use_rslora', False)),
      dropout=float(settings.get('lora_dropout') or 0.0),
      allow_excess_rank=True,
    )

  def from_peft(self, site, tensors):
    shapes = self.shapes(site)
    return {
      'lora_a': np.reshape(tensors['lora_A.weight'].T, shapes['lora_a']),
      'lora_b': np.reshape(tensors['lora_B.weight'].T, shapes['lora_b']),
    }
