"""Linen models built the ways users build them: nn.share_scope wrappers, nn.Einsum with its equation
passed positionally, and one Einsum kernel used through two equations. Float64 for identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import flax_adapters as fa

F64 = jnp.float64


class SharedScopeDense(nn.Module):
  """A wrapper whose Dense shares its scope: both are called at one path."""

  def setup(self):
    self.d = nn.Dense(6, param_dtype=F64)
    nn.share_scope(self, self.d)

  def __call__(self, x):
    return 2.0 * self.d(x)


class UsesSharedScope(nn.Module):
  @nn.compact
  def __call__(self, x):
    return SharedScopeDense(name='s')(x)


def test_lora_under_share_scope_applies_once():
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(1), (2, 6), F64)
    params = UsesSharedScope().init(jax.random.key(0), x)['params']
    model, p = fa.adapt(UsesSharedScope(), params, [fa.Rule(target='s', methods=fa.LoRA(rank=2, alpha=2))], x)
    p['s']['lora_b'] = jax.random.normal(jax.random.key(2), p['s']['lora_b'].shape, F64)
    s = p['s']
    want = 2.0 * (x @ (s['kernel'] + s['lora_a'] @ s['lora_b']) + s['bias'])
    np.testing.assert_allclose(model.apply({'params': p}, x), want, rtol=1e-12, atol=1e-12)
    served, merged = fa.merge_adapters(model, p)
    np.testing.assert_allclose(served.apply({'params': merged}, x), want, rtol=1e-12, atol=1e-12)


class PositionalEinsum(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Einsum((6, 4), name='e', param_dtype=F64)(x, 'btd,dk->btk')


def test_einsum_with_a_positional_equation_adapts_and_merges():
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(1), (2, 5, 6), F64)
    params = PositionalEinsum().init(jax.random.key(0), x)['params']
    rules = [fa.Rule(target='e', methods=[fa.LoRA(rank=2, alpha=2), fa.IA3(), fa.IA3FF()])]
    model, p = fa.adapt(PositionalEinsum(), params, rules, x)
    base = PositionalEinsum().apply({'params': params}, x)
    np.testing.assert_allclose(model.apply({'params': p}, x), base, rtol=1e-12, atol=1e-12)
    keys = jax.random.split(jax.random.key(3), 4)
    for k, name in zip(keys, ['lora_b', 'ia3_scale', 'ia3_ff_scale']):
      if name in p['e']:
        p['e'][name] = p['e'][name] + 0.3 * jax.random.normal(k, p['e'][name].shape, F64)
    factored = model.apply({'params': p}, x)
    assert float(jnp.max(jnp.abs(factored - base))) > 1e-3
    served, merged = fa.merge_adapters(model, p)
    np.testing.assert_allclose(served.apply({'params': merged}, x), factored, rtol=1e-12, atol=1e-12)


class EinsumUsedTwoWays(nn.Module):
  """One kernel (6, 4) projects down, then back up through its transpose (a tied projection)."""

  @nn.compact
  def __call__(self, x):
    e = nn.Einsum((6, 4), name='e', use_bias=False, param_dtype=F64)
    return e(e(x, einsum_str='btd,dk->btk'), einsum_str='btk,dk->btd')


@pytest.mark.parametrize('method', [fa.LoRA(rank=2), fa.IA3(), fa.IA3FF()], ids=lambda m: m.name)
def test_an_einsum_kernel_used_two_ways_is_refused(method):
  x = jnp.ones((2, 5, 6))
  params = EinsumUsedTwoWays().init(jax.random.key(0), x)['params']
  with pytest.raises(
    fa.AdapterError, match=r"^e \(Einsum, einsum\) is called more than once .*modules_to_save=\['e'\]"
  ):
    fa.adapt(EinsumUsedTwoWays(), params, [fa.Rule(target='e', methods=method)], x)
