"""A user's own adapter methods, written once with the documented protocol, work everywhere.

BitFit (a trained delta on each layer's bias) and VeRA (shared frozen random matrices regenerated from a
seed, trained scaling vectors) are defined here only: they run factored on linen models and on scanned
layers, fold exactly (float64), run on bare params trees through `materialize`, train alone, and come
back from an adapter checkpoint. Protocol misuse is refused when the class is registered or placed, by
a ValueError/TypeError that names the method, the hook and the fix.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

import flax_adapters as fa
from flax_adapters.methods.base import broadcast_to, fold_dtype
from tests.core import testnet as net
from tests.core.helpers import max_diff, perturb


@dataclasses.dataclass(frozen=True, kw_only=True)
class BitFit(fa.Method):
  """y + d: a trained delta on the layer's bias (Ben Zaken et al., 2022); it folds into the bias."""

  name = 'sweep_bitfit'
  leaf_names = ('bitfit_delta',)
  stage = 'output'
  kinds = ('dense', 'dense_general', 'einsum', 'conv')

  def shapes(self, site):
    return {'bitfit_delta': site.size(site.bias)}

  def layout(self, site):
    return {'bitfit_delta': site.bias}

  def init(self, rng, site, dtype):
    return {'bitfit_delta': jnp.zeros(self.shapes(site)['bitfit_delta'], dtype)}

  def apply(self, site, leaves, x, y, call, rng=None):
    return y + broadcast_to(leaves['bitfit_delta'].astype(y.dtype), site.bias, call.y)

  def fold(self, site, leaves, module_params):
    if 'bias' not in module_params:
      return None
    b = module_params['bias']
    return {**module_params, 'bias': (b.astype(fold_dtype(b)) + leaves['bitfit_delta']).astype(b.dtype)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class VeRA(fa.Method):
  """VeRA (Kopiczko et al., 2024): delta W = A[:in]·diag(d)·B[:, :out]·diag(b), A and B frozen, shared."""

  name = 'sweep_vera'
  leaf_names = ('vera_d', 'vera_b')
  stage = 'additive'
  kinds = ('dense',)

  rank: int = 4
  seed: int = 0
  max_features: tuple = (64, 64)

  def shared(self, dtype):
    # Drawn in float32 whatever the dtype (random bits differ per dtype), so fold and forward agree.
    key = jax.random.key(self.seed)
    a = jax.random.uniform(jax.random.fold_in(key, 0), (self.max_features[0], self.rank), jnp.float32, -1, 1)
    b = jax.random.uniform(jax.random.fold_in(key, 1), (self.rank, self.max_features[1]), jnp.float32, -1, 1)
    return a.astype(dtype), b.astype(dtype)

  def shapes(self, site):
    return {'vera_d': (self.rank,), 'vera_b': site.size(site.feature_out)}

  def init(self, rng, site, dtype):
    return {'vera_d': jnp.full((self.rank,), 0.1, dtype), 'vera_b': jnp.zeros(site.size(site.feature_out), dtype)}

  def apply(self, site, leaves, x, y, call, rng=None):
    dt = y.dtype
    (n_in,), (n_out,) = site.size(site.feature_in), site.size(site.feature_out)
    a, b = self.shared(dt)
    h = (x.astype(dt) @ a[:n_in]) * leaves['vera_d'].astype(dt)
    return y + (h @ b[:, :n_out]) * leaves['vera_b'].astype(dt)

  def fold(self, site, leaves, module_params):
    w = module_params['kernel']
    dt = fold_dtype(w)
    (n_in,), (n_out,) = site.size(site.feature_in), site.size(site.feature_out)
    a, b = self.shared(dt)
    delta = (a[:n_in] * leaves['vera_d'].astype(dt)) @ b[:, :n_out] * leaves['vera_b'].astype(dt)
    return {**module_params, 'kernel': (w.astype(dt) + delta).astype(w.dtype)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class InputShift(fa.Method):
  """layer(x + c): an input-stage method that does not commute with IA3_FF's input scale."""

  name = 'sweep_in_shift'
  leaf_names = ('in_shift',)
  stage = 'input'
  kinds = ('dense',)

  def shapes(self, site):
    return {'in_shift': site.size(site.feature_in)}

  def init(self, rng, site, dtype):
    return {'in_shift': jnp.zeros(site.size(site.feature_in), dtype)}

  def apply(self, site, leaves, x, y, call, rng=None):
    return x + leaves['in_shift'].astype(x.dtype)

  def fold(self, site, leaves, module_params):
    w, b = module_params['kernel'], module_params['bias']
    dt = fold_dtype(w)
    return {**module_params, 'bias': (b.astype(dt) + leaves['in_shift'].astype(dt) @ w.astype(dt)).astype(b.dtype)}


@pytest.fixture(autouse=True, scope='module')
def registered():
  for cls in (BitFit, VeRA, InputShift):
    fa.register_method(cls)
  yield
  for cls in (BitFit, VeRA, InputShift):
    fa.unregister_method(cls.name)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Shift(fa.Method):
  """A bias shift on its one leaf, whatever its name: the base of the misuse cases (never registered)."""

  stage = 'output'
  kinds = ('dense',)

  def shapes(self, site):
    return {self.leaf_names[0]: site.size(site.feature_out)}

  def init(self, rng, site, dtype):
    return {self.leaf_names[0]: jnp.zeros(site.size(site.feature_out), dtype)}

  def apply(self, site, leaves, x, y, call, rng=None):
    return y + leaves[self.leaf_names[0]].astype(y.dtype)

  def fold(self, site, leaves, module_params):
    return {**module_params, 'bias': module_params['bias'] + leaves[self.leaf_names[0]]}


def _method(name, **attrs):
  """A `_Shift` with a new name and leaf name, decorated as the protocol asks."""
  attrs.setdefault('leaf_names', (f'{name}_leaf',))
  return dataclasses.dataclass(frozen=True, kw_only=True)(type(name.title(), (_Shift,), {'name': name, **attrs}))


# -- written once, works everywhere -----------------------------------------------------------------


def test_linen_factored_equals_merged_and_materialized_float64():
  rules = {'fc2': [BitFit(), fa.IA3()], 'fc1': [VeRA(rank=3), fa.IA3FF()], 'conv1d': BitFit(), 'mix': BitFit()}
  with jax.enable_x64(True):
    model, params, x = net.make(jnp.float64)
    adapted, p = fa.adapt(model, params, rules, x)
    chex.assert_trees_all_close(adapted.apply({'params': p}, x), model.apply({'params': params}, x), atol=1e-12)
    p = perturb(p, jax.random.key(1))
    y = adapted.apply({'params': p}, x)
    served, merged = fa.merge_adapters(adapted, p)
    assert served is model
    chex.assert_trees_all_equal_shapes_and_dtypes(merged, params)
    assert max_diff(y, model.apply({'params': merged}, x)) < 1e-12
    assert max_diff(y, model.apply({'params': fa.materialize(p, adapted)}, x)) < 1e-12


def test_training_touches_only_the_methods_leaves_and_summary_counts_them():
  model, params, x = net.make()
  cfg = fa.TransferConfig(
    mode=['sweep_bitfit', 'sweep_vera', 'lora'],
    options={'sweep_bitfit': {'targets': ['fc2']}, 'sweep_vera': {'targets': ['fc1'], 'rank': 3}},
    lora_rank=2,
    unfreeze_norm=False,
  )
  adapted, p = fa.prepare_for_transfer(model, params, cfg, x)
  mask = fa.trainable_mask(adapted, p)
  trunk = {k[-1] for k, v in traverse_util.flatten_dict(mask).items() if v and k[0] != 'heads'}
  assert trunk == {'bitfit_delta', 'vera_d', 'vera_b', 'lora_a', 'lora_b'}
  trainable, frozen = fa.partition(perturb(p, jax.random.key(2)), mask)

  def loss(q, x):
    return sum(jnp.sum(v**2) for v in adapted.apply({'params': q}, x).values())

  grads = jax.grad(lambda t: loss(fa.combine(t, frozen), x))(trainable)
  flat = {k: v for k, v in traverse_util.flatten_dict(grads).items() if v is not None and k[0] != 'heads'}
  assert {k[-1] for k in flat} == trunk and all(float(jnp.abs(v).max()) > 0 for v in flat.values())
  tx = optax.adam(1e-2)
  new, _, _ = fa.make_train_step(loss, tx, donate=False)(trainable, tx.init(trainable), frozen, x)
  assert float(jnp.abs(new['blocks_0']['mlp']['fc1']['vera_b'] - trainable['blocks_0']['mlp']['fc1']['vera_b']).max())
  summary = fa.param_summary(adapted, p)
  assert summary['sweep_bitfit'].trainable == net.BLOCKS * net.D
  assert summary['sweep_vera'].trainable == net.BLOCKS * (3 + 2 * net.D)


def test_scanned_layers_fold_one_by_one_float64():
  from tests.core.test_scan import LAYERS, D, Stack

  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (2, 5, D), jnp.float64)
    params = jax.tree.map(lambda v: v.astype(jnp.float64), Stack().init(jax.random.key(1), x)['params'])
    adapted, p = fa.adapt(Stack(), params, {'fc2': [BitFit(), fa.IA3()], 'fc1': VeRA(rank=3)}, x)
    assert p['layers']['mlp']['fc1']['vera_d'].shape == (LAYERS, 3)
    p = perturb(p, jax.random.key(3))
    served, merged = fa.merge_adapters(adapted, p)
    assert max_diff(adapted.apply({'params': p}, x), served.apply({'params': merged}, x)) < 1e-12


def test_bare_params_tree_materializes_like_the_linen_forward_float64():
  with jax.enable_x64(True):
    model, params, x = net.make(jnp.float64)
    rules = {'fc2': [BitFit(), fa.IA3()], 'fc1': VeRA(rank=3)}
    kinds = {n: ('dense_general', 1) for n in ('q_proj', 'k_proj', 'v_proj')}
    kinds.update(o_proj=('dense_general', 2), conv1d='conv', conv2d='conv')
    kinds['grouped_conv'] = ('conv', {'feature_group_count': 2})
    bare, p = fa.adapt(None, params, rules, kinds=kinds)
    linen, _ = fa.adapt(model, params, rules, x)
    p = perturb(p, jax.random.key(4))
    assert max_diff(linen.apply({'params': p}, x), model.apply({'params': fa.materialize(p, bare)}, x)) < 1e-12


def test_checkpoint_round_trip_keeps_tuple_fields(tmp_path):
  model, params, x = net.make()
  adapted, p = fa.adapt(model, params, {'fc1': VeRA(rank=2, max_features=(48, 40))}, x)
  p = perturb(p, jax.random.key(5))
  path = fa.save_adapters(tmp_path / 'ckpt', adapted, p)
  restored_model, restored = fa.restore_transfer(path, model, params, x)
  method = restored_model.plan[0].methods[0]
  assert method == VeRA(rank=2, max_features=(48, 40)) and hash(method) == hash(VeRA(rank=2, max_features=(48, 40)))
  chex.assert_trees_all_close(restored_model.apply({'params': restored}, x), adapted.apply({'params': p}, x))


def test_sharding_specs_without_a_layout_replicate_the_leaves():
  model, params, x = net.make()
  adapted, p = fa.adapt(model, params, {'fc1': VeRA(rank=2), 'fc2': BitFit()}, x)
  specs = fa.partition_specs(adapted, p, lambda key, value: P())
  assert specs['blocks_0']['mlp']['fc1']['vera_d'] == P(None)
  assert specs['blocks_0']['mlp']['fc1']['vera_b'] == P(None)


def test_input_stages_fold_innermost_first():
  # Forward: IA3_FF (registered first), then the shift: layer(x * l + c). Folding the scale first would
  # give layer((x + c) * l).
  with jax.enable_x64(True):
    model, params, x = net.make(jnp.float64)
    adapted, p = fa.adapt(model, params, {'fc2': [InputShift(), fa.IA3FF()]}, x)
    assert [m.name for m in adapted.plan[0].methods] == ['ia3_ff', 'sweep_in_shift']
    p = perturb(p, jax.random.key(1))
    served, merged = fa.merge_adapters(adapted, p)
    assert max_diff(adapted.apply({'params': p}, x), served.apply({'params': merged}, x)) < 1e-12


# -- misuse is refused, naming the method, the hook and the fix ---------------------------------------


def test_a_class_that_is_not_itself_a_dataclass_is_refused():
  class Plain(BitFit):  # forgot @dataclasses.dataclass: `rank` would be a class attribute
    name = 'sweep_plain'
    leaf_names = ('plain_leaf',)
    rank: int = 3

  with pytest.raises(TypeError, match=r'Plain must be a dataclass itself .* @dataclasses.dataclass\(frozen=True'):
    fa.register_method(Plain)


def test_malformed_class_attributes_are_refused_at_registration():
  with pytest.raises(ValueError, match=r"leaf_names must be a non-empty tuple of strings, found 'sweep_str_x' \(write"):
    fa.register_method(_method('sweep_str', leaf_names='sweep_str_x'))
  with pytest.raises(ValueError, match=r"Sweep_Typo.kinds \['Dense'\] are not module kinds"):
    fa.register_method(_method('sweep_typo', kinds=('Dense',)))
  with pytest.raises(ValueError, match=r'Sweep_Nokinds.kinds is empty, so no module could ever take it'):
    fa.register_method(_method('sweep_nokinds', kinds=()))
  for name, group in (('heads', None), ('sweep_grp', 'trunk')):
    with pytest.raises(ValueError, match=r"is one of param_summary's own rows"):
      fa.register_method(_method(name, group=group))
  assert not {'sweep_str', 'sweep_typo', 'sweep_nokinds', 'heads', 'sweep_grp'} & set(fa.methods.REGISTRY)


def test_missing_hooks_are_named_at_registration():
  @dataclasses.dataclass(frozen=True, kw_only=True)
  class Half(fa.Method):
    name = 'sweep_half'
    leaf_names = ('half_leaf',)
    stage = 'output'
    kinds = ('dense',)

    def shapes(self, site):
      return {'half_leaf': site.size(site.feature_out)}

  with pytest.raises(
    TypeError, match=r"Half does not define \['init', 'apply'\], which every adapter method needs: `init"
  ):
    fa.register_method(Half)


def test_a_mode_taken_by_another_method_is_refused():
  with pytest.raises(ValueError, match=r"Sweep_Hijack.mode 'lora' is already the TransferConfig mode of \['LoRA'\]"):
    fa.register_method(_method('sweep_hijack', mode='lora'))
  assert [r.methods[0].name for r in fa.TransferConfig(mode='lora').rules()] == ['lora', 'lora']


def test_an_unregistered_method_in_a_rule_is_refused():
  model, params, x = net.make()
  cls = _method('sweep_unregistered')
  with pytest.raises(
    ValueError, match=r"places Sweep_Unregistered \(method 'sweep_unregistered'\), but it is not registered"
  ):
    fa.adapt(model, params, {'fc2': cls()}, x)


def test_init_and_shapes_that_break_their_promise_are_named():
  model, params, x = net.make()
  wrong_shape = _method('sweep_badinit', init=lambda self, rng, site, dtype: {'sweep_badinit_leaf': jnp.zeros(3)})
  wrong_keys = _method('sweep_badkeys', init=lambda self, rng, site, dtype: {'delta': jnp.zeros(site.size(site.bias))})
  int_shape = _method('sweep_intshape', shapes=lambda self, site: {'sweep_intshape_leaf': 16})
  for cls in (wrong_shape, wrong_keys, int_shape):
    fa.register_method(cls)
  try:
    with pytest.raises(
      ValueError, match=r"Sweep_Badinit.init \(method 'sweep_badinit'\) on blocks.0.mlp.fc2 .* of shape \(3,\), but "
    ):
      fa.adapt(model, params, {'fc2': wrong_shape()}, x)
    with pytest.raises(
      ValueError, match=r"Sweep_Badkeys.init .* returned \['delta'\], but the method declares leaf_names"
    ):
      fa.adapt(model, params, {'fc2': wrong_keys()}, x)
    with pytest.raises(
      TypeError, match=r"Sweep_Intshape.shapes .* gives 'sweep_intshape_leaf' the shape 16; a shape is a tuple"
    ):
      fa.adapt(model, params, {'fc2': int_shape()}, x)
  finally:
    for cls in (wrong_shape, wrong_keys, int_shape):
      fa.unregister_method(cls.name)


def test_a_method_without_fold_says_so():
  nofold = _method('sweep_nofold', fold=fa.Method.fold)
  fa.register_method(nofold)
  try:
    model, params, x = net.make()
    adapted, p = fa.adapt(model, params, {'fc2': nofold()}, x)
    with pytest.raises(ValueError, match=r'Sweep_Nofold \(sweep_nofold\) defines no `fold`'):
      fa.materialize(p, adapted)
    with pytest.raises(ValueError, match=r"\['Sweep_Nofold'\] define no `fold`, and a bare params tree runs only"):
      fa.adapt(None, {'fc2': {'kernel': jnp.ones((4, 4)), 'bias': jnp.zeros(4)}}, {'fc2': nofold()})
  finally:
    fa.unregister_method('sweep_nofold')


def test_a_method_that_needs_rng_is_refused_on_a_bare_tree():
  noisy = _method('sweep_noisy', needs_rng=property(lambda self: True))
  fa.register_method(noisy)
  try:
    with pytest.raises(
      ValueError, match=r"\['sweep_noisy \(needs_rng\)'\]: adapter dropout needs the factored forward"
    ):
      fa.adapt(None, {'fc2': {'kernel': jnp.ones((4, 4)), 'bias': jnp.zeros(4)}}, {'fc2': noisy()})
  finally:
    fa.unregister_method('sweep_noisy')
