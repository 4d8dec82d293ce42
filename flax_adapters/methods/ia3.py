"""IA3: learned scales on a layer's output features (IA3) or input features (IA3_FF).

(Liu et al., 2022.) Both start at ones, so the adapted layer starts equal to the base layer. The
output scale multiplies the whole output, bias included (as PEFT does), so folding scales the
kernel's output columns and the bias; the input scale folds into the kernel's input rows.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from flax_adapters.methods.base import AdapterError, Method, broadcast_to, require_kernel_letters
from flax_adapters.tracing import LINEAR_KINDS, Site

_KINDS = LINEAR_KINDS + ('conv',)


def _check(method: str, site: Site) -> None:
  if site.kind not in _KINDS or site.kernel_shape is None:
    raise AdapterError(
      f'{method} scales the features of linear or conv layers, but {site.describe()} is neither. '
      "Narrow the target to the layer itself (e.g. 'mha.k_proj')."
    )
  if site.kind != 'conv':
    require_kernel_letters(method, site)


def _fold_dtype(kernel):
  return jnp.promote_types(kernel.dtype, jnp.float32)


@dataclasses.dataclass(frozen=True)
class IA3(Method):
  """Scale each output feature: `y * l`, `l` initialised to ones.

  Examples:
    >>> import jax.numpy as jnp, flax.linen as nn
    >>> from flax_adapters.tracing import trace_model
    >>> site = trace_model(nn.Dense(3), jnp.ones((1, 4))).sites[()]
    >>> IA3().shapes(site)
    {'ia3_scale': (3,)}
  """

  name = 'ia3'
  leaf_names = ('ia3_scale',)
  stage = 'output'
  group = 'ia3'

  def check(self, site):
    _check('IA3', site)

  def layout(self, site):
    return {'ia3_scale': site.feature_out}

  def shapes(self, site):
    return {'ia3_scale': site.size(site.feature_out)}

  def init(self, rng, site, dtype):
    return {'ia3_scale': jnp.ones(self.shapes(site)['ia3_scale'], dtype)}

  def apply(self, site, leaves, x, y, call, rng=None):
    return y * broadcast_to(leaves['ia3_scale'].astype(y.dtype), site.feature_out, call.y)

  def fold(self, site, leaves, module_params):
    if not site.mergeable:
      return None
    kernel = module_params['kernel']
    dt = _fold_dtype(kernel)
    scale = leaves['ia3_scale'].astype(dt)
    out = dict(module_params)
    out['kernel'] = (kernel.astype(dt) * broadcast_to(scale, site.feature_out, site.kernel)).astype(kernel.dtype)
    if 'bias' in module_params:
      bias = module_params['bias']
      out['bias'] = (bias.astype(dt) * broadcast_to(scale, site.feature_out, site.bias)).astype(bias.dtype)
    return out


@dataclasses.dataclass(frozen=True)
class IA3FF(Method):
  """Scale each input feature: `layer(x * l)`, `l` initialised to ones (IA3 on feed-forward layers)."""

  name = 'ia3_ff'
  leaf_names = ('ia3_ff_scale',)
  stage = 'input'
  group = 'ia3'

  def check(self, site):
    _check('IA3_FF', site)
    if site.kind == 'conv' and (site.option('feature_group_count') or 1) != 1:
      raise AdapterError(
        f'IA3_FF cannot scale the inputs of grouped convolution {site.describe()} '
        f'(feature_group_count={site.option("feature_group_count")}); use IA3 on its outputs.'
      )

  def layout(self, site):
    return {'ia3_ff_scale': site.feature_in}

  def shapes(self, site):
    return {'ia3_ff_scale': site.size(site.feature_in)}

  def init(self, rng, site, dtype):
    return {'ia3_ff_scale': jnp.ones(self.shapes(site)['ia3_ff_scale'], dtype)}

  def apply(self, site, leaves, x, y, call, rng=None):
    return x * broadcast_to(leaves['ia3_ff_scale'].astype(x.dtype), site.feature_in, call.x)

  def fold(self, site, leaves, module_params):
    if not site.mergeable:
      return None
    kernel = module_params['kernel']
    dt = _fold_dtype(kernel)
    scale = broadcast_to(leaves['ia3_ff_scale'].astype(dt), site.feature_in, site.kernel)
    return {**module_params, 'kernel': (kernel.astype(dt) * scale).astype(kernel.dtype)}
