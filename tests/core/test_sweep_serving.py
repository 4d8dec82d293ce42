"""Serving and training helpers on inputs the other tests do not use: callable optax masks, spec trees
of the base params, overlapping partition halves, optimizer state of another tree, merged models
saved or loaded as adapter checkpoints."""

import warnings

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

import flax_adapters as fa


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8, name='fc1')(x)
    h = nn.Dense(8, name='fc2')(nn.gelu(h))
    return nn.Dense(2, name='head')(h)


X = jnp.ones((2, 4))


@pytest.fixture(scope='module')
def adapted():
  params = Net().init(jax.random.key(0), X)['params']
  cfg = fa.TransferConfig(
    mode=['lora', 'houlsby'],
    lora_rank=2,
    lora_targets=['fc1'],
    houlsby_placement='linear',
    houlsby_latent_dim=2,
    houlsby_targets=['fc2'],
    modules_to_save=['head'],
  )
  model, p = fa.prepare_for_transfer(Net(), params, cfg, X)
  return model, p


def test_transfer_optimizer_takes_a_mask_function_as_optax_does():
  p = {'w': jnp.ones(3), 'frozen': jnp.ones(2)}
  tx = fa.transfer_optimizer(optax.sgd(1.0), lambda params: {'w': True, 'frozen': False})
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)
  assert float(jnp.abs(updates['frozen']).sum()) == 0.0  # was -1: every leaf trained
  assert float(updates['w'].sum()) == -3.0
  bad = fa.transfer_optimizer(optax.sgd(1.0), lambda params: {'w': 1, 'frozen': 0})
  with pytest.raises(TypeError, match='bool per leaf'):
    bad.init(p)


def test_base_spec_tree_is_refused_not_replicated(adapted):
  model, p = adapted
  mesh = jax.make_mesh((1,), ('model',))
  base_specs = {k: {n: P() for n in v if n in ('kernel', 'bias')} for k, v in p.items()}
  for call in (
    lambda: fa.optimizer_shardings(optax.adam(1e-3), p, mesh, base_specs),
    lambda: fa.shard_params(p, mesh, base_specs),
  ):
    with pytest.raises(ValueError, match=r'no spec for fc1/lora_a.*partition_specs'):
      call()
  specs = fa.partition_specs(model, p, base_specs)
  fa.optimizer_shardings(optax.adam(1e-3), p, mesh, specs)
  trainable, _ = fa.partition(p, fa.trainable_mask(model, p))
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # jnp.shape(None) on a half's holes: deprecated, an error in future JAX
    fa.optimizer_shardings(optax.adam(1e-3), trainable, mesh, specs)  # a half needs no spec for its holes


def test_partition_specs_names_a_half(adapted):
  model, p = adapted
  trainable, _ = fa.partition(p, fa.trainable_mask(model, p))
  with pytest.raises(TypeError, match='one half of partition'):
    fa.partition_specs(model, trainable, lambda k, v: P())


def test_train_step_refuses_overlapping_halves_and_foreign_state(adapted):
  model, p = adapted
  trainable, frozen = fa.partition(p, fa.trainable_mask(model, p))
  tx = optax.adam(1e-2)
  step = fa.make_train_step(lambda q, x: jnp.sum(model.apply({'params': q}, x) ** 2), tx, donate=False)
  with pytest.raises(ValueError, match=r"both hold a leaf at .*\['fc1'\]\['kernel'\]"):
    step(p, tx.init(p), frozen, X)  # the whole tree as `trainable`: frozen kernels would train
  with pytest.raises(ValueError, match=r'tx.init\(trainable\)'):
    step(trainable, tx.init(p), frozen, X)
  t, _, loss = step(trainable, tx.init(trainable), frozen, X)
  assert jnp.isfinite(loss) and t['fc1']['kernel'] is None


def test_merged_model_is_no_adapter_checkpoint(adapted, tmp_path):
  model, p = adapted
  p = jax.tree.map(lambda v: v + 0.1, p)
  served, merged = fa.merge_adapters(model, p)
  assert served.folded == ('fc1: lora',) and [e.site.path for e in served.plan] == [('fc2',)]
  assert jnp.allclose(served.apply({'params': merged}, X), model.apply({'params': p}, X), atol=1e-5)
  with pytest.raises(ValueError, match=r'merge_adapters: it folded 1 adapters \(fc1: lora\)'):
    fa.save_adapters(tmp_path / 'merged', served, merged)
  path = fa.save_adapters(tmp_path / 'full', model, p)
  with pytest.raises(ValueError, match='merge after loading'):
    fa.load_adapters(path, served, merged)
  again, merged_again = fa.merge_adapters(served, merged)  # merging twice changes nothing
  assert again.folded == served.folded
  assert jnp.array_equal(again.apply({'params': merged_again}, X), served.apply({'params': merged}, X))
