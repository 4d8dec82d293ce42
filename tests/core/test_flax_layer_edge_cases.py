"""Flax's own layers in the shapes users build them: subclasses that call `super().__call__`, masked
convs, scanned blocks after a partial merge, parameter-free targets, NNX trees with integer keys and
batch statistics, and `kinds` hints on bare params trees. Float64 for identities."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import flax_adapters as fa

F64 = jnp.float64


def _random_like(tree, key, scale=0.3):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, v.shape, v.dtype) for k, v in zip(keys, leaves)])


class ScaledDense(nn.Dense):
  """A user's Dense subclass: linen intercepts both its `__call__` and Dense's, on the same module."""

  def __call__(self, x):
    return 2.0 * super().__call__(x)


class UsesScaledDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return ScaledDense(4, name='fc', param_dtype=F64)(x)


class UsesSelfAttention(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.SelfAttention(num_heads=2, name='sa', param_dtype=F64, deterministic=True)(x)


def test_adapter_applies_once_on_a_subclass_calling_super():
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (2, 5, 6), F64)
    params = UsesScaledDense().init(jax.random.key(0), x)['params']
    model, p = fa.adapt(UsesScaledDense(), params, [fa.Rule(target='fc', methods=fa.LoRA(rank=2, alpha=2))], x)
    p['fc']['lora_b'] = jax.random.normal(jax.random.key(1), p['fc']['lora_b'].shape, F64)
    # The delta belongs to the kernel (Dense's own call), so the subclass doubles it with the rest.
    want = 2.0 * (x @ (p['fc']['kernel'] + p['fc']['lora_a'] @ p['fc']['lora_b']) + p['fc']['bias'])
    np.testing.assert_allclose(model.apply({'params': p}, x), want, rtol=1e-12, atol=1e-12)
    served, merged = fa.merge_adapters(model, p)
    np.testing.assert_allclose(served.apply({'params': merged}, x), want, rtol=1e-12, atol=1e-12)


def test_houlsby_on_self_attention_wraps_its_output_once():
  # nn.SelfAttention.__call__ calls MultiHeadDotProductAttention.__call__ through super().
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (2, 5, 6), F64)
    params = UsesSelfAttention().init(jax.random.key(0), x)['params']
    model, p = fa.adapt(UsesSelfAttention(), params, [fa.Rule(target='sa', methods=fa.Houlsby(latent_dim=3))], x)
    leaves = {k: v for k, v in p['sa'].items() if k.startswith('houlsby')}
    p['sa'].update(_random_like(leaves, jax.random.key(2)))
    h = p['sa']
    y = UsesSelfAttention().apply({'params': params}, x)
    want = y + jax.nn.relu(y @ h['houlsby_down'] + h['houlsby_down_bias']) @ h['houlsby_up'] + h['houlsby_up_bias']
    np.testing.assert_allclose(model.apply({'params': p}, x), want, rtol=1e-12, atol=1e-12)


def test_locon_refuses_a_masked_conv():
  mask = jnp.ones((3, 3, 4)).at[2].set(0.0)  # a causal conv: no tap one step ahead

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(4, (3,), mask=mask, name='c')(x)

  x = jnp.ones((1, 8, 3))
  params = Net().init(jax.random.key(0), x)['params']
  with pytest.raises(fa.AdapterError, match=r'Locon cannot adapt .*multiplies its kernel by a `mask`.*Use IA3'):
    fa.adapt(Net(), params, [fa.Rule(target='c', methods=fa.Locon(rank=2))], x)
  fa.adapt(Net(), params, [fa.Rule(target='c', methods=fa.IA3())], x)  # output scales keep the mask


def test_partial_merge_keeps_a_scanned_stack():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return x + nn.Dense(6, name='fc')(x), None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(Block, variable_axes={'params': 0}, split_rngs={'params': True}, length=3)
      return scan(name='layers')(x, None)[0]

  x = jax.random.normal(jax.random.key(0), (2, 6))
  params = Net().init(jax.random.key(0), x)['params']
  methods = [fa.LoRA(rank=2), fa.Houlsby(latent_dim=2, placement='linear')]
  model, p = fa.adapt(Net(), params, [fa.Rule(target='fc', methods=methods)], x)
  fc = p['layers']['fc']
  fc.update(_random_like({k: v for k, v in fc.items() if k not in ('kernel', 'bias')}, jax.random.key(3), 0.1))
  served, merged = fa.merge_adapters(model, p)  # LoRA folds, the Houlsby adapter stays
  assert served.plan[0].stack == model.plan[0].stack == (3,)
  np.testing.assert_allclose(served.apply({'params': merged}, x), model.apply({'params': p}, x), rtol=1e-5, atol=1e-5)


def test_houlsby_on_a_module_without_params_names_it():
  class Act(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.gelu(x)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4, name='fc2')(Act(name='act')(nn.Dense(8, name='fc1')(x)))

  x = jnp.ones((2, 4))
  params = Net().init(jax.random.key(0), x)['params']
  with pytest.raises(fa.AdapterError, match=r'act .*owns no parameters in `params`.*Target a module that owns'):
    fa.adapt(Net(), params, [fa.Rule(target='act', methods=fa.Houlsby(latent_dim=2))], x)


class LinearBatchNorm(nnx.Module):
  def __init__(self):
    self.fc = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=nnx.Rngs(0))

  def __call__(self, x):
    return self.bn(self.fc(x))


def test_nnx_batch_norm_statistics_never_train():
  params = nnx.to_pure_dict(nnx.split(LinearBatchNorm())[1])  # the whole state: mean/var included
  model, p = fa.prepare_params(params, fa.TransferConfig(mode='lora', lora_rank=2, lora_targets=['fc']))
  mask = fa.trainable_mask(model, p)
  assert mask['bn'] == {'scale': True, 'bias': True, 'mean': False, 'var': False}
  tx = fa.transfer_optimizer(optax.adamw(0.1, weight_decay=0.5), mask)
  grads = jax.tree.map(jnp.ones_like, p)
  updates, _ = tx.update(grads, tx.init(p), p)
  stepped = optax.apply_updates(p, updates)
  np.testing.assert_array_equal(stepped['bn']['var'], p['bn']['var'])
  assert not np.allclose(stepped['bn']['scale'], p['bn']['scale'])


def test_nnx_integer_keys_save_load_and_errors(tmp_path):
  seq = nnx.Sequential(nnx.Linear(4, 6, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(6, 3, rngs=nnx.Rngs(1)))
  params = nnx.to_pure_dict(nnx.split(seq)[1])
  assert 0 in params['layers']  # nnx lists keep integer keys
  config = fa.TransferConfig(mode='lora', lora_rank=2, lora_targets=['layers.0', 'layers.2'])
  model, p = fa.prepare_params(params, config)
  p['layers'][0]['lora_b'] = jnp.full_like(p['layers'][0]['lora_b'], 0.5)
  fa.save_adapters(tmp_path / 'ckpt', model, p)
  _, fresh = fa.prepare_params(params, config)
  loaded = fa.load_adapters(tmp_path / 'ckpt', model, fresh)
  assert jax.tree.structure(loaded) == jax.tree.structure(p)
  np.testing.assert_array_equal(loaded['layers'][0]['lora_b'], p['layers'][0]['lora_b'])
  with pytest.raises(ValueError, match=r'already holds adapter leaves \(layers/0/lora_a'):
    fa.prepare_params(p, config)
  with pytest.raises(ValueError, match=r'`mask` must have exactly the structure of `params`'):
    fa.partition(p, {'layers': {0: True}})


@pytest.mark.parametrize(
  'kind, message',
  [
    ('einsum', r"a bare params tree has no einsum equation; describe its kernel as \('dense_general', n_input_axes\)"),
    ('foo', r"`kinds` gives 'ein' the kind 'foo'; expected one of \["),
  ],
)
def test_kinds_hint_on_a_bare_tree_is_checked(kind, message):
  ein = nnx.Einsum('btd,dhk->bthk', (6, 2, 3), (2, 3), rngs=nnx.Rngs(0))
  params = {'ein': nnx.to_pure_dict(nnx.split(ein)[1])}
  with pytest.raises(ValueError, match=message):
    fa.adapt(None, params, [fa.Rule(target='ein', methods=fa.LoRA(rank=2))], kinds={'ein': kind})
  # The einsum's kernel (d -> h, k) is dense-like: one input axis.
  model, p = fa.adapt(
    None, params, [fa.Rule(target='ein', methods=fa.LoRA(rank=2))], kinds={'ein': ('dense_general', 1)}
  )
  assert p['ein']['lora_a'].shape == (6, 2) and p['ein']['lora_b'].shape == (2, 2, 3)


def test_lora_on_a_transposed_conv_does_not_send_the_user_to_locon():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.ConvTranspose(4, (3,), name='up')(x)

  x = jnp.ones((1, 8, 3))
  params = Net().init(jax.random.key(0), x)['params']
  with pytest.raises(
    fa.AdapterError, match=r"neither LoRA nor Locon adapts; .*train it whole \(modules_to_save=\['up'\]\)"
  ):
    fa.adapt(Net(), params, [fa.Rule(target='up', methods=fa.LoRA(rank=2))], x)
  with pytest.raises(fa.AdapterError, match=r'Locon adapts convolutions'):
    fa.adapt(Net(), params, [fa.Rule(target='up', methods=fa.Locon(rank=2))], x)


class NormWrapped(nn.Module):
  wrapper: str

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(4, name='plain')(x)
    if self.wrapper == 'map_variables':
      double = nn.map_variables(nn.Dense, 'params', trans_in_fn=lambda v: jax.tree.map(lambda t: 2 * t, v), init=True)
      return double(3, name='fc')(x)
    inner = nn.Dense(3, name='fc')
    if self.wrapper == 'WeightNorm':
      return nn.WeightNorm(inner)(x)
    return nn.SpectralNorm(inner)(x, update_stats=False)


@pytest.mark.parametrize('wrapper', ['WeightNorm', 'SpectralNorm', 'map_variables'])
def test_layers_under_weight_norm_wrappers_are_refused_not_merged_wrong(wrapper):
  """nn.WeightNorm / nn.SpectralNorm / a params-mapping nn.map_variables rewrite the wrapped kernel before
  each use, so a folded delta was normalised away (merge silently differed from the adapted model by up to
  1.4; IA3 merged back to the base; doubling broke IA3's init identity) and SpectralNorm crashed on LoRA
  leaves: adapters there are refused, naming the wrapper."""
  model, x = NormWrapped(wrapper), jnp.ones((2, 5))
  params = model.init(jax.random.key(0), x)['params']
  for method in (fa.LoRA(rank=2), fa.IA3()):
    with pytest.raises(ValueError, match=rf'fc \(Dense, dense\) runs inside nn.{wrapper}, which rewrites its weights'):
      fa.adapt(model, params, [fa.Rule(target='fc', methods=method)], x)
  adapted, p = fa.adapt(model, params, [fa.Rule(target='plain', methods=fa.LoRA(rank=2))], x, modules_to_save=['fc'])
  mask = fa.trainable_mask(adapted, p)
  assert mask['fc'] == {'kernel': True, 'bias': True} and mask['plain']['lora_a'] and not mask['plain']['kernel']


class _Step(nn.Module):
  @nn.compact
  def __call__(self, c, _):
    return jnp.tanh(nn.Dense(4, name='fc')(c)), None


class StackedOnAxis(nn.Module):
  axis: int
  lift: str

  @nn.compact
  def __call__(self, x):
    if self.lift == 'scan':
      stack = nn.scan(_Step, variable_axes={'params': self.axis}, split_rngs={'params': True}, length=3)
      return stack(name='stack')(x, None)[0]
    stack = nn.vmap(_Step, variable_axes={'params': self.axis}, split_rngs={'params': True}, in_axes=(0, None))
    return stack(name='stack')(jnp.broadcast_to(x, (3,) + x.shape), None)[0]


@pytest.mark.parametrize('lift', ['scan', 'vmap'])
def test_layers_stacked_off_the_first_axis_are_refused(lift):
  """variable_axes={'params': 1} slices the kernel on axis 1 while adapter leaves stack on axis 0: IA3
  merged silently wrong (0.2 off) and LoRA failed inside dot_general. Axis 0 adapts as before."""
  x = jnp.ones((2, 4))
  for method in (fa.IA3(), fa.LoRA(rank=2)):
    model = StackedOnAxis(1, lift)
    params = model.init(jax.random.key(0), x)['params']
    with pytest.raises(
      ValueError,
      match=r"stack.fc \(Dense, dense\) runs inside a lifted nn.scan / nn.vmap .*variable_axes=\{'params': 0\}",
    ):
      fa.adapt(model, params, [fa.Rule(target='fc', methods=method)], x)
    model = StackedOnAxis(0, lift)
    params = model.init(jax.random.key(0), x)['params']
    adapted, p = fa.adapt(model, params, [fa.Rule(target='fc', methods=method)], x)
    assert adapted.plan[0].stack == (3,)
    np.testing.assert_allclose(adapted.apply({'params': p}, x), model.apply({'params': params}, x), atol=1e-6)


def test_houlsby_on_dense_general_with_batch_dims_names_them():
  """The refusal said the layer 'returns None' (it returns a feature-last array)."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral(3, axis=-1, batch_dims=(0,), name='dgb')(x)

  x = jnp.ones((2, 5, 4))
  params = Net().init(jax.random.key(0), x)['params']
  with pytest.raises(ValueError, match=r'Houlsby cannot wrap dgb .*DenseGeneral with batch_dims=\(0,\)'):
    fa.adapt(Net(), params, {'dgb': fa.Houlsby(latent_dim=2, placement='linear')}, x)


def test_with_partitioning_models_adapt_and_their_specs_reach_the_adapters():
  """nn.with_partitioning boxes params at init: tracing read the boxes (AttributeError on `.shape`), and
  boxed params passed in were blamed on their shapes."""
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      k = nn.with_partitioning(nn.initializers.lecun_normal(), (None, 'model'))
      return nn.Dense(4, name='out')(nn.Dense(8, name='q_proj', kernel_init=k)(x))

  x = jnp.ones((2, 4))
  variables = Net().init(jax.random.key(0), x)
  config = fa.TransferConfig(mode='lora', lora_rank=2, lora_targets=['q_proj'])
  model, p = fa.prepare_for_transfer(Net(), nn.unbox(variables)['params'], config, x)
  specs = fa.partition_specs(model, p, nn.get_partition_spec(variables)['params'])
  assert specs['q_proj']['lora_b'] == jax.sharding.PartitionSpec(None, 'model') and specs['q_proj'][
    'lora_a'
  ] == jax.sharding.PartitionSpec(None, None)
  with pytest.raises(TypeError, match=r'holds metadata boxes \(nn.Partitioned .*\) at q_proj/kernel; pass the plain'):
    fa.prepare_for_transfer(Net(), variables['params'], config, x)
