"""Houlsby bottleneck adapters: `h -> h + up(act(down(h)))` on a module's output.

(Houlsby et al., 2019; the Baskerville/AlphaGenome placement.) At `'block'` placement the
bottleneck wraps the output of a sub-block such as `mha` or `mlp`, so a pre-norm residual block
computes `x + mha(x) + up(act(down(mha(x))))`; at `'linear'` placement it wraps a linear layer's
output. The up projection starts at zero, so the adapter starts as the exact identity (AlphaGenome's
truncated-normal init of both projections is available as `init='alphagenome'`). The nonlinearity
makes it unfoldable: it stays in the merged model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from flax_adapters.methods.base import (
  AdapterError,
  Method,
  broadcast_to,
  check_choice,
  check_positive_int,
  kaiming_uniform,
)
from flax_adapters.tracing import LATENT, LINEAR_KINDS, Site

ACTIVATIONS = {'relu': jax.nn.relu, 'gelu': jax.nn.gelu, 'silu': jax.nn.silu, 'tanh': jnp.tanh}
PLACEMENTS = ('block', 'linear')
INITS = ('zero_up', 'alphagenome')


@dataclasses.dataclass(frozen=True, kw_only=True)
class Houlsby(Method):
  """A residual bottleneck on a module's output features.

  Examples:
    >>> import jax.numpy as jnp, flax.linen as nn
    >>> from flax_adapters.tracing import trace_model
    >>> site = trace_model(nn.Dense(16), jnp.ones((1, 4))).sites[()]
    >>> Houlsby(latent_dim=2, placement='linear').count(site)  # 16*2 + 2 + 2*16 + 16
    82
  """

  name = 'houlsby'
  leaf_names = ('houlsby_down', 'houlsby_down_bias', 'houlsby_up', 'houlsby_up_bias')
  stage = 'output'
  weight_space = False

  latent_dim: int = 8
  # 'block': wrap the output of a sub-block ('mha', 'mlp'); 'linear': of a linear layer.
  placement: str = 'block'
  activation: str = 'relu'
  init_scheme: str = 'zero_up'

  def __post_init__(self):
    check_positive_int(self.latent_dim, 'latent_dim')
    check_choice(
      self.placement,
      PLACEMENTS,
      'placement',
      "'block' wraps sub-blocks such as 'mha'/'mlp'; 'linear' wraps individual linear layers.",
    )
    check_choice(self.activation, tuple(ACTIVATIONS), 'activation')
    check_choice(self.init_scheme, INITS, 'init_scheme')

  @classmethod
  def rules_from_config(cls, config):
    from flax_adapters.rules import Rule  # pylint: disable=g-import-not-at-top

    if not config.houlsby_targets:
      raise ValueError("`houlsby_targets` is empty but mode includes 'houlsby'; e.g. ['mha', 'mlp'].")
    method = cls(
      latent_dim=config.houlsby_latent_dim,
      placement=config.houlsby_placement,
      activation=config.houlsby_activation,
      init_scheme=config.houlsby_init,
    )
    return [Rule(target=t, methods=(method,), argument='houlsby_targets') for t in config.houlsby_targets]

  def placement_kinds(self):
    return (('block',), True) if self.placement == 'block' else (LINEAR_KINDS, False)

  def peft_refusal(self, site):
    return (
      f"{site.name} has a houlsby adapter, which PEFT's LoRA/IA3 formats cannot hold (a bottleneck on a module's "
      'output is not a weight-space adapter). Fix: keep it as a flax adapter checkpoint (save_adapters); it cannot '
      'be merged into the weights either'
    )

  def check(self, site: Site) -> None:
    if self.placement == 'block':
      if site.kind != 'block':
        raise AdapterError(
          f"Houlsby at placement 'block' wraps sub-blocks (modules such as 'mha' or 'mlp'), but "
          f"{site.describe()} is a single layer. Use houlsby_placement='linear' to wrap layers."
        )
    elif site.kind not in LINEAR_KINDS or site.kernel_shape is None:
      raise AdapterError(
        f"Houlsby at placement 'linear' wraps linear layers, but {site.describe()} is not one. "
        "Use houlsby_placement='block' to wrap sub-blocks."
      )
    if site.option('batch_dims'):  # before the output check: such sites record no feature axes
      raise AdapterError(
        f'Houlsby cannot wrap {site.describe()}: a DenseGeneral with batch_dims={site.option("batch_dims")} (a '
        'separate kernel per batch index) is not supported. Target a different layer, or wrap the block around '
        "it (houlsby_placement='block')."
      )
    if site.unsupported_letters:
      raise AdapterError(
        f'Houlsby cannot wrap {site.describe()}: kernel axes {site.unsupported_letters!r} of {site.kernel!r} are '
        'neither contracted with the input nor output features (e.g. an Einsum batch axis, or DenseGeneral '
        "batch_dims). Target a different layer, or wrap the block around it (houlsby_placement='block')."
      )
    if not site.feature_out:
      raise AdapterError(
        f'Houlsby needs {site.describe()} to return one array whose last axis is the feature '
        f'axis; it returns {site.option("output")}.'
      )
    features = int(np.prod(site.size(site.feature_out)))
    if self.latent_dim > features:
      raise AdapterError(
        f'`houlsby_latent_dim`={self.latent_dim} is larger than the {features} output features of '
        f'{site.describe()}: a bottleneck wider than what it wraps adds parameters without a bottleneck. '
        f'Lower `houlsby_latent_dim` (at most {features}).'
      )

  def layout(self, site):
    f = site.feature_out
    return {'houlsby_down': f + LATENT, 'houlsby_down_bias': LATENT, 'houlsby_up': LATENT + f, 'houlsby_up_bias': f}

  def shapes(self, site):
    feat = site.size(site.feature_out)
    return {
      'houlsby_down': feat + (self.latent_dim,),
      'houlsby_down_bias': (self.latent_dim,),
      'houlsby_up': (self.latent_dim,) + feat,
      'houlsby_up_bias': feat,
    }

  def init(self, rng, site, dtype):
    shapes = self.shapes(site)
    k_down, k_up = jax.random.split(rng)
    if self.init_scheme == 'alphagenome':
      down = 1e-3 * jax.random.truncated_normal(k_down, -2.0, 2.0, shapes['houlsby_down'], dtype)
      up = 1e-3 * jax.random.truncated_normal(k_up, -2.0, 2.0, shapes['houlsby_up'], dtype)
    else:
      down = kaiming_uniform(k_down, shapes['houlsby_down'], int(np.prod(site.size(site.feature_out))), dtype)
      up = jnp.zeros(shapes['houlsby_up'], dtype)
    return {
      'houlsby_down': down,
      'houlsby_down_bias': jnp.zeros(shapes['houlsby_down_bias'], dtype),
      'houlsby_up': up,
      'houlsby_up_bias': jnp.zeros(shapes['houlsby_up_bias'], dtype),
    }

  def apply(self, site, leaves, x, y, call, rng=None):
    if not isinstance(y, jax.Array):
      raise AdapterError(f'Houlsby at {site.name} expected the module to return an array, got {type(y).__name__}.')
    dt = y.dtype
    feat = site.feature_out
    ys = call.y
    rest = ''.join(c for c in ys if c not in feat)
    h = jnp.einsum(f'{ys},{feat}{LATENT}->{rest}{LATENT}', y, leaves['houlsby_down'].astype(dt))
    h = ACTIVATIONS[self.activation](h + leaves['houlsby_down_bias'].astype(dt))
    u = jnp.einsum(f'{rest}{LATENT},{LATENT}{feat}->{ys}', h, leaves['houlsby_up'].astype(dt))
    return y + u + broadcast_to(leaves['houlsby_up_bias'].astype(dt), feat, ys)
