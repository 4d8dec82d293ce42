"""Issue 2, items 4-5: merging, materialize, and the factored forward agree."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import linen as nn

import flax_adapters as fa
from tests.core import testnet as net
from tests.core.helpers import config, max_diff, perturb

MERGEABLE = ['lora', 'ia3', 'locon', ('lora', 'ia3', 'locon')]


def _trained(mode, dtype=jnp.float32, **kw):
  model, params, x = net.make(dtype)
  adapted, p = fa.prepare_for_transfer(model, params, config(mode, **kw), x, rng=jax.random.key(2))
  return model, params, x, adapted, perturb(p, jax.random.key(4))


_MODE_NAMES = [(('+'.join(m) if isinstance(m, tuple) else m), m) for m in MERGEABLE]


class MergeTest(chex.TestCase):
  """Merged weights reproduce the factored forward; both the merge and the forwards run jitted or not."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(_MODE_NAMES)
  def test_merge_matches_adapted_float32_and_gives_base_tree(self, mode):
    model, params, x, adapted, p = _trained(mode)
    served = fa.merge_adapters(adapted, p)[0]
    merged = self.variant(lambda p: fa.merge_adapters(adapted, p)[1])(p)
    assert served is adapted.base and isinstance(served, nn.Module)
    chex.assert_trees_all_equal_shapes_and_dtypes(merged, params)
    forward = self.variant(lambda p, x: adapted.apply({'params': p}, x))
    out_adapted = forward(p, x)
    # The plain base model accepts the merged tree and reproduces the adapted outputs.
    chex.assert_trees_all_close(model.apply({'params': merged}, x), out_adapted, atol=1e-5, rtol=1e-5)
    assert max_diff(out_adapted, model.apply({'params': params}, x)) > 1e-2  # the adapters did something

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(_MODE_NAMES)
  def test_merge_matches_adapted_float64(self, mode):
    with jax.enable_x64(True):
      model, params, x, adapted, p = _trained(mode, jnp.float64)
      merged = self.variant(lambda p: fa.merge_adapters(adapted, p)[1])(p)
      forward = self.variant(lambda p, x: adapted.apply({'params': p}, x))
      chex.assert_trees_all_close(model.apply({'params': merged}, x), forward(p, x), atol=1e-10, rtol=0)


def test_houlsby_stays_and_still_runs_after_merge():
  model, params, x, adapted, p = _trained(('lora', 'houlsby', 'ia3'))
  served, merged = fa.merge_adapters(adapted, p)
  assert isinstance(served, fa.AdaptedModel)
  assert {m.name for e in served.plan for m in e.methods} == {'houlsby'}
  assert sorted(merged['blocks_0']['mha']['q_proj']) == ['bias', 'kernel']
  assert 'houlsby_up' in merged['blocks_0']['mlp']
  chex.assert_trees_all_close(
    served.apply({'params': merged}, x), adapted.apply({'params': p}, x), atol=1e-5, rtol=1e-5
  )


def test_unmergeable_adapter_stops_folding_on_its_layer():
  """IA3 scales the Locon delta too, so behind an unfoldable Locon it must stay as well."""

  class StdConv(nn.Conv):
    adapter_mergeable = False  # e.g. weight standardization: the kernel is rewritten on every call

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, name='out')(StdConv(4, (3,), name='conv')(x))

  x = jax.random.normal(jax.random.key(0), (2, 8, 3))
  params = Net().init(jax.random.key(1), x)['params']
  cfg = fa.TransferConfig(
    mode=['locon', 'ia3'], locon_rank=2, locon_targets=['conv'], ia3_targets=['conv', 'out'], modules_to_save=['out']
  )
  adapted, p = fa.prepare_for_transfer(Net(), params, cfg, x)
  p = perturb(p, jax.random.key(3))
  served, merged = fa.merge_adapters(adapted, p)
  assert [(e.site.path, [m.name for m in e.methods]) for e in served.plan] == [(('conv',), ['locon', 'ia3'])]
  assert sorted(merged['out']) == ['bias', 'kernel']
  chex.assert_trees_all_close(
    served.apply({'params': merged}, x), adapted.apply({'params': p}, x), atol=1e-5, rtol=1e-5
  )
  with pytest.raises(ValueError, match="materialize cannot fold .*'conv'.*recomputes its kernel"):
    fa.materialize(p, adapted)


def test_bf16_kernels_merge_through_float32():
  model, params, x, adapted, p = _trained(('lora', 'ia3'), jnp.bfloat16)
  q = p['blocks_0']['mha']['q_proj']
  assert q['kernel'].dtype == jnp.bfloat16 and q['lora_a'].dtype == jnp.float32  # fp32 adapters on a bf16 base
  served, merged = fa.merge_adapters(adapted, p)
  chex.assert_trees_all_equal_shapes_and_dtypes(merged, params)
  lora = next(m for e in adapted.plan if e.site.path == ('blocks_0', 'mha', 'q_proj') for m in e.methods)
  site = adapted.sites[('blocks_0', 'mha', 'q_proj')].site
  expected = (q['kernel'].astype(jnp.float32) + lora.delta(site, q, jnp.float32)).astype(jnp.bfloat16)
  np.testing.assert_array_equal(
    np.asarray(merged['blocks_0']['mha']['q_proj']['kernel'], np.float32), np.asarray(expected, np.float32)
  )
  # A bf16 model's merged output stays within bf16 rounding of the adapted one.
  assert max_diff(served.apply({'params': merged}, x), adapted.apply({'params': p}, x)) < 0.1


@pytest.mark.parametrize('mode', MERGEABLE, ids=lambda m: '+'.join(m) if isinstance(m, tuple) else m)
def test_factored_forward_matches_materialize(mode):
  model, params, x, adapted, p = _trained(mode)
  folded = fa.materialize(p, adapted)
  chex.assert_trees_all_equal_shapes_and_dtypes(folded, params)
  chex.assert_trees_all_close(adapted.apply({'params': p}, x), model.apply({'params': folded}, x), atol=1e-5, rtol=1e-5)


def test_materialize_is_differentiable_into_the_adapters():
  model, params, x, adapted, p = _trained('lora')
  g = jax.grad(lambda p: jnp.sum(model.apply({'params': fa.materialize(p, adapted)}, x)['atac']))(p)
  g_factored = jax.grad(lambda p: jnp.sum(adapted.apply({'params': p}, x)['atac']))(p)
  a, b = g['blocks_0']['mha']['q_proj']['lora_a'], g_factored['blocks_0']['mha']['q_proj']['lora_a']
  assert float(jnp.abs(a).max()) > 0
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_materialize_refuses_houlsby():
  model, params, x, adapted, p = _trained('houlsby')
  with pytest.raises(ValueError, match='materialize cannot fold .*houlsby.*not a weight-space adapter'):
    fa.materialize(p, adapted)


@pytest.mark.parametrize(
  'conv_kw',
  [
    dict(features=6, kernel_size=(5,), padding='SAME'),
    dict(features=6, kernel_size=(4,), strides=(2,), padding='VALID'),
    dict(features=6, kernel_size=(3,), kernel_dilation=(2,), padding='CAUSAL'),
    dict(features=6, kernel_size=(3,), padding=((2, 0),), input_dilation=(1,)),
    dict(features=6, kernel_size=(3, 3), strides=(2, 1), padding='SAME'),
    dict(features=6, kernel_size=(3, 3), padding='CIRCULAR'),
  ],
  ids=['same', 'stride-valid', 'dilated-causal', 'explicit-pad', '2d-strided', '2d-circular'],
)
def test_locon_geometry_factored_equals_folded(conv_kw):
  ndim = len(conv_kw['kernel_size'])
  x = jax.random.normal(jax.random.key(0), (2,) + (9,) * ndim + (5,))
  conv = nn.Conv(name='conv', **conv_kw)
  params = conv.init(jax.random.key(1), x)['params']
  cfg = fa.TransferConfig(mode='locon', locon_rank=2, locon_alpha=3, locon_targets=['re:.*'], modules_to_save=['re:.*'])
  adapted, p = fa.prepare_for_transfer(conv, params, cfg, x)
  p = perturb(p, jax.random.key(5))
  factored = adapted.apply({'params': p}, x)
  assert factored.shape == conv.apply({'params': params}, x).shape
  chex.assert_trees_all_close(factored, conv.apply({'params': fa.materialize(p, adapted)}, x), atol=1e-5, rtol=1e-5)


def test_einsum_with_interleaved_kernel_axes():
  """Gemma-style einsum 'BTD,NDH->BTNH': kernel axes (N out, D in, H out) in that order."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  layer = nn.Einsum((3, 8, 4), 'BTD,NDH->BTNH', name='proj')
  params = layer.init(jax.random.key(1), x)['params']
  cfg = fa.TransferConfig(
    mode=['lora', 'ia3'],
    lora_rank=2,
    lora_targets=['re:.*'],
    ia3_targets=['re:.*'],
    ia3_ff_targets=['re:.*'],
    modules_to_save=['re:.*'],
  )
  adapted, p = fa.prepare_for_transfer(layer, params, cfg, x)
  assert p['lora_a'].shape == (8, 2) and p['lora_b'].shape == (2, 3, 4) and p['ia3_scale'].shape == (3, 4)
  p = perturb(p, jax.random.key(3))
  chex.assert_trees_all_close(
    adapted.apply({'params': p}, x), layer.apply({'params': fa.materialize(p, adapted)}, x), atol=1e-5, rtol=1e-5
  )
  served, merged = fa.merge_adapters(adapted, p)
  chex.assert_trees_all_close(
    served.apply({'params': merged}, x), adapted.apply({'params': p}, x), atol=1e-5, rtol=1e-5
  )


def test_lora_dropout_only_with_the_rng_stream_and_unbiased():
  x = jax.random.normal(jax.random.key(0), (64, 16))
  layer = nn.Dense(8, name='q_proj')
  params = layer.init(jax.random.key(1), x)['params']
  cfg = fa.TransferConfig(mode='lora', lora_rank=4, lora_dropout=0.5, lora_targets=['re:.*'], modules_to_save=['re:.*'])
  adapted, p = fa.prepare_for_transfer(layer, params, cfg, x)
  p = perturb(p, jax.random.key(2), scale=0.5)
  evaluation = adapted.apply({'params': p}, x)
  # Without the stream (evaluation) LoRA runs in full: the folded weights give the same output.
  chex.assert_trees_all_close(evaluation, layer.apply({'params': fa.materialize(p, adapted)}, x), atol=1e-5, rtol=1e-5)
  train = jax.jit(lambda k: adapted.apply({'params': p}, x, rngs={'adapter_dropout': k}))
  samples = jax.vmap(train)(jax.random.split(jax.random.key(3), 400))
  assert max_diff(samples[0], samples[1]) > 1e-2  # different masks
  base = layer.apply({'params': params}, x)
  # Dropout touches only the LoRA branch, and inverted scaling keeps it unbiased on average.
  delta, mean_delta = evaluation - base, samples.mean(0) - base
  assert float(jnp.abs(mean_delta - delta).max()) < 0.15 * float(jnp.abs(delta).max())
