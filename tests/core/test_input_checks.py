"""Inputs that used to pass silently or fail with the wrong message: NumPy scalars, bytes, `kinds` hints
that select nothing, empty rules, and the adapter dtype of params given in another precision than the
model declares."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import flax_adapters as fa


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name='out')(nn.Dense(8, name='q_proj')(x))


X = jnp.ones((1, 4))


@pytest.fixture(scope='module')
def params():
  return Net().init(jax.random.key(0), X)['params']


def test_numpy_scalars_are_numbers():
  # A rate computed with NumPy (np.float32) is a number like any other, stored as a Python float
  # (checkpoint configs are JSON).
  cfg = fa.TransferConfig(mode='lora', lora_targets='q_proj', lora_dropout=np.float32(0.25))
  assert type(cfg.lora_dropout) is float and cfg.lora_dropout == 0.25
  lora = fa.LoRA(rank=2, dropout=np.float64(0.5))
  assert type(lora.dropout) is float and lora.dropout == 0.5
  with pytest.raises(ValueError, match=r'`lora_dropout` must be a number in \[0, 1\), found np.float32\(1.0\)'):
    fa.TransferConfig(mode='lora', lora_targets='q_proj', lora_dropout=np.float32(1.0))
  with pytest.raises(ValueError, match=r'`dropout` must be a number in \[0, 1\), found True'):
    fa.LoRA(rank=2, dropout=True)


def test_bytes_are_not_a_list_of_modes():
  # bytes are a Sequence: they were read as the modes 108, 111, ... ("`mode` 108 is unknown").
  with pytest.raises(TypeError, match=r"`mode` must be a string or a list of strings, found bytes b'lora'; decode"):
    fa.TransferConfig(mode=b'lora')
  with pytest.raises(TypeError, match=r'`lora_targets` must be .* found bytes'):
    fa.TransferConfig(mode='lora', lora_targets=b'q_proj')


def test_kinds_target_matching_nothing_is_an_error(params):
  cfg = fa.TransferConfig(mode='lora', lora_targets='q_proj', lora_rank=2)
  # A linen model: the typo'd hint was dropped and the module kept its detected kind.
  with pytest.raises(ValueError, match=r"`kinds` target 'q_porj' matches no module. Nearest module paths: \['q_proj'"):
    fa.prepare_for_transfer(Net(), params, cfg, X, kinds={'q_porj': 'dense'})
  # A bare tree: the same, the nearest paths named.
  with pytest.raises(ValueError, match=r"`kinds` target 're:.*conv' matches no module"):
    fa.prepare_params(params, cfg, kinds={'re:.*conv': 'conv'})
  with pytest.raises(TypeError, match=r'`kinds` entries must be non-empty strings .* found 3'):
    fa.prepare_params(params, cfg, kinds={3: 'dense'})
  with pytest.raises(TypeError, match=r'`kinds` must be a mapping'):
    fa.prepare_params(params, cfg, kinds=[('q_proj', 'dense')])
  # A hint that matches still applies.
  _, p = fa.prepare_for_transfer(Net(), params, cfg, X, kinds={'q_proj': 'dense'})
  assert p['q_proj']['lora_a'].shape == (4, 2)


@pytest.mark.parametrize('model', [None, Net()], ids=['bare', 'linen'])
def test_adapt_with_nothing_to_train_is_an_error(params, model):
  args = () if model is None else (X,)
  with pytest.raises(ValueError, match=r'`rules` is empty and neither `modules_to_save` nor `unfreeze_norm`'):
    fa.adapt(model, params, {}, *args)
  # Training a module whole needs no rule.
  adapted, p = fa.adapt(model, params, {}, *args, modules_to_save=['out'])
  mask = fa.trainable_mask(adapted, p)
  assert mask['out']['kernel'] and not mask['q_proj']['kernel']


@pytest.mark.parametrize('model', [None, Net()], ids=['bare', 'linen'])
def test_adapters_follow_the_given_kernels_dtype(params, model):
  # The model declares float32 params; given float64 ones, adapters are float64 (the kernel's dtype
  # promoted to at least float32), and the adapted forward is the base one at init (B = 0) in float64.
  cfg = fa.TransferConfig(mode=['lora', 'ia3'], lora_targets='q_proj', ia3_targets='out', lora_rank=2)
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    if model is None:
      _, p = fa.prepare_params(p64, cfg)
    else:
      adapted, p = fa.prepare_for_transfer(model, p64, cfg, X.astype(jnp.float64))
      x = jax.random.normal(jax.random.key(1), (3, 4), jnp.float64)
      np.testing.assert_allclose(adapted.apply({'params': p}, x), Net().apply({'params': p64}, x), rtol=0, atol=1e-12)
    assert {k: str(v.dtype) for k, v in p['q_proj'].items()} == dict.fromkeys(p['q_proj'], 'float64')
    assert p['out']['ia3_scale'].dtype == jnp.float64
  # bfloat16 params get float32 adapters, as before.
  _, p = fa.prepare_params(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), cfg)
  assert p['q_proj']['lora_a'].dtype == jnp.float32


class WithNorm(nn.Module):
  """Another architecture: Net with a LayerNorm before `out`."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name='out')(nn.LayerNorm(name='ln')(nn.Dense(8, name='q_proj')(x)))


def _saved(tmp_path, params, **cfg):
  cfg = fa.TransferConfig(mode='lora', lora_targets='q_proj', lora_rank=2, **cfg)
  model, p = fa.prepare_for_transfer(Net(), params, cfg, X)
  p['q_proj']['lora_b'] = jnp.full_like(p['q_proj']['lora_b'], 0.1234567)
  return fa.save_adapters(tmp_path / 'ck', model, p), p


def test_load_refuses_to_round_trained_leaves(tmp_path, params):
  # float32 adapters into a model prepared with adapter_dtype='bfloat16' were rounded silently.
  d, _ = _saved(tmp_path, params)
  narrow = fa.TransferConfig(mode='lora', lora_targets='q_proj', lora_rank=2, adapter_dtype='bfloat16')
  model, p = fa.prepare_for_transfer(Net(), params, narrow, X)
  with pytest.raises(
    ValueError, match=r'would round 2 trained leaves .*q_proj/lora_a saved float32, this model bfloat16'
  ):
    fa.load_adapters(d, model, p)
  # Widening is exact: bfloat16 adapters load into a float32 model unchanged.
  model, p = fa.prepare_for_transfer(Net(), params, narrow, X)
  p['q_proj']['lora_b'] = jnp.full_like(p['q_proj']['lora_b'], 0.1234567)
  d2 = fa.save_adapters(tmp_path / 'bf16', model, p)
  wide_model, wide = fa.prepare_for_transfer(
    Net(), params, fa.TransferConfig(mode='lora', lora_targets='q_proj', lora_rank=2), X
  )
  loaded = fa.load_adapters(d2, wide_model, wide)
  assert loaded['q_proj']['lora_b'].dtype == jnp.float32
  np.testing.assert_array_equal(loaded['q_proj']['lora_b'], p['q_proj']['lora_b'].astype(jnp.float32))


def test_restore_onto_another_architecture_names_the_base(tmp_path, params):
  # The trained set differs (the other model has a norm to unfreeze) only because the base does: the
  # base structure is named, not "another unfreeze_norm or modules_to_save setting".
  d, _ = _saved(tmp_path, params, unfreeze_norm=True)
  other = WithNorm().init(jax.random.key(0), X)['params']
  with pytest.raises(ValueError, match=r'was trained on a different base model: 2 leaves differ \(ln/bias: saved None'):
    fa.restore_transfer(d, WithNorm(), other, X)


def test_partition_specs_longer_than_the_leaf(params):
  from jax.sharding import PartitionSpec as P

  model, p = fa.prepare_for_transfer(
    Net(), params, fa.TransferConfig(mode='lora', lora_targets='q_proj', lora_rank=2), X
  )
  specs = {'q_proj': {'kernel': P(None, 'model', None), 'bias': P('model')}, 'out': {'kernel': P(), 'bias': P()}}
  with pytest.raises(
    ValueError, match=r'`base_specs` gives q_proj/kernel the spec .*3 entries for a 2-D leaf \(4, 8\)'
  ):
    fa.partition_specs(model, p, specs)
  specs['q_proj']['kernel'] = P(None, 'model')
  assert fa.partition_specs(model, p, specs)['q_proj']['lora_b'] == P(None, 'model')


def test_make_train_step_arguments():
  import optax

  loss = lambda p, x: jnp.sum(p['w'] * x)
  with pytest.raises(
    TypeError, match=r'`tx` must be an optax.GradientTransformation .*\(call it: optax.adamw\(1e-4\)\); found function'
  ):
    fa.make_train_step(loss, optax.adam)
  with pytest.raises(TypeError, match=r'`loss_fn` must be a function .* found dict'):
    fa.make_train_step({'w': 1.0}, optax.adam(1e-2))
  with pytest.raises(TypeError, match=r'`donate` must be a bool, found 0'):
    fa.make_train_step(loss, optax.adam(1e-2), donate=0)
  step = fa.make_train_step(loss, optax.sgd(0.5), donate=False)
  t, _, value = step({'w': jnp.ones(2)}, optax.sgd(0.5).init({'w': jnp.ones(2)}), {'w': None}, jnp.array([1.0, 2.0]))
  np.testing.assert_allclose(t['w'], [0.5, 0.0], atol=0)
  assert float(value) == 3.0


@pytest.mark.parametrize('field', ['remove_heads', 'keep_heads'])
def test_a_head_listed_twice_is_refused(field):
  # Repeated targets are refused; repeated head names were accepted silently.
  with pytest.raises(ValueError, match=rf"`{field}` lists \['atac'\] more than once: \['atac', 'dnase', 'atac'\]"):
    fa.TransferConfig(mode='linear', **{field: ['atac', 'dnase', 'atac']})
  assert getattr(fa.TransferConfig(mode='linear', **{field: ['atac', 'dnase']}), field) == ('atac', 'dnase')


class Renamed(nn.Module):
  """Another architecture: no module of Net's names."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name='head')(nn.Dense(8, name='enc')(x))


@pytest.mark.parametrize('made_by', ['config', 'rules'])
def test_restore_onto_a_model_without_the_saved_modules_names_the_base(tmp_path, params, made_by):
  # The saved targets match nothing on another model: the error said "`lora_targets` entry 'q_proj' matches
  # no module" (or the same for a rules-made checkpoint), as if the targets were wrong.
  if made_by == 'config':
    d, _ = _saved(tmp_path, params)
  else:
    model, p = fa.adapt(Net(), params, {'q_proj': fa.LoRA(rank=2)}, X)
    d = fa.save_adapters(tmp_path / 'ck', model, p)
  other = Renamed().init(jax.random.key(0), X)['params']
  with pytest.raises(
    ValueError, match=r'was trained on a different base model: 4 of the 4 base leaves .* not in `params`'
  ):
    fa.restore_transfer(d, Renamed(), other, X)
