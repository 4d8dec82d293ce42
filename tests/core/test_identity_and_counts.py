"""Issue 2, items 1-2: adapters start as the identity; trainable counts follow the formulas."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import flax_adapters as fa
from tests.core import testnet as net
from tests.core.helpers import COMBINATIONS, config, n_params

# Every combination at block placement, and the houlsby ones again at linear placement.
CASES = [(m, 'block') for m in [*COMBINATIONS, ('linear', 'lora', 'locon')]] + [
  (m, 'linear') for m in COMBINATIONS if 'houlsby' in m
]


class IdentityAtInitTest(chex.TestCase):
  """Zero-initialised B / up projections and unit IA3 scales make the start exact, jitted or not."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    with jax.enable_x64(True):
      cls.f64 = net.make(jnp.float64)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters((f'{"+".join(mode)}_{placement}', mode, placement) for mode, placement in CASES)
  def test_adapted_forward_equals_base_at_init_float64(self, mode, placement):
    model, params, x = self.f64
    with jax.enable_x64(True):
      targets = ['mha', 'mlp'] if placement == 'block' else ['q_proj', 'fc1', 'mix']
      cfg = config(mode, houlsby_placement=placement, houlsby_targets=targets)
      adapted, p = fa.prepare_for_transfer(model, params, cfg, x, rng=jax.random.key(7))
      if cfg.adapter_modes:
        assert adapted.plan, 'adapter modes must place adapters'
      assert all(l.dtype == jnp.float64 for l in jax.tree.leaves(p))
      forward = self.variant(lambda p, x: adapted.apply({'params': p}, x))
      # 1e-12 is float64 noise.
      chex.assert_trees_all_close(forward(p, x), model.apply({'params': params}, x), atol=1e-12, rtol=0)


# The analytic number of parameters each adapter adds on the test model (see testnet.py).
D, H, HD, B = net.D, net.H, net.HD, net.BLOCKS
HEADS = (D * 3 + 3) + (D * 2 + 2)
NORMS = 2 * net.CONV1_FEATURES + B * (2 * D + D) + 2 * D


def lora(r):  # q_proj, v_proj: D -> (H, HD); o_proj: (H, HD) -> D; mix: D -> D (Einsum)
  return B * 2 * (r * D + r * H * HD) + B * (r * H * HD + r * D) + (r * D + r * D)


def locon(r):  # conv1d: k=5, 4 -> 8; conv2d: 3x3, 1 -> 4
  return (5 * 4 * r + r * 8) + (3 * 3 * 1 * r + r * 4)


IA3 = B * 2 * H * HD + B * (2 * D + H * HD)  # k/v outputs; fc2 and o_proj inputs


def houlsby(latent, features, n):
  return n * (2 * features * latent + latent + features)


@pytest.mark.parametrize(
  'mode,expected',
  [
    ('linear', HEADS),
    ('lora', HEADS + NORMS + lora(2)),
    ('locon', HEADS + NORMS + locon(3)),
    ('ia3', HEADS + NORMS + IA3),
    ('houlsby', HEADS + NORMS + houlsby(8, D, 2 * B)),
    (('lora', 'locon', 'ia3', 'houlsby'), HEADS + NORMS + lora(2) + locon(3) + IA3 + houlsby(8, D, 2 * B)),
    (('linear', 'ia3'), HEADS + NORMS + IA3),
  ],
  ids=lambda m: '+'.join(m) if isinstance(m, tuple) else str(m),
)
def test_trainable_counts_match_formulas(mode, expected):
  model, params, x = net.make()
  adapted, p = fa.prepare_for_transfer(model, params, config(mode), x)
  summary = fa.param_summary(adapted, p)
  assert summary.trainable == expected
  assert summary.total == n_params(params) + summary.trainable - HEADS - (NORMS if mode != 'linear' else 0)


def test_counts_per_group_and_unfreeze_norm_off():
  model, params, x = net.make()
  cfg = config('lora', unfreeze_norm=False, lora_rank=4)
  adapted, p = fa.prepare_for_transfer(model, params, cfg, x)
  s = fa.param_summary(adapted, p)
  assert s['lora'].trainable == lora(4)
  assert s['norms'].params == 0 and s['heads'].trainable == HEADS
  assert s.trainable == HEADS + lora(4)
  assert 'lora' in str(s) and 'total' in str(s)


def test_houlsby_linear_placement_count():
  model, params, x = net.make()
  cfg = config('houlsby', houlsby_placement='linear', houlsby_targets=['q_proj'], houlsby_latent_dim=4)
  adapted, p = fa.prepare_for_transfer(model, params, cfg, x)
  # q_proj outputs (H, HD): the bottleneck reads all H*HD features.
  assert fa.param_summary(adapted, p)['houlsby'].trainable == houlsby(4, H * HD, B)
  assert p['blocks_0']['mha']['q_proj']['houlsby_down'].shape == (H, HD, 4)


def test_full_trains_everything_and_adds_nothing():
  model, params, x = net.make()
  adapted, p = fa.prepare_for_transfer(model, params, fa.TransferConfig(mode='full'), x)
  mask = fa.trainable_mask(adapted, p)
  assert all(jax.tree.leaves(mask))
  assert n_params(p) == n_params(params)
  assert all(a is b for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params)))


def test_lora_init_distribution():
  model, params, x = net.make()
  adapted, p = fa.prepare_for_transfer(model, params, config('lora', lora_rank=2), x)
  a = np.asarray(p['blocks_0']['mha']['q_proj']['lora_a'])
  assert a.shape == (D, 2)
  assert np.abs(a).max() <= 1 / np.sqrt(D) and np.abs(a).max() > 0.5 / np.sqrt(D)
  assert not np.any(np.asarray(p['blocks_0']['mha']['q_proj']['lora_b']))
  # Multi-axis input (o_proj contracts (H, HD)): A keeps the input axes.
  assert p['blocks_0']['mha']['o_proj']['lora_a'].shape == (H, HD, 2)
  assert p['blocks_0']['mha']['v_proj']['lora_b'].shape == (2, H, HD)
