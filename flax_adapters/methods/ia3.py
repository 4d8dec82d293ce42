"""IA3: learned scales on a layer's output features (IA3) or input features (IA3_FF).

(Liu et al., 2022.) Both start at ones, so the adapted layer starts equal to the base layer. The
output scale multiplies the whole output, bias included (as PEFT does), so folding scales the
kernel's output columns and the bias; the input scale folds into the kernel's input rows. Both are
created by the `'ia3'` mode: IA3 on `ia3_targets`, IA3_FF on `ia3_ff_targets`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from flax_adapters.methods.base import AdapterError, Method, broadcast_to, fold_dtype, require_kernel_letters
from flax_adapters.tracing import LINEAR_KINDS, Site

_KINDS = (*LINEAR_KINDS, 'conv')


def _check(method: str, site: Site) -> None:
  if site.kind not in _KINDS or site.kernel_shape is None:
    raise AdapterError(
      f'{method} scales the features of linear or conv layers, but {site.describe()} is neither. '
      "Narrow the target to the layer itself (e.g. 'mha.k_proj')."
    )
  if site.kind != 'conv':
    require_kernel_letters(method, site)


def _ia3_rules(config):
  """Both IA3 methods from the config's 'ia3' mode (each class asks for its own targets)."""
  from flax_adapters.rules import Rule  # pylint: disable=g-import-not-at-top

  if not (config.ia3_targets or config.ia3_ff_targets):
    raise ValueError("`ia3_targets` and `ia3_ff_targets` are both empty but mode includes 'ia3'.")
  return [Rule(target=t, methods=(IA3(),), argument='ia3_targets') for t in config.ia3_targets] + [
    Rule(target=t, methods=(IA3FF(),), argument='ia3_ff_targets') for t in config.ia3_ff_targets
  ]


@dataclasses.dataclass(frozen=True, kw_only=True)
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
  kinds = _KINDS
  peft_type = 'IA3'

  @classmethod
  def rules_from_config(cls, config):
    return _ia3_rules(config)

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
    dt = fold_dtype(kernel)
    scale = leaves['ia3_scale'].astype(dt)
    out = dict(module_params)
    out['kernel'] = (kernel.astype(dt) * broadcast_to(scale, site.feature_out, site.kernel)).astype(kernel.dtype)
    if 'bias' in module_params:
      bias = module_params['bias']
      out['bias'] = (bias.astype(dt) * broadcast_to(scale, site.feature_out, site.bias)).astype(bias.dtype)
    return out

  # -- PEFT: ia3_l [out, 1]; a module not in `feedforward_modules` -------------------------------

  def peft_shapes(self, site):
    return {'ia3_l': (int(np.prod(site.size(site.feature_out))), 1)}

  def to_peft(self, site, leaves):
    return {'ia3_l': np.asarray(leaves['ia3_scale'], np.float32).reshape(-1, 1)}, {'feedforward': False}

  @classmethod
  def from_peft_settings(cls, settings):
    return None if settings.get('feedforward') else cls()

  def from_peft(self, site, tensors):
    return {'ia3_scale': np.reshape(tensors['ia3_l'], self.shapes(site)['ia3_scale'])}


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3FF(Method):
  """Scale each input feature: `layer(x * l)`, `l` initialised to ones (IA3 on feed-forward layers)."""

  name = 'ia3_ff'
  leaf_names = ('ia3_ff_scale',)
  stage = 'input'
  kinds = _KINDS
  group = 'ia3'
  mode = 'ia3'
  peft_type = 'IA3'

  @classmethod
  def rules_from_config(cls, config):
    return []  # IA3's rules include these (one mode, two target lists)

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
    dt = fold_dtype(kernel)
    scale = broadcast_to(leaves['ia3_ff_scale'].astype(dt), site.feature_in, site.kernel)
    return {**module_params, 'kernel': (kernel.astype(dt) * scale).astype(kernel.dtype)}

  # -- PEFT: ia3_l [1, in]; a module in `feedforward_modules` ------------------------------------

  def peft_shapes(self, site):
    return {'ia3_l': (1, int(np.prod(site.size(site.feature_in))))}

  def to_peft(self, site, leaves):
    return {'ia3_l': np.asarray(leaves['ia3_ff_scale'], np.float32).reshape(1, -1)}, {'feedforward': True}

  @classmethod
  def from_peft_settings(cls, settings):
    return cls() if settings.get('feedforward') else None

  def from_peft(self, site, tensors):
    return {'ia3_ff_scale': np.reshape(tensors['ia3_l'], self.shapes(site)['ia3_ff_scale'])}
