"""A sweep of the AlphaGenome transfer modes as a user of the adapter guide combines them, on the tiny models.

Each mode and combination: the adapted forward is the base forward at init (float64, where the method
starts as the identity), only the leaves the mask selects change in training, they all get gradients,
and the merged forward equals the factored one. Then head surgery and the config errors it can raise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import flax_adapters as fa
from flax_adapters.genomics.alphagenome import AlphaGenome, AlphaGenomeConfig, random_variables
from flax_adapters.genomics.seq2func import Seq2Func, Seq2FuncConfig

NEW = {'my_atac': {'modality': 'atac', 'num_tracks': 4}}
C = Seq2FuncConfig.tiny()
LEAVES = set(fa.methods.LEAF_NAMES)

# Every mode and the combinations a user of the guide writes, each with a different head surgery.
IDENTITY_CONFIGS = {
  'lora': dict(mode='lora', remove_heads=['atac', 'dnase'], new_heads=NEW),
  'locon': dict(mode='locon', locon_targets=['stem', 'down_blocks.5'], keep_heads=['dnase'], new_heads=NEW),
  'ia3+ia3_ff-on-convs': dict(mode='ia3', ia3_targets=['k_proj', 'conv1'], ia3_ff_targets=['fc2', 'conv2']),
  'houlsby-block-gelu': dict(mode='houlsby', houlsby_activation='gelu', keep_heads=[], new_heads=NEW),
  'houlsby-linear-silu': dict(
    mode='houlsby', houlsby_placement='linear', houlsby_targets=['q_proj', 'fc1'], houlsby_activation='silu'
  ),
  'lora+locon+ia3+houlsby': dict(
    mode=['linear', 'lora', 'locon', 'ia3', 'houlsby'],
    locon_targets=['down_blocks.5'],
    ia3_ff_targets=['fc2'],
    remove_heads=['atac'],
    new_heads=NEW,
  ),
}


@pytest.fixture(scope='module')
def f64():
  with jax.enable_x64(True):
    model = Seq2Func(C, param_dtype=jnp.float64)
    x = jax.random.bernoulli(jax.random.key(0), 0.25, (2, C.seq_len, 4)).astype(jnp.float64)
    return model, model.init(jax.random.key(1), x)['params'], x


def _strip(params):
  return traverse_util.unflatten_dict(
    {k: v for k, v in traverse_util.flatten_dict(params).items() if k[-1] not in LEAVES}
  )


@pytest.mark.parametrize('name', list(IDENTITY_CONFIGS))
def test_adapted_forward_is_the_base_forward_at_init_in_float64(f64, name):
  model, params, x = f64
  with jax.enable_x64(True):
    adapted, p = fa.prepare_for_transfer(model, params, fa.TransferConfig(**IDENTITY_CONFIGS[name]), x)
    out = adapted.apply({'params': p}, x)
    ref = adapted.base.apply({'params': _strip(p)}, x)
    assert set(out) == set(ref) == set(adapted.base.heads) == set(p['heads'])
    for k in ref:
      assert out[k].dtype == jnp.float64
      np.testing.assert_allclose(out[k], ref[k], rtol=0, atol=1e-12)


def test_combined_modes_train_only_the_mask_and_merge_to_the_factored_forward():
  model = Seq2Func(C)
  x = jax.random.bernoulli(jax.random.key(0), 0.25, (2, C.seq_len, 4)).astype(jnp.float32)
  params = model.init(jax.random.key(1), x)['params']
  cfg = fa.TransferConfig(
    mode=['lora', 'locon', 'ia3', 'houlsby'],
    locon_targets=['stem', 'down_blocks.5'],
    ia3_ff_targets=['fc2'],
    modules_to_save=['tower.norm'],
    remove_heads=['atac'],
    new_heads=NEW,
  )
  adapted, p = fa.prepare_for_transfer(model, params, cfg, x)
  mask = traverse_util.flatten_dict(fa.trainable_mask(adapted, p))
  n = sum(int(np.prod(v.shape)) for k, v in traverse_util.flatten_dict(p).items() if mask[k])
  assert fa.param_summary(adapted, p).trainable == n

  def loss(q):
    out = adapted.apply({'params': q}, x)
    return sum(jnp.mean((out[k] - 2.0) ** 2) for k in out)

  # With every adapter off zero, every trainable leaf gets a gradient, so Adam moves every one of them.
  p = jax.tree_util.tree_map_with_path(
    lambda path, v: v + 0.05 * jax.random.normal(jax.random.key(len(path)), v.shape) if path[-1].key in LEAVES else v,
    p,
  )
  tx = optax.adam(1e-2)
  trainable, frozen = fa.partition(p, fa.trainable_mask(adapted, p))
  state = tx.init(trainable)
  step = fa.make_train_step(loss, tx, donate=False)
  for _ in range(3):
    trainable, state, _ = step(trainable, state, frozen)
  p2 = fa.combine(trainable, frozen)
  before, after = traverse_util.flatten_dict(p), traverse_util.flatten_dict(p2)
  for k in before:
    assert np.array_equal(before[k], after[k]) != mask[k], '/'.join(k)
  served, merged = fa.merge_adapters(adapted, p2)
  assert {m.name for e in served.plan for m in e.methods} == {'locon', 'houlsby'}  # standardized convs, bottlenecks
  out, ref = served.apply({'params': merged}, x), adapted.apply({'params': p2}, x)
  for k in ref:
    np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-5)


# -- head surgery and config errors --------------------------------------------------------------


@pytest.fixture(scope='module')
def tiny():
  model = Seq2Func(C)
  x = jax.ShapeDtypeStruct((1, C.seq_len, 4), jnp.float32)
  return model, jax.eval_shape(model.init, jax.random.key(0), x)['params'], x


def _prepare(tiny, **kw):
  model, params, x = tiny
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  return fa.prepare_for_transfer(model, params, fa.TransferConfig(**kw), x)


def test_an_unknown_head_is_blamed_on_its_own_field_with_the_fix(tiny):
  with pytest.raises(ValueError, match=r"`remove_heads` names head\(s\) \['atacc'\].*did you mean 'atacc' -> 'atac'"):
    _prepare(tiny, mode='linear', remove_heads=['atacc'], new_heads=NEW)
  with pytest.raises(
    ValueError, match=r"^`keep_heads` names head\(s\) \['dnasse'\].*Fix: name existing heads in `keep"
  ):
    _prepare(tiny, mode='linear', keep_heads=['dnasse'])


def test_a_new_head_clashing_with_a_kept_one_gives_the_fix_for_keep_heads(tiny):
  with pytest.raises(ValueError, match=r"`new_heads` \['atac'\].*drop them from `keep_heads`"):
    _prepare(tiny, mode='linear', keep_heads=['atac'], new_heads={'atac': NEW['my_atac']})
  _, p = _prepare(tiny, mode='linear', keep_heads=['dnase'], new_heads={'atac': NEW['my_atac']})  # the fix works
  assert sorted(p['heads']) == ['atac', 'dnase'] and p['heads']['atac']['output']['kernel'].shape[-1] == 4


def test_a_bad_new_head_spec_is_blamed_on_new_heads(tiny):
  with pytest.raises(ValueError, match=r"^`new_heads` \['h'\]: Seq2Func refuses these head specs: .*unknown modality"):
    _prepare(tiny, mode='linear', new_heads={'h': {'modality': 'atak', 'num_tracks': 2}})


def test_modules_to_save_matching_nothing_is_an_error_in_full_mode_too(tiny):
  for mode in ('lora', 'full'):
    with pytest.raises(ValueError, match=r"`modules_to_save` entry 'tower.nrom' matches no module"):
      _prepare(tiny, mode=mode, modules_to_save=['tower.nrom'])
  adapted, p = _prepare(tiny, mode='full', modules_to_save=['tower.norm'])
  assert all(jax.tree.leaves(fa.trainable_mask(adapted, p)))


def test_alphagenome_head_replaced_by_a_new_one_gets_fresh_track_means():
  """As in the port, a new head that replaces a removed head of the same name is new: its track means are ones."""
  config = AlphaGenomeConfig.tiny()
  model = AlphaGenome(config)
  variables = random_variables(model, seed=0, calibrate=False)
  dna = jax.ShapeDtypeStruct((1, config.min_length, 4), jnp.float32)
  organism = jax.ShapeDtypeStruct((1,), jnp.int32)
  spec = dict(model.heads['atac'])  # the same spec: the removed head's buffers have the right shape
  cfg = fa.TransferConfig(mode='linear', remove_heads=['atac'], new_heads={'atac': spec, 'my_atac': NEW['my_atac']})
  adapted, _ = fa.prepare_for_transfer(model, variables['params'], cfg, dna, organism)
  buffers = adapted.base.buffers_for(variables['buffers'])
  old = variables['buffers']['heads']['atac']['track_means']
  assert not np.array_equal(old, np.ones_like(old))
  np.testing.assert_array_equal(buffers['heads']['atac']['track_means'], np.ones_like(old))
  np.testing.assert_array_equal(buffers['heads']['my_atac']['track_means'], np.ones((1, 4)))
  kept = variables['buffers']['heads']['dnase']['track_means']
  np.testing.assert_array_equal(buffers['heads']['dnase']['track_means'], kept)  # kept heads keep theirs
