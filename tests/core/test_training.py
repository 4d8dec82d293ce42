"""Issue 2, item 3: under jit, only trainable leaves move, and frozen leaves hold no optimizer state."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import flax_adapters as fa
from tests.core import testnet as net
from tests.core.helpers import config, n_params

MODES = ['linear', 'lora', 'locon', 'ia3', 'houlsby', ('lora', 'locon', 'ia3', 'houlsby'), 'full']
STEPS = 4


def _loss(model, params, x, target):
  out = model.apply({'params': params}, x)
  return sum(jnp.mean((out[k] - target[k]) ** 2) for k in out)


def _targets(model, params, x):
  out = model.apply({'params': params}, x)
  return jax.tree.map(lambda o: jax.random.normal(jax.random.key(9), o.shape), out)


@pytest.mark.parametrize('mode', MODES, ids=lambda m: '+'.join(m) if isinstance(m, tuple) else m)
def test_jitted_steps_move_only_trainable_leaves(mode):
  model, params, x = net.make()
  adapted, p0 = fa.prepare_for_transfer(model, params, config(mode), x)
  mask = fa.trainable_mask(adapted, p0)
  opt = fa.transfer_optimizer(optax.adam(1e-2), mask)
  state = opt.init(p0)
  target = _targets(model, params, x)

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(functools.partial(_loss, adapted))(p, x, target)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss

  p = p0
  losses = []
  for _ in range(STEPS):
    p, state, loss = step(p, state)
    losses.append(float(loss))
  assert losses[-1] < losses[0]

  flat0, flat, fmask = (traverse_util.flatten_dict(t) for t in (p0, p, mask))
  for k in flat0:
    before, after = np.asarray(flat0[k]), np.asarray(flat[k])
    if fmask[k]:
      assert not np.array_equal(before, after), f'trainable {"/".join(k)} did not move'
    else:
      assert np.array_equal(before, after), f'frozen {"/".join(k)} changed'

  # Adam keeps mu and nu for trainable leaves only; frozen leaves hold no state arrays at all.
  n_trainable = sum(int(np.prod(flat0[k].shape)) for k in flat0 if fmask[k])
  state_arrays = [l for l in jax.tree.leaves(state) if np.ndim(l) > 0]
  assert sum(l.size for l in state_arrays) == 2 * n_trainable


def test_partition_combine_grads_only_for_trainable_part():
  model, params, x = net.make()
  adapted, p0 = fa.prepare_for_transfer(model, params, config('lora'), x)
  mask = fa.trainable_mask(adapted, p0)
  trainable, frozen = fa.partition(p0, mask)
  assert n_params(trainable) + n_params(frozen) == n_params(p0)
  target = _targets(model, params, x)
  tx = optax.sgd(0.1)
  state = tx.init(trainable)

  @jax.jit
  def step(t, s):
    g = jax.grad(lambda t: _loss(adapted, fa.combine(t, frozen), x, target))(t)
    updates, s = tx.update(g, s, t)
    return optax.apply_updates(t, updates), s, g

  t, state, g = step(trainable, state)
  t, state, g = step(t, state)
  # The gradient tree has holes exactly where the frozen leaves are.
  assert jax.tree.structure(g) == jax.tree.structure(trainable)
  assert n_params(g) == n_params(trainable)
  merged = fa.combine(t, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(p0)
  assert merged['blocks_0']['mha']['q_proj']['kernel'] is frozen['blocks_0']['mha']['q_proj']['kernel']
  assert not np.array_equal(merged['blocks_0']['mha']['q_proj']['lora_b'], p0['blocks_0']['mha']['q_proj']['lora_b'])


def test_partition_rejects_a_mask_of_another_tree():
  with pytest.raises(ValueError, match='`mask` must have exactly the structure of `params`'):
    fa.partition({'a': 1.0, 'b': 2.0}, {'a': True})


def test_partition_combine_and_halves_passed_as_params_are_named():
  """A non-bool mask entry ('no') silently trained; combine returned trees with holes; a trainable half
  passed where the whole tree belongs gave AttributeErrors or counted each None as a parameter."""
  params = {'a': jnp.ones(2), 'b': {'c': jnp.zeros(3)}}
  with pytest.raises(TypeError, match=r"`mask` must hold a bool per leaf \(True: trains\), found \[\"b/c='no'\"\]"):
    fa.partition(params, {'a': True, 'b': {'c': 'no'}})
  t, f = fa.partition(params, {'a': True, 'b': {'c': False}})
  with pytest.raises(TypeError, match=r'`params` has None at b/c: it is a half from partition already'):
    fa.partition(t, {'a': True, 'b': {'c': False}})
  with pytest.raises(ValueError, match=r'`combine` left holes at b/c: no tree has a leaf there'):
    fa.combine(t, t)
  with pytest.raises(ValueError, match=r'`combine` takes trees of one structure'):
    fa.combine(t, {'a': None})
  with pytest.raises(TypeError, match=r'`mask` must hold a bool per leaf'):
    fa.transfer_optimizer(optax.adam(1e-3), {'a': 1, 'b': {'c': 0}})
  jax.tree.map(np.testing.assert_array_equal, fa.combine(t, f), params)
  model, p = fa.prepare_params(
    {'fc': {'kernel': jnp.ones((4, 3))}}, fa.TransferConfig(mode='lora', lora_rank=2, lora_targets=['fc'])
  )
  half, _ = fa.partition(p, fa.trainable_mask(model, p))
  for call in (fa.param_summary, fa.materialize, fa.trainable_mask):
    with pytest.raises(TypeError, match=r'`params` has None at fc/kernel: one half of partition\(\)'):
      call(model, half) if call is not fa.materialize else call(half, model)
