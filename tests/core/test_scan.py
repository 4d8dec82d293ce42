"""Layers stacked by nn.scan: adapter leaves carry the stacked axis and are sliced like the kernels."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import PartitionSpec as P

import flax_adapters as fa
from tests.core.helpers import max_diff, perturb

LAYERS, D = 3, 8


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(D, name='fc2')(nn.gelu(nn.Dense(2 * D, name='fc1')(x)))


class Layer(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    x = x + nn.Dense(D, name='q_proj')(nn.LayerNorm(name='norm')(x))
    return x + MLP(name='mlp')(x), None


class Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    layers = nn.scan(Layer, variable_axes={'params': 0}, split_rngs={'params': True}, length=LAYERS)
    x, _ = layers(name='layers')(x, None)
    return nn.Dense(2, name='head')(x)


def setup(mode, **kw):
  x = jax.random.normal(jax.random.key(0), (4, 5, D))
  params = Stack().init(jax.random.key(1), x)['params']
  cfg = fa.TransferConfig(
    mode=mode,
    lora_rank=2,
    lora_targets=['q_proj', 'fc1'],
    ia3_targets=['fc2'],
    houlsby_targets=['mlp'],
    modules_to_save=['head'],
    **kw,
  )
  adapted, p = fa.prepare_for_transfer(Stack(), params, cfg, x)
  return x, params, adapted, p


def test_stacked_adapter_leaves_start_as_identity_and_differ_per_layer():
  x, params, adapted, p = setup(['lora', 'ia3', 'houlsby'])
  q = p['layers']['q_proj']
  assert (
    q['kernel'].shape == (LAYERS, D, D) and q['lora_a'].shape == (LAYERS, D, 2) and q['lora_b'].shape == (LAYERS, 2, D)
  )
  assert p['layers']['mlp']['houlsby_down'].shape == (LAYERS, D, 8)
  assert not np.allclose(q['lora_a'][0], q['lora_a'][1])  # each layer draws its own init
  assert {e.stack for e in adapted.plan} == {(LAYERS,)}
  chex.assert_trees_all_close(adapted.apply({'params': p}, x), Stack().apply({'params': params}, x), atol=1e-6, rtol=0)


def test_stacked_factored_forward_matches_merge_and_materialize():
  x, params, adapted, p = setup(['lora', 'ia3'])
  p = perturb(p, jax.random.key(2))
  out = jax.jit(adapted.apply)({'params': p}, x)
  assert max_diff(out, Stack().apply({'params': params}, x)) > 1e-2
  chex.assert_trees_all_close(out, Stack().apply({'params': fa.materialize(p, adapted)}, x), atol=1e-5, rtol=0)
  served, merged = fa.merge_adapters(adapted, p)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  chex.assert_trees_all_close(served.apply({'params': merged}, x), out, atol=1e-5, rtol=0)


def test_stacked_training_and_partition_specs():
  x, params, adapted, p = setup(['lora', 'houlsby'])
  mask = fa.trainable_mask(adapted, p)
  tx = fa.transfer_optimizer(optax.adam(1e-2), mask)
  state = tx.init(p)

  @jax.jit
  def step(p, s):
    g = jax.grad(lambda p: jnp.mean(adapted.apply({'params': p}, x) ** 2))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p2, state = step(*step(p, state))
  assert not np.array_equal(p2['layers']['q_proj']['lora_a'], p['layers']['q_proj']['lora_a'])
  np.testing.assert_array_equal(p2['layers']['q_proj']['kernel'], p['layers']['q_proj']['kernel'])

  def spec(path, leaf):
    return P(None, None, 'model') if path[-2:] == ('q_proj', 'kernel') else P()

  specs = fa.partition_specs(adapted, p, spec)
  assert specs['layers']['q_proj']['lora_a'] == P(None, None, None)
  assert specs['layers']['q_proj']['lora_b'] == P(None, None, 'model')
  assert specs['layers']['mlp']['houlsby_down'] == P(None, None, None)
