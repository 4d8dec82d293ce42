"""Issue 10, item 1: a new adapter method defined here, in the test file only, works end to end.

`OutputBias` (a learned per-channel bias on a layer's output) is registered with
`fa.register_method`; no library file names it. It is placed by a rule and by a `TransferConfig`
mode, runs factored, starts as the identity (float64), merges exactly (it folds into the layer's
bias), trains alone, shows in the summary, survives an adapter checkpoint, and PEFT export refuses
it with the method's own words.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import linen as nn
from flax import traverse_util

import flax_adapters as fa
from flax_adapters.methods.base import broadcast_to
from tests.core import testnet as net
from tests.core.helpers import perturb


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutputBias(fa.Method):
  """`y + b`, one learned `b` per output feature, zeros at init."""

  name = 'out_bias'
  leaf_names = ('out_bias',)
  stage = 'output'
  kinds = ('dense', 'dense_general', 'conv')

  init_scale: float = 0.0

  def shapes(self, site):
    return {'out_bias': site.size(site.feature_out)}

  def layout(self, site):
    return {'out_bias': site.feature_out}

  def init(self, rng, site, dtype):
    return {'out_bias': self.init_scale * jax.random.normal(rng, self.shapes(site)['out_bias'], dtype)}

  def apply(self, site, leaves, x, y, call, rng=None):
    return y + broadcast_to(leaves['out_bias'].astype(y.dtype), site.feature_out, call.y)

  def fold(self, site, leaves, module_params):
    if 'bias' not in module_params:
      return None
    bias = module_params['bias']
    return {**module_params, 'bias': bias + broadcast_to(leaves['out_bias'], site.feature_out, site.bias)}

  def fold_refusal(self, site):
    return f'{site.name} has no bias to fold an output bias into'


@pytest.fixture(autouse=True, scope='module')
def registered():
  fa.register_method(OutputBias)
  yield
  fa.unregister_method('out_bias')


def _no_bias_net():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, use_bias=False, name='out')(nn.Dense(8, name='fc')(x))

  return Net()


def test_registration_refuses_clashes():
  @dataclasses.dataclass(frozen=True, kw_only=True)
  class Clash(OutputBias):
    name = 'other_bias'

  with pytest.raises(
    ValueError, match=r"Clash.leaf_names \['out_bias'\] are already used by \{'out_bias': 'OutputBias'\}"
  ):
    fa.register_method(Clash)
  with pytest.raises(ValueError, match="an adapter method named 'lora' is already registered"):
    fa.register_method(
      dataclasses.make_dataclass('L', [], bases=(OutputBias,), namespace={'name': 'lora'}, frozen=True)
    )
  with pytest.raises(TypeError, match='takes a subclass of flax_adapters.Method'):
    fa.register_method(object)
  # Base leaf names of other front ends (Haiku's w/b, NNX BatchNorm's statistics) are taken too: an
  # adapter leaf of that name would be read as a base param.
  for taken in ('w', 'mean'):

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Shadow(OutputBias):
      name = 'shadow'
      leaf_names = (taken,)

    with pytest.raises(
      ValueError, match=rf"Shadow.leaf_names \['{taken}'\] are already used by \{{'{taken}': 'base layers'\}}"
    ):
      fa.register_method(Shadow)


def test_placed_by_a_rule_and_by_a_config_mode():
  model, params, x = net.make()
  by_rule, p1 = fa.adapt(model, params, [fa.Rule(target='fc2', methods=OutputBias())], x)
  cfg = fa.TransferConfig(mode=['out_bias', 'lora'], options={'out_bias': {'targets': ['fc2']}}, lora_rank=2)
  by_config, p2 = fa.prepare_for_transfer(model, params, cfg, x)
  for adapted, p in ((by_rule, p1), (by_config, p2)):
    sites = {e.site.name: [m.name for m in e.methods] for e in adapted.plan}
    assert sites['blocks.0.mlp.fc2'] == ['out_bias'] and sites['blocks.1.mlp.fc2'] == ['out_bias']
    assert p['blocks_0']['mlp']['fc2']['out_bias'].shape == (net.D,)
  assert sites['blocks.0.mha.q_proj'] == ['lora']  # composed with a built-in method in one config
  assert 'out_bias' in fa.TransferConfig.known_modes()
  with pytest.raises(ValueError, match=r"`options\['out_bias'\]\['targets'\]` is empty but mode includes 'out_bias'"):
    fa.TransferConfig(mode='out_bias')
  with pytest.raises(TypeError, match=r"`options\['out_bias'\]` does not fit OutputBias"):
    fa.TransferConfig(mode='out_bias', options={'out_bias': {'targets': ['fc2'], 'rank': 3}})


class OutputBiasForwardTest(chex.TestCase):
  """The factored forward, jitted and not."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_identity_at_init_float64(self):
    with jax.enable_x64(True):
      model, params, x = net.make(jnp.float64)
      adapted, p = fa.adapt(model, params, {'fc2': OutputBias(), 'conv1d': OutputBias()}, x)
      forward = self.variant(lambda p, x: adapted.apply({'params': p}, x))
      chex.assert_trees_all_close(forward(p, x), model.apply({'params': params}, x), atol=1e-12, rtol=0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_trained_bias_is_added_per_channel(self):
    model, params, x = net.make()
    adapted, p = fa.adapt(model, params, {'conv1d': OutputBias(init_scale=0.5)}, x, rng=jax.random.key(3))
    b = p['conv1d']['out_bias']
    shifted = {**params, 'conv1d': {**params['conv1d'], 'bias': params['conv1d']['bias'] + b}}
    forward = self.variant(lambda p, x: adapted.apply({'params': p}, x))
    chex.assert_trees_all_close(forward(p, x), model.apply({'params': shifted}, x), atol=1e-5, rtol=1e-5)


def test_merge_is_exact_and_gives_the_base_tree():
  model, params, x = net.make()
  adapted, p = fa.adapt(model, params, {'fc2': OutputBias(), 'q_proj': fa.LoRA(rank=2)}, x)
  p = perturb(p, jax.random.key(1))
  served, merged = fa.merge_adapters(adapted, p)
  assert served is model
  chex.assert_trees_all_equal_shapes_and_dtypes(merged, params)
  chex.assert_trees_all_close(model.apply({'params': merged}, x), adapted.apply({'params': p}, x), atol=1e-5)
  with jax.enable_x64(True):
    model64, params64, x64 = net.make(jnp.float64)
    adapted64, p64 = fa.adapt(model64, params64, {'fc2': OutputBias()}, x64)
    p64 = perturb(p64, jax.random.key(2))
    served64, merged64 = fa.merge_adapters(adapted64, p64)
    chex.assert_trees_all_close(
      served64.apply({'params': merged64}, x64), adapted64.apply({'params': p64}, x64), atol=1e-10, rtol=0
    )


def test_without_a_bias_it_stays_and_materialize_says_why():
  model = _no_bias_net()
  x = jnp.ones((2, 4))
  params = model.init(jax.random.key(0), x)['params']
  adapted, p = fa.adapt(model, params, {'out': OutputBias()}, x)
  p = perturb(p, jax.random.key(1))
  served, merged = fa.merge_adapters(adapted, p)
  assert [m.name for e in served.plan for m in e.methods] == ['out_bias']
  chex.assert_trees_all_close(served.apply({'params': merged}, x), adapted.apply({'params': p}, x), atol=1e-6)
  with pytest.raises(ValueError, match=r"materialize cannot fold \['out_bias'\] at 'out' \(Dense\): out has no bias"):
    fa.materialize(p, adapted)


def test_trainable_mask_summary_and_training_step():
  model, params, x = net.make()
  cfg = fa.TransferConfig(mode='out_bias', options={'out_bias': {'targets': ['fc2']}}, unfreeze_norm=False)
  adapted, p = fa.prepare_for_transfer(model, params, cfg, x)
  mask = traverse_util.flatten_dict(fa.trainable_mask(adapted, p))
  assert {k for k, m in mask.items() if m and k[0] != 'heads'} == {
    (f'blocks_{i}', 'mlp', 'fc2', 'out_bias') for i in range(net.BLOCKS)
  }
  summary = fa.param_summary(adapted, p)
  assert summary['out_bias'].params == summary['out_bias'].trainable == net.BLOCKS * net.D
  assert [g.group for g in summary.groups][-1] == 'out_bias'  # after the base groups, like any method
  trainable, frozen = fa.partition(p, fa.trainable_mask(adapted, p))
  tx = optax.sgd(0.1)
  step = fa.make_train_step(
    lambda q, x: sum(jnp.sum(v**2) for v in adapted.apply({'params': q}, x).values()), tx, donate=False
  )
  new, _, _ = step(trainable, tx.init(trainable), frozen, x)
  assert float(jnp.abs(new['blocks_0']['mlp']['fc2']['out_bias']).max()) > 0


def test_adapter_checkpoint_round_trip(tmp_path):
  model, params, x = net.make()
  cfg = fa.TransferConfig(mode='out_bias', options={'out_bias': {'targets': ['fc2'], 'init_scale': 0.0}})
  adapted, p = fa.prepare_for_transfer(model, params, cfg, x)
  p = perturb(p, jax.random.key(5))
  path = fa.save_adapters(tmp_path / 'ckpt', adapted, p)
  restored_model, restored = fa.restore_transfer(path, model, params, x)
  chex.assert_trees_all_equal(restored, p)
  chex.assert_trees_all_close(
    restored_model.apply({'params': restored}, x), adapted.apply({'params': p}, x), atol=0, rtol=0
  )
  # A plan made by rules (no config) is rebuilt through the registry too.
  by_rule, q = fa.adapt(model, params, {'fc2': OutputBias()}, x)
  q = perturb(q, jax.random.key(6))
  path = fa.save_adapters(tmp_path / 'ckpt_rules', by_rule, q)
  _, restored = fa.restore_transfer(path, model, params, x)
  chex.assert_trees_all_equal(restored, q)


def test_peft_export_refuses_with_the_methods_words(tmp_path):
  from conversion.families import get_family  # conversion (torch) is a test extra
  from conversion.peft import export_peft
  from tests.conversion.test_gpt2 import tiny_gpt2

  family = get_family('gpt2')
  hf = tiny_gpt2(n_layer=1)
  config = family.config_from_hf(hf.config.to_dict())
  model, params = family.flax_model(config), family.torch_to_flax(hf.state_dict(), config)
  adapted, p = fa.adapt(model, params, {'c_fc': OutputBias()}, jnp.zeros((1, 8), jnp.int32))
  with pytest.raises(
    ValueError,
    match=r'export_peft cannot write this model as a PEFT adapter: transformer\.h\.0\.mlp\.c_fc has a out_bias '
    r'adapter, which PEFT has no format for\. Fix: keep it as a flax adapter checkpoint',
  ):
    export_peft(tmp_path / 'out', adapted, p)
  assert not (tmp_path / 'out').exists()
