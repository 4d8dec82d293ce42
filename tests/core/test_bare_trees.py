"""Bare params trees (Haiku, Equinox, NNX, plain dicts): what `prepare_params`/`materialize` accept,
what they fold, and the errors for what they cannot take. Float64 for identities."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax_adapters as fa

F64 = jnp.float64


def haiku_tree():
  k = jax.random.split(jax.random.key(0), 4)
  return {
    'mlp/~/linear_0': {'w': jax.random.normal(k[0], (4, 8), F64), 'b': jax.random.normal(k[1], (8,), F64)},
    'mlp/~/linear_1': {'w': jax.random.normal(k[2], (8, 3), F64)},
    'layer_norm': {'scale': jnp.ones(4, F64), 'offset': jnp.zeros(4, F64)},
    'conv1_d': {'w': jax.random.normal(k[3], (3, 4, 4), F64), 'b': jnp.zeros(4, F64)},
  }


def haiku_forward(p, x):
  x = (x - x.mean(-1, keepdims=True)) * p['layer_norm']['scale'] + p['layer_norm']['offset']
  dn = ('NWC', 'WIO', 'NWC')
  x = jax.lax.conv_general_dilated(x, p['conv1_d']['w'], (1,), 'SAME', dimension_numbers=dn) + p['conv1_d']['b']
  h = jax.nn.relu(x @ p['mlp/~/linear_0']['w'] + p['mlp/~/linear_0']['b'])
  return h @ p['mlp/~/linear_1']['w']


HAIKU_RULES = [
  fa.Rule(target='mlp/~/linear_0', methods=[fa.LoRA(rank=2, alpha=4), fa.IA3()]),
  fa.Rule(target='mlp/~/linear_1', methods=fa.LoRA(rank=2, alpha=4)),
  fa.Rule(target='conv1_d', methods=fa.Locon(rank=2, alpha=2)),
]


def test_haiku_layers_are_found_by_their_w_and_b():
  with jax.enable_x64(True):
    params = haiku_tree()
    model, p = fa.adapt(None, params, HAIKU_RULES, kinds={'conv1_d': 'conv'})
    assert sorted(p['mlp/~/linear_0']) == ['b', 'ia3_scale', 'lora_a', 'lora_b', 'w']
    x = jax.random.normal(jax.random.key(5), (2, 5, 4), F64)
    np.testing.assert_array_equal(haiku_forward(fa.materialize(p, model), x), haiku_forward(params, x))

    p = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.key(v.size), v.shape, F64), p)
    folded = fa.materialize(p, model)
    assert jax.tree.structure(folded) == jax.tree.structure(params)  # Haiku's names, nothing else
    lin = p['mlp/~/linear_0']
    # IA3 scales the output features of W + 2·A·B and of `b` (IA3 folds after LoRA).
    want_w = (lin['w'] + 2.0 * lin['lora_a'] @ lin['lora_b']) * lin['ia3_scale']
    np.testing.assert_allclose(folded['mlp/~/linear_0']['w'], want_w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(folded['mlp/~/linear_0']['b'], lin['b'] * lin['ia3_scale'], rtol=1e-12, atol=1e-12)
    conv = p['conv1_d']
    want_conv = conv['w'] + jnp.einsum('wir,ro->wio', conv['locon_down'], conv['locon_up'][0])  # alpha/rank = 1
    np.testing.assert_allclose(folded['conv1_d']['w'], want_conv, rtol=1e-12, atol=1e-12)

    mask = fa.trainable_mask(model, p)
    assert mask['mlp/~/linear_0'] == {'w': False, 'b': False, 'lora_a': True, 'lora_b': True, 'ia3_scale': True}


def test_haiku_tree_through_transfer_config_and_an_optimizer():
  params = jax.tree.map(lambda v: v.astype(jnp.float32), haiku_tree())
  config = fa.TransferConfig(mode='lora', lora_rank=2, lora_targets=['re:mlp/~/linear_.*'])
  model, p = fa.prepare_params(params, config, kinds={'conv1_d': 'conv'})
  mask = fa.trainable_mask(model, p)
  assert mask['layer_norm'] == {'scale': True, 'offset': True}  # unfreeze_norm: Haiku's offset too
  tx = fa.transfer_optimizer(optax.adamw(1e-2, weight_decay=0.1), mask)
  x = jnp.ones((2, 5, 4))
  grads = jax.grad(lambda q: jnp.sum(haiku_forward(fa.materialize(q, model), x) ** 2))(p)
  updates, _ = tx.update(grads, tx.init(p), p)
  stepped = optax.apply_updates(p, updates)
  np.testing.assert_array_equal(stepped['mlp/~/linear_0']['w'], p['mlp/~/linear_0']['w'])
  assert not np.allclose(stepped['mlp/~/linear_0']['lora_a'], p['mlp/~/linear_0']['lora_a'])


def test_kinds_hint_on_a_dict_without_a_kernel_says_how_kernels_are_named():
  params = {'fc': {'weight': jnp.ones((3, 4))}}  # torch layout, [out, in]
  with pytest.raises(
    ValueError, match=r"no `kernel` leaf \(it holds \['weight'\]\).*transpose a torch-layout `weight`"
  ):
    fa.adapt(None, params, [fa.Rule(target='fc', methods=fa.LoRA(rank=1))], kinds={'fc': 'dense'})


@pytest.mark.parametrize(
  'params, message',
  [
    ({'layers': [{'kernel': jnp.ones((2, 2))}]}, r'`params` must be nested dicts of arrays, but layers is a list'),
    ({'fc': {'kernel': jnp.ones((2, 2)), 'bias': None}}, r'`params` has None at fc/bias; drop absent leaves'),
  ],
)
def test_containers_other_than_dicts_are_refused(params, message):
  with pytest.raises(TypeError, match=message):
    fa.trace_params(params)


@pytest.mark.parametrize(
  'hint, message',
  [
    (('dense_general', 0), r'n_input_axes must be an int in \[1, 2\] for its 3-D kernel'),
    (('dense_general', '2'), r'n_input_axes must be an int in \[1, 2\]'),
    ('conv', None),
  ],
)
def test_kinds_hint_values_are_checked(hint, message):
  params = {'fc': {'kernel': jnp.ones((4, 2, 3))}}
  if message is None:
    fa.trace_params(params, kinds={'fc': hint})  # a 3-D kernel can be a 1-D conv
    with pytest.raises(ValueError, match=r"`kinds` says 'fc' is a conv, but its kernel is 2-D"):
      fa.trace_params({'fc': {'kernel': jnp.ones((4, 3))}}, kinds={'fc': 'conv'})
  else:
    with pytest.raises(ValueError, match=message):
      fa.trace_params(params, kinds={'fc': hint})


def test_base_params_where_prepared_ones_belong():
  params = {'fc': {'kernel': jnp.ones((4, 3))}}
  model, p = fa.prepare_params(params, fa.TransferConfig(mode='lora', lora_rank=2, lora_targets=['fc']))
  with pytest.raises(ValueError, match=r'lack'):
    fa.trainable_mask(model, params)  # would be all False: nothing would train
  bad = {'fc': {**p['fc'], 'kernel': jnp.ones((1, 3))}}  # would broadcast silently
  with pytest.raises(
    ValueError, match=r"params at 'fc': `kernel` is of shape \(1, 3\), but the model was prepared with \(4, 3\)"
  ):
    fa.materialize(bad, model)


def test_integer_kernels_are_refused():
  params = {'fc': {'kernel': jnp.ones((4, 3), jnp.int8)}}
  with pytest.raises(fa.AdapterError, match=r'its kernel is int8, and a folded delta would be truncated'):
    fa.prepare_params(params, fa.TransferConfig(mode='lora', lora_rank=2, lora_targets=['fc']))


def test_adapter_dropout_on_a_bare_tree_is_refused():
  params = {'fc': {'kernel': jnp.ones((4, 3))}}
  config = fa.TransferConfig(mode='lora', lora_rank=2, lora_targets=['fc'], lora_dropout=0.1)
  with pytest.raises(ValueError, match=r"\['lora\(dropout=0\.1\)'\]: adapter dropout needs the factored forward"):
    fa.prepare_params(params, config)


def _nnx_lora_model():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.emb = nnx.Embed(7, 4, param_dtype=F64, rngs=rngs)
      self.fc = nnx.LoRALinear(4, 3, lora_rank=2, param_dtype=F64, lora_param_dtype=F64, rngs=rngs)

    def __call__(self, ids):
      return self.fc(self.emb(ids))

  return Net(nnx.Rngs(0))


def test_nnx_lora_linear_own_lora_leaves_are_base_params():
  """nnx.LoRALinear keeps its own `lora_a`/`lora_b` in a `lora` dict: part of the base tree (frozen,
  folded untouched), not taken for ours; our LoRA beside its kernel folds into that kernel."""
  from flax import nnx

  with jax.enable_x64(True):
    net = _nnx_lora_model()
    graphdef, state = nnx.split(net)
    base = nnx.to_pure_dict(state)
    base['fc']['lora']['lora_b'] = jax.random.normal(jax.random.key(1), (2, 3), F64)  # nnx inits it to zeros
    model, p = fa.adapt(None, base, [fa.Rule(target='fc', methods=fa.LoRA(rank=2, alpha=4))], rng=jax.random.key(2))
    assert sorted(p['fc']) == ['bias', 'kernel', 'lora', 'lora_a', 'lora_b']
    mask = fa.trainable_mask(model, p)
    assert mask['fc'] == {
      'bias': False,
      'kernel': False,
      'lora': {'lora_a': False, 'lora_b': False},
      'lora_a': True,
      'lora_b': True,
    }
    p['fc']['lora_b'] = jax.random.normal(jax.random.key(3), (2, 3), F64)
    folded = fa.materialize(p, model)
    assert jax.tree.structure(folded) == jax.tree.structure(base)
    np.testing.assert_array_equal(folded['fc']['lora']['lora_b'], base['fc']['lora']['lora_b'])
    np.testing.assert_allclose(
      folded['fc']['kernel'], base['fc']['kernel'] + 2.0 * p['fc']['lora_a'] @ p['fc']['lora_b'], rtol=1e-12, atol=1e-12
    )
    ids = jnp.array([[0, 3, 6]])
    s = nnx.clone(state)
    nnx.replace_by_pure_dict(s, folded)
    h = base['emb']['embedding'][ids]
    theirs = h @ base['fc']['lora']['lora_a'] @ base['fc']['lora']['lora_b']
    ours = 2.0 * h @ p['fc']['lora_a'] @ p['fc']['lora_b']
    want = h @ base['fc']['kernel'] + base['fc']['bias'] + theirs + ours
    np.testing.assert_allclose(nnx.merge(graphdef, s)(ids), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r'already holds adapter leaves \(fc/lora_a, fc/lora_b\)'):
      fa.adapt(None, p, [fa.Rule(target='fc', methods=fa.LoRA(rank=2, alpha=4))])


def test_modules_to_save_names_bare_dicts_without_a_kernel():
  """An nnx.Embed (`embedding`) and nnx.LoRALinear's `lora` dict have no kernel or scale, yet
  modules_to_save names them; a LoRA rule whose target also matches them passes them by."""
  from flax import nnx

  with jax.enable_x64(True):
    base = nnx.to_pure_dict(nnx.split(_nnx_lora_model())[1])
  sites = fa.trace_params(base).sites
  assert (sites[('emb',)].kind, sites[('fc', 'lora')].kind, sites[('fc',)].kind) == ('embed', 'block', 'dense')
  model, p = fa.adapt(None, base, [], modules_to_save=['emb', 'fc/lora'])
  assert fa.trainable_mask(model, p) == {
    'emb': {'embedding': True},
    'fc': {'bias': False, 'kernel': False, 'lora': {'lora_a': True, 'lora_b': True}},
  }
  model, p = fa.adapt(None, base, [fa.Rule(target='fc', methods=fa.LoRA(rank=2, alpha=4))])
  assert sorted(p['fc']) == ['bias', 'kernel', 'lora', 'lora_a', 'lora_b']  # not on `fc/lora`
  assert sorted(p['fc']['lora']) == ['lora_a', 'lora_b']


def _nnx_stacked_linears(n_layers=3, width=4):
  """An nnx.vmap'd stack of Linear layers (kernel `(layers, in, out)`), as scanned models keep them."""
  from flax import nnx

  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return nnx.Linear(width, width, param_dtype=F64, rngs=nnx.Rngs(key))

  return nnx.to_pure_dict(nnx.split(make(jax.random.split(jax.random.key(0), n_layers)))[1])


def test_stacked_bare_layers_get_one_adapter_per_layer(tmp_path):
  """kinds=('stacked', 1, 'dense'): per-layer LoRA leaves from per-layer keys; each layer folds into its
  own kernel (float64, 1e-12); the trained leaves are exactly the adapters; a checkpoint round trips."""
  with jax.enable_x64(True):
    base = {'layers': _nnx_stacked_linears(), 'ln': {'scale': jnp.ones(4, F64)}}
    rules = [fa.Rule(target='layers', methods=fa.LoRA(rank=2, alpha=4))]
    with pytest.raises(ValueError, match=r"\('stacked', 1, 'dense'\)"):
      fa.adapt(None, base, rules)
    kinds = {'layers': ('stacked', 1, 'dense')}
    model, p = fa.adapt(None, base, rules, kinds=kinds, rng=jax.random.key(1))
    lora = p['layers']
    assert lora['lora_a'].shape == (3, 4, 2) and lora['lora_b'].shape == (3, 2, 4)
    assert not np.allclose(lora['lora_a'][0], lora['lora_a'][1])  # each layer its own init
    p['layers']['lora_b'] = jax.random.normal(jax.random.key(2), (3, 2, 4), F64)
    folded = fa.materialize(p, model)
    assert jax.tree.structure(folded) == jax.tree.structure(base)
    for i in range(3):
      want = base['layers']['kernel'][i] + 2.0 * lora['lora_a'][i] @ p['layers']['lora_b'][i]
      np.testing.assert_allclose(folded['layers']['kernel'][i], want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(folded['layers']['bias'], base['layers']['bias'])
    mask = fa.trainable_mask(model, p)
    assert mask['layers'] == {'bias': False, 'kernel': False, 'lora_a': True, 'lora_b': True}
    fa.save_adapters(tmp_path / 'ckpt', model, p)
    _, fresh = fa.adapt(None, base, rules, kinds=kinds, rng=jax.random.key(9))
    loaded = fa.load_adapters(tmp_path / 'ckpt', model, fresh)
    np.testing.assert_array_equal(loaded['layers']['lora_b'], p['layers']['lora_b'])


@pytest.mark.parametrize(
  'hint, message',
  [
    (('stacked', 0, 'dense'), r"expected \('stacked', n_stacked_axes >= 1, kind\)"),
    (('stacked', 1), r"expected \('stacked', n_stacked_axes >= 1, kind\)"),
    (('stacked', 1, ('stacked', 1, 'dense')), r'give every stacked axis in one hint'),
    (('stacked', 3, 'dense'), r'do not share 3 leading stacked axes: bias \(3, 4\), kernel \(3, 4, 4\)'),
    (('stacked', 1, 'dnse'), r"the kind 'dnse'; expected one of"),
  ],
)
def test_stacked_hint_errors(hint, message):
  base = {'layers': _nnx_stacked_linears()}
  with pytest.raises(ValueError, match=message):
    fa.adapt(None, base, [fa.Rule(target='layers', methods=fa.LoRA(rank=2, alpha=4))], kinds={'layers': hint})


def test_linen_kinds_take_kind_names_only():
  """Tuple hints describe bare trees; on a linen model they were taken as a kind and blamed the layer."""
  import flax.linen as nn

  model, x = nn.Dense(3), jnp.ones((2, 4))
  params = model.init(jax.random.key(0), x)['params']
  for hint in (('stacked', 1, 'dense'), 'dnse'):
    with pytest.raises(ValueError, match=r"`kinds` gives 'fc' the kind .*; a linen model takes one of \['dense'"):
      fa.adapt(model, params, [fa.Rule(target='fc', methods=fa.LoRA(rank=2))], x, kinds={'fc': hint})


def _nnx_state_model():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(4, 4, rngs=rngs)
      self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
      self.drop = nnx.Dropout(0.1, rngs=rngs)  # keeps an rng stream (a key and a uint32 count) in the state

  return nnx.to_pure_dict(nnx.split(Net(nnx.Rngs(0)))[1])


@pytest.mark.parametrize(
  'config',
  [
    fa.TransferConfig(mode='full'),
    fa.TransferConfig(mode='lora', lora_rank=2, lora_targets=['fc'], modules_to_save=['bn', 'drop']),
  ],
  ids=['full', 'modules_to_save'],
)
def test_state_leaves_never_train_and_checkpoints_take_rng_keys(tmp_path, config):
  """An NNX state's BatchNorm mean/var, rng key and counter are state: full fine-tuning and
  modules_to_save marked them trainable (Adam moved the running statistics; jax.grad failed on the
  uint32 counter), and save_adapters crashed on the key's dtype."""
  base = _nnx_state_model()
  model, p = fa.prepare_params(base, config, rng=jax.random.key(1))
  mask = fa.trainable_mask(model, p)
  assert mask['bn'] == {'bias': True, 'mean': False, 'scale': True, 'var': False}
  assert mask['drop'] == {'rngs': {'count': False, 'key': False}}
  trainable, frozen = fa.partition(p, mask)
  loss = lambda q: sum(jnp.sum(x**2) for x in jax.tree.leaves(q) if jnp.issubdtype(x.dtype, jnp.floating))
  step = fa.make_train_step(loss, optax.adam(0.1))
  trainable, _, _ = step(trainable, optax.adam(0.1).init(trainable), frozen)
  trained = fa.combine(trainable, frozen)
  np.testing.assert_array_equal(trained['bn']['mean'], base['bn']['mean'])
  np.testing.assert_array_equal(trained['bn']['var'], base['bn']['var'])
  assert not np.array_equal(trained['bn']['scale'], base['bn']['scale'])
  fa.save_adapters(tmp_path / 'ckpt', model, trained)
  loaded = fa.load_adapters(tmp_path / 'ckpt', model, p)
  np.testing.assert_array_equal(loaded['bn']['scale'], trained['bn']['scale'])


def test_nnx_lora_with_a_base_module_is_base_and_an_nnx_state_is_named():
  """nnx.LoRA(base_module=...) keeps `lora_a`/`lora_b` beside a `base_module` dict: base params, not ours
  (adapting any other layer was refused as 'already holds adapter leaves'); an nnx.State passed for the
  pure dict got flax's bare AssertionError."""
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.lo = nnx.LoRA(4, 2, 6, base_module=nnx.Linear(4, 6, rngs=rngs), rngs=rngs)
      self.fc = nnx.Linear(6, 3, rngs=rngs)

  state = nnx.split(Net(nnx.Rngs(0)))[1]
  base = nnx.to_pure_dict(state)
  model, p = fa.adapt(None, base, {'fc': fa.IA3()})
  assert fa.trainable_mask(model, p)['lo'] == {
    'base_module': {'bias': False, 'kernel': False},
    'lora_a': False,
    'lora_b': False,
  }
  for call in (lambda: fa.adapt(None, state, {'fc': fa.IA3()}), lambda: fa.materialize(state, model)):
    with pytest.raises(TypeError, match=r'`params` is a flax.nnx State; pass its plain nested dict, nnx.to_pure_dict'):
      call()


def test_grouped_bare_conv_takes_its_groups_from_the_hint():
  from flax import nnx

  # A grouped nnx.Conv's kernel (3, 3, in // 4, out) does not say its groups; 'conv' alone read it as an
  # ungrouped conv of 2 input channels, and IA3_FF / Locon adapted it as one.
  with jax.enable_x64(True):
    conv = nnx.Conv(8, 8, (3, 3), feature_group_count=4, param_dtype=F64, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(conv)
    base = nnx.to_pure_dict(state)
    assert base['kernel'].shape == (3, 3, 2, 8)
    hint = {'re:.*': ('conv', {'feature_group_count': 4})}
    for mode, targets in (
      ('locon', dict(locon_targets=['re:.*'])),
      ('ia3', dict(ia3_targets=['re:.*'], ia3_ff_targets=['re:.*'])),
    ):
      with pytest.raises(fa.AdapterError, match=r'grouped convolution|feature_group_count=4'):
        fa.prepare_params(base, fa.TransferConfig(mode=mode, **targets), kinds=hint)
    # Scaling the outputs (IA3) folds into a grouped kernel exactly.
    model, p = fa.prepare_params(base, fa.TransferConfig(mode='ia3', ia3_targets=['re:.*']), kinds=hint)
    scale = jax.random.uniform(jax.random.key(1), (8,), F64, 0.5, 1.5)
    p['ia3_scale'] = scale
    with pytest.raises(TypeError, match=r'the arguments are swapped: materialize\(params, model\)'):
      fa.materialize(model, p)
    merged = fa.materialize(p, model)
    x = jax.random.normal(jax.random.key(2), (2, 5, 5, 8), F64)
    nnx.update(conv, merged)
    got = conv(x)
    nnx.update(conv, base)
    np.testing.assert_allclose(got, conv(x) * scale, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
  'hint, message',
  [
    (('conv', 4), r"a conv hint is 'conv', or \('conv', \{'feature_group_count': g\}\)"),
    (('conv', {'groups': 4}), r"a conv hint is 'conv', or \('conv', \{'feature_group_count': g\}\)"),
    (('conv', {'feature_group_count': 0}), r'feature_group_count must be a positive int, found 0'),
    (('conv', {'feature_group_count': 3}), r'has 8 output features, not a multiple of 3 groups'),
  ],
)
def test_grouped_conv_hint_errors(hint, message):
  with pytest.raises(ValueError, match=message):
    fa.trace_params({'c': {'kernel': jnp.ones((3, 3, 2, 8))}}, kinds={'c': hint})
