"""Target matching, head surgery, kinds declared by custom modules, and bare params trees (NNX)."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx, traverse_util

import flax_adapters as fa
from flax_adapters import paths
from tests.core import testnet as net
from tests.core.helpers import perturb


@pytest.mark.parametrize(
  'target,path,expected',
  [
    ('down_blocks.4', ('encoder', 'down_blocks_4', 'conv1'), True),
    ('down_blocks.4', ('encoder', 'down_blocks_41', 'conv1'), False),
    ('blocks.1', ('tower', 'blocks_10', 'mha'), False),
    ('blocks.1', ('tower', 'blocks_1', 'mha'), True),
    ('blocks_1/mha', ('tower', 'blocks_1', 'mha'), True),  # the raw linen path works too
    ('q_proj', ('tower', 'blocks_0', 'mha', 'q_proj'), True),
    ('re:tower\\.blocks\\.\\d+\\.mha\\.(q|v)_proj', ('tower', 'blocks_3', 'mha', 'v_proj'), True),
    ('re:mha', ('tower', 'blocks_3', 'mha', 'v_proj'), False),  # regexes match the whole path
    (re.compile(r'.*\.k_proj'), ('blocks_0', 'mha', 'k_proj'), True),
    ('MLP.0', ('MLP_0', 'Dense_1'), True),
  ],
)
def test_matches(target, path, expected):
  assert paths.matches(target, path) is expected


def test_regex_targets_select_exactly(tmp_path):
  model, params, x = net.make()
  cfg = fa.TransferConfig(mode='lora', lora_rank=2, lora_targets=[r're:blocks\.1\.mha\.(q|v)_proj'])
  adapted, p = fa.prepare_for_transfer(model, params, cfg, x)
  assert sorted(paths.dotted(e.site.path) for e in adapted.plan) == ['blocks.1.mha.q_proj', 'blocks.1.mha.v_proj']


def test_head_surgery_keeps_trunk_bitwise_and_inits_new_heads():
  model, params, x = net.make()
  cfg = fa.TransferConfig(
    mode='linear', remove_heads=['dnase'], new_heads={'my_atac': {'modality': 'atac', 'num_tracks': 4}}
  )
  adapted, p = fa.prepare_for_transfer(model, params, cfg, x, rng=jax.random.key(5))
  assert list(p['heads']) == ['atac', 'my_atac']
  assert p['heads']['my_atac']['kernel'].shape == (net.D, 4)
  assert float(jnp.abs(p['heads']['my_atac']['kernel']).sum()) > 0
  flat, flat0 = traverse_util.flatten_dict(p), traverse_util.flatten_dict(params)
  for k, v in flat.items():
    if k[:2] != ('heads', 'my_atac'):
      assert v is flat0[k]  # the very same arrays: trunk and kept heads are untouched
  out = adapted.apply({'params': p}, x)
  assert set(out) == {'atac', 'my_atac'} and out['my_atac'].shape == (2, net.L, 4)
  np.testing.assert_array_equal(out['atac'], model.apply({'params': params}, x)['atac'])
  assert adapted.base.heads == (
    ('atac', {'modality': 'atac', 'num_tracks': 3}),
    ('my_atac', {'modality': 'atac', 'num_tracks': 4}),
  )
  mask = fa.trainable_mask(adapted, p)
  assert all(jax.tree.leaves(mask['heads'])) and not any(
    jax.tree.leaves({k: v for k, v in mask.items() if k != 'heads'})
  )


def test_keep_heads():
  model, params, x = net.make()
  adapted, p = fa.prepare_for_transfer(model, params, fa.TransferConfig(mode='lora', keep_heads=['dnase']), x)
  assert list(p['heads']) == ['dnase']
  assert set(adapted.apply({'params': p}, x)) == {'dnase'}


def test_declared_kind_on_a_custom_module():
  class MyLinear(nn.Module):
    features: int
    adapter_kind = 'dense'  # tells flax_adapters this is a linear layer with kernel (in, out)

    @nn.compact
    def __call__(self, x):
      w = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], self.features))
      return x @ w

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return MyLinear(3, name='proj')(x)

  x = jax.random.normal(jax.random.key(0), (2, 5))
  params = Net().init(jax.random.key(1), x)['params']
  cfg = fa.TransferConfig(mode='lora', lora_rank=2, lora_targets=['proj'])
  adapted, p = fa.prepare_for_transfer(Net(), params, cfg, x)
  p = perturb(p, jax.random.key(2))
  chex.assert_trees_all_close(
    adapted.apply({'params': p}, x), Net().apply({'params': fa.materialize(p, adapted)}, x), atol=1e-5, rtol=0
  )
  # Without the declaration the same module is a block, and LoRA says how to fix it.
  assert fa.trace_model(Net(), x, kinds={'proj': 'block'}).sites[('proj',)].kind == 'block'
  with pytest.raises(ValueError, match="declare `adapter_kind = 'dense'`"):
    fa.prepare_for_transfer(Net(), params, cfg, x, kinds={'proj': 'block'})


def test_adapted_model_jits_and_matches_eager():
  model, params, x = net.make()
  cfg = fa.TransferConfig(mode=['lora', 'houlsby', 'ia3'], lora_rank=2)
  adapted, p = fa.prepare_for_transfer(model, params, cfg, jax.ShapeDtypeStruct(x.shape, x.dtype))
  p = perturb(p, jax.random.key(1))
  jitted = jax.jit(adapted.apply)({'params': p}, x)
  chex.assert_trees_all_close(jitted, adapted.apply({'params': p}, x), atol=1e-5, rtol=0)


def test_nnx_model_through_prepare_params_and_materialize():
  """A Flax NNX model: split its state, adapt the pure dict, merge it back for the forward."""

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(6, 16, rngs=rngs)
      self.fc2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      return self.fc2(jax.nn.relu(self.fc1(x)))

  model = MLP(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  base = nnx.to_pure_dict(state)
  cfg = fa.TransferConfig(
    mode=['lora', 'ia3'], lora_rank=2, lora_alpha=4, lora_targets=['fc1'], ia3_targets=['fc2'], ia3_ff_targets=['fc2']
  )
  adapted, p = fa.prepare_params(base, cfg, rng=jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (4, 6))

  def forward(p, x):
    s = nnx.clone(state)
    nnx.replace_by_pure_dict(s, fa.materialize(p, adapted))
    return nnx.merge(graphdef, s)(x)

  np.testing.assert_allclose(forward(p, x), model(x), atol=1e-6)
  p2 = perturb(p, jax.random.key(3))
  # The folded forward matches the same math written out by hand.
  a, b = p2['fc1']['lora_a'], p2['fc1']['lora_b']
  h = jax.nn.relu(x @ (p2['fc1']['kernel'] + (4 / 2) * a @ b) * 1 + p2['fc1']['bias'])
  expected = ((h * p2['fc2']['ia3_ff_scale']) @ p2['fc2']['kernel'] + p2['fc2']['bias']) * p2['fc2']['ia3_scale']
  np.testing.assert_allclose(forward(p2, x), expected, rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda p: jnp.sum(forward(p, x) ** 2))(p2)
  assert float(jnp.abs(g['fc1']['lora_a']).max()) > 0


def test_prepare_params_needs_hints_for_nd_kernels():
  params = {'conv': {'kernel': jnp.ones((3, 4, 8))}}
  with pytest.raises(
    ValueError, match=r"the kernel at 'conv' is 3-D \(3, 4, 8\); say what it is in `kinds`: \{'conv': 'conv'\}"
  ):
    fa.prepare_params(params, fa.TransferConfig(mode='locon', locon_targets=['conv'], locon_rank=2))
  adapted, p = fa.prepare_params(
    params, fa.TransferConfig(mode='locon', locon_targets=['conv'], locon_rank=2), kinds={'conv': 'conv'}
  )
  assert p['conv']['locon_down'].shape == (3, 4, 2) and p['conv']['locon_up'].shape == (1, 2, 8)
