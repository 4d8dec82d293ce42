"""Issue 3: every configuration of AlphaGenome's adapter guide, verbatim, on the reference model.

Only the call convention differs from the seed: `prepare_for_transfer(model, params, config, x)`
returns `(model, params)` instead of mutating a torch module.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import flax_adapters as fa
from flax_adapters.genomics.seq2func import Seq2Func, Seq2FuncConfig
from tests.adapter_guide import GUIDE, NEW

C = Seq2FuncConfig.tiny()
W, A, HM, NB, HH = C.width, C.num_heads * C.head_dim, C.mlp_ratio * C.width, C.num_blocks, C.head_hidden
INS = (C.stem_channels,) + C.down_channels[:-1]
OUTS = C.down_channels
K = C.conv_kernel

# The analytic trainable counts, written from the architecture (see seq2func.py's docstring).
NEW_HEAD = W * HH + HH + HH * 4 + 4
KEPT_HEAD = W * HH + HH + HH * 2 + 2  # the pretrained heads have 2 tracks; kept heads train too
NORMS = sum(INS) + sum(OUTS) + NB * 4 * W + 2 * W  # RMSNorm scales in the encoder; LayerNorms in the tower


def lora_qv(r):
  return NB * 2 * (r * W + r * A)


def locon_block(i, r):  # conv1: in_i -> out_i, conv2: out_i -> out_i; kernel K
  return (K * INS[i] * r + r * OUTS[i]) + (K * OUTS[i] * r + r * OUTS[i])


IA3_KV_FC2 = NB * (2 * A + HM)


def houlsby(features, latent, n):
  return n * (2 * features * latent + latent + features)


SEED_EXAMPLES = {  # the guide's configuration, the trainable count it must give on the reference model
  'linear': (GUIDE['linear'], NEW_HEAD + KEPT_HEAD),
  'lora': (GUIDE['lora'], NEW_HEAD + KEPT_HEAD + NORMS + lora_qv(8)),
  'lora+locon4': (
    GUIDE['lora+locon4'],
    NEW_HEAD + 2 * KEPT_HEAD + NORMS + lora_qv(8) + locon_block(4, 4) + locon_block(5, 4),
  ),
  'ia3': (GUIDE['ia3'], NEW_HEAD + 2 * KEPT_HEAD + NORMS + IA3_KV_FC2),
  'houlsby-block': (GUIDE['houlsby-block'], NEW_HEAD + 2 * KEPT_HEAD + NORMS + houlsby(W, 8, 2 * NB)),
  'houlsby-linear': (GUIDE['houlsby-linear'], NEW_HEAD + 2 * KEPT_HEAD + NORMS + houlsby(A, 8, 2 * NB)),
  'combined': (GUIDE['combined'], NEW_HEAD + KEPT_HEAD + NORMS + lora_qv(8) + locon_block(5, 4)),
}


@pytest.fixture(scope='module')
def pretrained():
  model = Seq2Func(C)  # heads atac, dnase, chip_tf
  x = jax.random.bernoulli(jax.random.key(0), 0.25, (4, C.seq_len, 4)).astype(jnp.float32)
  params = model.init(jax.random.key(1), x)['params']
  return model, params, x


def _train(adapted, params, x, steps=3):
  mask = fa.trainable_mask(adapted, params)
  trainable, frozen = fa.partition(params, mask)
  tx = optax.adam(1e-2)
  state = tx.init(trainable)
  target = jax.tree.map(lambda y: jnp.ones_like(y) * 2.0, adapted.apply({'params': params}, x))

  @jax.jit
  def step(t, s):
    def loss(t):
      out = adapted.apply({'params': fa.combine(t, frozen)}, x)
      return sum(jnp.mean((out[k] - target[k]) ** 2) for k in out)

    l, g = jax.value_and_grad(loss)(t)
    u, s = tx.update(g, s, t)
    return optax.apply_updates(t, u), s, l

  losses = []
  for _ in range(steps):
    trainable, state, l = step(trainable, state)
    losses.append(float(l))
  return fa.combine(trainable, frozen), losses


@pytest.mark.parametrize('name', list(SEED_EXAMPLES))
def test_seed_example_runs_trains_and_counts(pretrained, name):
  model, params, x = pretrained
  cfg_kwargs, expected = SEED_EXAMPLES[name]
  adapted, p = fa.prepare_for_transfer(model, params, fa.TransferConfig(**cfg_kwargs), x)
  assert fa.param_summary(adapted, p).trainable == expected
  assert 'my_atac' in adapted.apply({'params': p}, x)
  p2, losses = _train(adapted, p, x)
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  mask = traverse_util.flatten_dict(fa.trainable_mask(adapted, p))
  before, after = traverse_util.flatten_dict(p), traverse_util.flatten_dict(p2)
  for k in before:
    assert np.array_equal(before[k], after[k]) != mask[k], '/'.join(k)


@pytest.mark.parametrize(
  'preset,targets,n',
  [
    ('Locon2', ['down_blocks.5'], 2),
    ('Locon4', ['down_blocks.4', 'down_blocks.5'], 4),
    ('Locon6', ['down_blocks.3', 'down_blocks.4', 'down_blocks.5'], 6),
  ],
)
def test_locon_presets_create_exactly_n_adapters(pretrained, preset, targets, n):
  model, params, x = pretrained
  adapted, p = fa.prepare_for_transfer(model, params, fa.TransferConfig(mode='locon', locon_targets=targets), x)
  locon_sites = [e.site.path for e in adapted.plan if any(m.name == 'locon' for m in e.methods)]
  assert len(locon_sites) == n, preset
  assert all(s[-1] in ('conv1', 'conv2') and s[1] in {f'down_blocks_{t[-1]}' for t in targets} for s in locon_sites)


def test_trunk_is_bitwise_pretrained_after_head_surgery(pretrained):
  model, params, x = pretrained
  cfg = fa.TransferConfig(
    mode=['lora', 'locon'], locon_targets=['down_blocks.5'], remove_heads=['atac', 'dnase'], new_heads=NEW
  )
  adapted, p = fa.prepare_for_transfer(model, params, cfg, x)
  flat, flat0 = traverse_util.flatten_dict(p), traverse_util.flatten_dict(params)
  for k, v in flat0.items():
    if k[0] == 'heads' and k[1] in ('atac', 'dnase'):
      assert k not in flat
    else:
      np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(v))
      assert flat[k].dtype == v.dtype
  assert sorted(p['heads']) == ['chip_tf', 'my_atac']
  assert p['heads']['my_atac']['output']['kernel'].shape == (HH, 4)
  assert dict(adapted.base.heads)['my_atac'] == NEW['my_atac']


def test_merge_table(pretrained):
  """LoRA and IA3 fold; Locon on the plain stem conv folds; Locon on standardized convs and Houlsby stay."""
  model, params, x = pretrained
  cfg = fa.TransferConfig(
    mode=['lora', 'locon', 'ia3', 'houlsby'],
    locon_targets=['stem', 'down_blocks.5'],
    ia3_ff_targets=['fc2'],
    remove_heads=['atac'],
    new_heads=NEW,
  )
  adapted, p = fa.prepare_for_transfer(model, params, cfg, x)
  p, _ = _train(adapted, p, x, steps=3)
  served, merged = fa.merge_adapters(adapted, p)
  stays = {(fa.paths.dotted(e.site.path), m.name) for e in served.plan for m in e.methods}
  assert stays == {(f'encoder.down_blocks.5.{c}', 'locon') for c in ('conv1', 'conv2')} | {
    (f'tower.blocks.{b}.{s}', 'houlsby') for b in range(NB) for s in ('mha', 'mlp')
  }
  assert sorted(merged['tower']['blocks_0']['mha']['q_proj']) == ['kernel']
  assert sorted(merged['encoder']['stem']) == ['bias', 'kernel']
  out = served.apply({'params': merged}, x)
  ref = adapted.apply({'params': p}, x)
  for k in ref:
    np.testing.assert_allclose(out[k], ref[k], atol=1e-5)


def test_adapter_checkpoint_is_small_round_trips_and_refuses_another_base(tmp_path):
  """At the defaults (LoRA r=8 on q/v, unfrozen norms, a new head) on a ~3M-parameter model."""
  import orbax.checkpoint as ocp

  config = Seq2FuncConfig.small(down_channels=(64, 96, 128, 128, 192, 256), num_blocks=4, num_heads=8, head_dim=32)
  model = Seq2Func(config)
  x = model.dummy_input(2)
  params = jax.jit(model.init)(jax.random.key(0), x)['params']
  with ocp.StandardCheckpointer() as c:
    c.save(tmp_path / 'base', params)
  base_bytes = sum(f.stat().st_size for f in (tmp_path / 'base').rglob('*') if f.is_file())
  cfg = fa.TransferConfig(mode='lora', remove_heads=['atac'], new_heads=NEW)
  adapted, p = fa.prepare_for_transfer(model, params, cfg, x)
  p = jax.tree.map(lambda v: v + 0.01, p)  # stands for training
  path = fa.save_adapters(tmp_path / 'lora', adapted, p)
  ckpt_bytes = sum(f.stat().st_size for f in (tmp_path / 'lora').rglob('*') if f.is_file())
  assert ckpt_bytes < 0.05 * base_bytes, (ckpt_bytes, base_bytes)

  _, p2 = fa.restore_transfer(path, model, jax.tree.map(lambda v: v + 0.01, params), x)
  flat, flat2 = traverse_util.flatten_dict(p), traverse_util.flatten_dict(p2)
  for k, v in flat.items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(flat2[k]))
  with pytest.raises(ValueError, match='trained on different base weights'):
    fa.restore_transfer(path, model, params, x)
