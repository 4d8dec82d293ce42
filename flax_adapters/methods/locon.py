"""Locon: LoRA for convolutions (LyCORIS; Yeh et al., 2023).

Beside a conv `W` of kernel size k, a down conv `D` (same kernel size, strides, dilations and
padding as `W`; in -> r channels) and a 1x1 up conv `U` (r -> out, zeros) add
`scale · U(D(x))`. On a plain conv `U∘D` is itself a conv, so it folds into `W`. On a
weight-standardized conv it cannot: the standardization is recomputed from the kernel on every
call and would undo the fold, so there Locon stays and runs factored after merging.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flax_adapters.methods.base import (
  AdapterError,
  Method,
  bypass_interceptor,
  check_positive_int,
  check_positive_number,
  fold_dtype,
  kaiming_uniform,
)
from flax_adapters.tracing import LINEAR_KINDS, RANK, Site


@dataclasses.dataclass(frozen=True, kw_only=True)
class Locon(Method):
  """Low-rank adaptation of a Conv kernel (1-D, 2-D, ...) as a down conv and a 1x1 up conv.

  Examples:
    >>> import jax.numpy as jnp, flax.linen as nn
    >>> from flax_adapters.tracing import trace_model
    >>> site = trace_model(nn.Conv(8, (5,)), jnp.ones((1, 32, 4))).sites[()]
    >>> Locon(rank=4, alpha=1).shapes(site)
    {'locon_down': (5, 4, 4), 'locon_up': (1, 4, 8)}
  """

  name = 'locon'
  leaf_names = ('locon_down', 'locon_up')
  stage = 'additive'
  kinds = ('conv',)

  rank: int = 4
  alpha: float = 1.0

  def __post_init__(self):
    check_positive_int(self.rank, 'rank')
    check_positive_number(self.alpha, 'alpha')

  @classmethod
  def rules_from_config(cls, config):
    from flax_adapters.rules import Rule  # pylint: disable=g-import-not-at-top

    if not config.locon_targets:
      raise ValueError(
        "`locon_targets` is empty but mode includes 'locon'; Locon needs the conv layers to "
        "adapt, e.g. locon_targets=['down_blocks.4', 'down_blocks.5']."
      )
    method = cls(rank=config.locon_rank, alpha=config.locon_alpha)
    return [Rule(target=t, methods=(method,), argument='locon_targets') for t in config.locon_targets]

  def peft_refusal(self, site):
    return (
      f"{site.name} has a locon adapter, and PEFT's conv LoRA is not mapped for this model. "
      'Fix: export_merged folds it into the base weights'
    )

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def check(self, site: Site) -> None:
    if site.kind != 'conv' or site.kernel_shape is None:
      hint = " Use 'lora' with `lora_targets` for linear layers." if site.kind in LINEAR_KINDS else ''
      raise AdapterError(
        f'Locon adapts convolutions (nn.Conv and its subclasses), but {site.describe()} is not one.{hint}'
      )
    if site.option('kernel_mask'):
      raise AdapterError(
        f'Locon cannot adapt {site.describe()}: the conv multiplies its kernel by a `mask`, which the low-rank '
        'path would bypass (merged and adapted outputs would differ, and masked taps, e.g. future positions of '
        'a causal conv, would leak). Use IA3 on it, or leave it out of `locon_targets`.'
      )
    groups = site.option('feature_group_count') or 1
    if groups != 1:
      raise AdapterError(
        f'Locon cannot adapt grouped convolution {site.describe()} (feature_group_count={groups}): '
        'its low-rank down conv would mix channels across groups. Leave it out of `locon_targets`.'
      )
    in_size = int(np.prod(site.kernel_shape[:-1]))
    out = site.kernel_shape[-1]
    if self.rank > min(in_size, out):
      raise AdapterError(
        f'`locon_rank`={self.rank} is larger than {site.describe()} allows: kernel '
        f'{site.kernel_shape} has {in_size} inputs per output and {out} outputs, so the rank can '
        f'be at most {min(in_size, out)}. Lower `locon_rank`.'
      )

  def layout(self, site: Site) -> dict[str, str]:
    spatial = site.kernel[:-2]
    return {'locon_down': spatial + 'I' + RANK, 'locon_up': '.' * len(spatial) + RANK + 'O'}

  def shapes(self, site: Site) -> dict[str, tuple[int, ...]]:
    *spatial, c_in, c_out = site.kernel_shape
    return {
      'locon_down': (*spatial, c_in, self.rank),
      'locon_up': (1,) * len(spatial) + (self.rank, c_out),
    }

  def init(self, rng, site, dtype):
    shapes = self.shapes(site)
    fan_in = int(np.prod(site.kernel_shape[:-1]))
    return {
      'locon_down': kaiming_uniform(rng, shapes['locon_down'], fan_in, dtype),
      'locon_up': jnp.zeros(shapes['locon_up'], dtype),
    }

  def _down_conv(self, site: Site, dtype) -> nn.Conv:
    geometry = {k: v for k, v in site.options if k not in ('feature_group_count', 'kernel_mask') and v is not None}
    return nn.Conv(features=self.rank, use_bias=False, dtype=dtype, param_dtype=dtype, **geometry)

  def apply(self, site, leaves, x, y, call, rng=None):
    dt = y.dtype
    # The down conv is an nn.Conv with the wrapped conv's geometry, so padding modes
    # ('SAME', 'CIRCULAR', 'CAUSAL', explicit pairs), strides and dilations all agree.
    with bypass_interceptor():
      t = self._down_conv(site, dt).apply({'params': {'kernel': leaves['locon_down'].astype(dt)}}, x.astype(dt))
    up = leaves['locon_up'].reshape(self.rank, -1).astype(dt)
    return y + jnp.einsum(f'...{RANK},{RANK}O->...O', t * jnp.asarray(self.scale, dt), up)

  def delta(self, site, leaves, dtype):
    down = leaves['locon_down'].astype(dtype)
    up = leaves['locon_up'].reshape(self.rank, -1).astype(dtype)
    return jnp.einsum(f'...I{RANK},{RANK}O->...IO', down, up, precision=jax.lax.Precision.HIGHEST) * jnp.asarray(
      self.scale, dtype
    )

  def fold(self, site, leaves, module_params):
    if not site.mergeable:
      return None
    kernel = module_params['kernel']
    dtype = fold_dtype(kernel)
    return {**module_params, 'kernel': (kernel.astype(dtype) + self.delta(site, leaves, dtype)).astype(kernel.dtype)}
