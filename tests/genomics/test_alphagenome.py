"""AlphaGenome in Flax at a tiny width: outputs, module paths and kinds, heads, every seed configuration, training.

The comparison with the PyTorch port at real width is in test_alphagenome_port.py; here our own code
is tested fast. Models are compiled with `jax.jit` (one program per model: eager first calls compile
hundreds of small programs).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import flax_adapters as fa
from flax_adapters.genomics.alphagenome import AlphaGenome, AlphaGenomeConfig, random_variables
from flax_adapters.genomics.alphagenome.heads import predictions_scaling, splice_site_positions, targets_scaling
from flax_adapters.paths import dotted
from tests.adapter_guide import GUIDE, NEW

C = AlphaGenomeConfig.tiny()
MODEL = AlphaGenome(C)
W, Q, V, NB = C.trunk_width, C.num_heads * C.qk_dim, C.v_dim, C.num_blocks
PAIR_BLOCKS = (NB + 1) // 2


@functools.partial(
  jax.jit, static_argnums=0, static_argnames=('output_heads', 'resolutions', 'return_scaled_predictions')
)
def run(model, variables, dna, organism, **kw):
  """`model.apply` compiled once per (model, options): models are static (linen modules hash by value)."""
  return model.apply(variables, dna, organism, **kw)


@pytest.fixture(scope='module')
def tiny():
  variables = random_variables(MODEL, seed=0)
  dna = jax.nn.one_hot(jax.random.randint(jax.random.key(1), (2, 2 * C.min_length), 0, 4), 4)
  organism = jnp.array([0, 1])
  return variables, dna, organism, run(MODEL, variables, dna, organism)


# -- outputs -----------------------------------------------------------------------------------


def test_every_head_has_the_ports_output_structure(tiny):
  variables, dna, organism, out = tiny
  length, pairs = dna.shape[1], dna.shape[1] // C.min_length
  for name, tracks in C.track_heads:
    res = (128,) if name.startswith('chip') else (1, 128)
    assert {r: out[name][r].shape for r in res} == {r: (2, length // r, tracks) for r in res}, name
    assert all(bool((out[name][r] >= 0).all()) for r in res)  # softplus, scaled by positive means
  assert out['contact_maps'].shape == (2, pairs, pairs, C.contact_map_tracks)
  sites = out['splice_sites']
  assert sites['logits'].shape == (2, length, 5)
  np.testing.assert_allclose(np.asarray(sites['probs']).sum(-1), 1.0, rtol=1e-5)
  usage = out['splice_site_usage']
  assert usage['predictions'].shape == (2, length, max(C.splice_usage_tracks))
  # The mask marks each organism's real tracks (4 human, 2 mouse here) among the padded ones.
  assert np.asarray(usage['track_mask'])[:, 0].sum(-1).tolist() == list(C.splice_usage_tracks)
  junctions = out['splice_junctions']
  k, tissues = C.splice_top_k, max(C.splice_junction_tracks)
  assert junctions['pred_counts'].shape == (2, k, k, 2 * tissues)
  positions = np.asarray(junctions['splice_site_positions'])
  valid = positions[positions >= 0]
  assert positions.shape == (2, 4, k) and valid.size and valid.max() < length
  for row in positions.reshape(-1, k):  # sorted, padding (-1) last
    kept = row[row >= 0]
    assert (np.diff(kept) > 0).all() and (row[len(kept) :] == -1).all()
  counts, mask = np.asarray(junctions['pred_counts']), np.asarray(junctions['splice_junction_mask'])
  assert (counts[~mask] == 0).all() and (counts[mask] > 0).all()
  assert mask[1, ..., C.splice_junction_tracks[1] : tissues].sum() == 0  # mouse has 2 of 3 tissues


def test_the_organism_changes_only_its_example(tiny):
  variables, dna, organism, out = tiny
  other = run(MODEL, variables, dna, jnp.array([0, 0]))
  np.testing.assert_array_equal(other['atac'][128][0], out['atac'][128][0])
  assert not np.allclose(other['atac'][128][1], out['atac'][128][1])


def test_output_heads_resolutions_and_scaled_predictions(tiny):
  variables, dna, organism, out = tiny
  heads = ('rna_seq', 'chip_tf', 'splice_junctions')
  scaled = run(MODEL, variables, dna, organism, output_heads=heads, return_scaled_predictions=True)
  assert set(scaled) == set(heads)  # the junctions' sites come from splice_sites, run but not returned (as the port)
  np.testing.assert_array_equal(
    scaled['splice_junctions']['splice_site_positions'], out['splice_junctions']['splice_site_positions']
  )
  means = variables['buffers']['heads']['rna_seq']['track_means'][organism]
  for r in (1, 128):  # rna_seq is squashed: experimental = (clip^-1(scaled)) ** (1/0.75) * means * resolution
    want = out['rna_seq'][r]  # another compiled program: float32 rounding differs, and the power amplifies it
    np.testing.assert_allclose(
      predictions_scaling(scaled['rna_seq'][r], means, r, True), want, rtol=1e-4, atol=1e-6 * np.abs(want).max()
    )
  coarse = run(MODEL, variables, dna, organism, resolutions=(128,))
  assert set(coarse) == {name for name, _ in C.track_heads} | {'contact_maps'}  # the splice heads need 1 bp
  assert all(set(coarse[n]) == {128} for n, _ in C.track_heads)
  np.testing.assert_allclose(
    coarse['atac'][128], out['atac'][128], rtol=1e-5, atol=1e-6 * np.abs(out['atac'][128]).max()
  )


def test_bfloat16_compute_with_float32_params(tiny):
  """dtype=bfloat16 computes the trunk in bfloat16 (logits come out bfloat16); track outputs are float32 (scales)."""
  variables, dna, organism, _ = tiny
  model = AlphaGenome(C, dtype=jnp.bfloat16)
  out = jax.eval_shape(model.apply, variables, dna.astype(jnp.bfloat16), organism)
  assert out['splice_sites']['logits'].dtype == out['contact_maps'].dtype == jnp.bfloat16
  assert out['atac'][128].dtype == jnp.float32
  assert (
    jax.eval_shape(model.init, jax.random.key(0), dna)['params']['tower']['blocks_0']['mha']['q_proj']['kernel'].dtype
    == jnp.float32
  )


def test_targets_scaling_inverts_predictions_scaling():
  x = jnp.asarray(np.random.default_rng(0).uniform(0, 30, (2, 5, 3)))
  means = jnp.asarray([[1.0, 2.0, 0.5], [3.0, 1.0, 1.5]])
  for squashed in (False, True):
    back = targets_scaling(predictions_scaling(x, means, 128, squashed), means, 128, squashed)
    np.testing.assert_allclose(back, x, rtol=1e-5)


def test_splice_site_positions_threshold_and_order():
  probs = np.full((1, 8, 5), 0.01, np.float32)
  probs[0, [6, 2, 4], 0] = [0.9, 0.5, 0.05]  # the third is below the 0.1 threshold
  positions = np.asarray(splice_site_positions(jnp.asarray(probs), 3, 0.1))
  assert positions[0, 0].tolist() == [2, 6, -1]
  assert (positions[0, 1:] == -1).all()


def test_bad_inputs_are_refused_by_name(tiny):
  variables, dna, _, _ = tiny
  shape = functools.partial(jax.eval_shape, MODEL.apply, variables)
  with pytest.raises(ValueError, match=r'`dna` length must be a multiple of 512'):
    shape(dna[:, :500])
  with pytest.raises(ValueError, match=r'`dna` must be one-hot DNA of shape \(batch, length, 4\)'):
    shape(dna[..., :3])
  with pytest.raises(TypeError, match=r'`dna` must be a floating one-hot array'):
    shape(dna.astype(jnp.int32))
  with pytest.raises(ValueError, match=r'`organism_index` must be integers of shape \(batch,\)'):
    shape(dna, jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match=r"`output_heads` names \['atacc'\]"):
    jax.eval_shape(functools.partial(MODEL.apply, output_heads=['atacc']), variables, dna)
  junctions_only = MODEL.clone(heads={'splice_junctions': MODEL.heads['splice_junctions']})
  v = jax.eval_shape(junctions_only.init, jax.random.key(0), dna)
  with pytest.raises(ValueError, match=r'the model has no splice_sites head. Fix: pass splice_site_positions'):
    jax.eval_shape(junctions_only.apply, v, dna)
  with pytest.raises(ValueError, match=r'`heads\[.x.\]\["modality"\]` is .atak.'):
    AlphaGenome(C, heads={'x': {'modality': 'atak', 'num_tracks': 2}})
  with pytest.raises(ValueError, match=r'must be a non-empty subset of \[1, 128\]'):
    AlphaGenome(C, heads={'x': {'modality': 'atac', 'num_tracks': 2, 'resolutions': [64]}})


# -- module paths and kinds ----------------------------------------------------------------------


@pytest.fixture(scope='module')
def sites(tiny):
  _, dna, organism, _ = tiny
  return {dotted(p): s for p, s in fa.trace_model(MODEL, dna, organism).sites.items()}


def test_the_seed_targets_name_the_ports_modules(sites):
  """The paths the adapter guide and the port use, with the kinds the port's classes have."""
  conv = sites['encoder.down_blocks.4.block1.conv']
  assert (conv.kind, conv.module_type, conv.mergeable) == ('conv', 'StandardizedConv1d', False)
  assert (
    sites['decoder.up_blocks.0.pointwise.conv'].kind == 'conv' and sites['decoder.up_blocks.0.pointwise.conv'].mergeable
  )
  for path in (
    'tower.blocks.0.mha.q_proj',
    'tower.blocks.0.mha.k_proj',
    'tower.blocks.0.mha.v_proj',
    'tower.blocks.0.mlp.fc1',
  ):
    assert sites[path].kind == 'dense', path
  assert sites['tower.blocks.0.mha.q_proj'].kernel_shape == (W, Q)
  assert sites['tower.blocks.0.mha.v_proj'].kernel_shape == (W, V)  # one shared value head
  for path in (
    'tower.blocks.0.mha',
    'tower.blocks.0.mlp',
    'tower.blocks.0.pair_update.row_attn',
    'decoder.up_blocks.0.conv_in',
    'heads.atac.convs.1',
  ):
    assert sites[path].kind == 'block', path
  assert 'tower.blocks.1.pair_update' not in sites  # the pair stack runs on even blocks
  norms = {p for p, s in sites.items() if s.kind == 'norm'}
  assert {'encoder.down_blocks.0.block1.norm', 'tower.blocks.0.mha.norm_q', 'embedder_pair.norm'} <= norms
  assert all(re.search(r'norm(_q|_k|_v|_seq2pair)?$', p) for p in norms)


@pytest.mark.parametrize(
  'targets,n',
  [
    (['down_blocks.5'], 2),
    (['down_blocks.4', 'down_blocks.5'], 4),
    (['down_blocks.3', 'down_blocks.4', 'down_blocks.5'], 6),
  ],
)
def test_locon_presets_select_the_standardized_convs(tiny, targets, n):
  variables, dna, organism, _ = tiny
  adapted, _ = fa.prepare_for_transfer(
    MODEL, variables['params'], fa.TransferConfig(mode='locon', locon_targets=targets), dna, organism
  )
  assert sorted(dotted(e.site.path) for e in adapted.plan) == sorted(
    f'encoder.{t}.{b}.conv' for t in targets for b in ('block1', 'block2')
  )
  assert len(adapted.plan) == n


# -- the seed's configurations -------------------------------------------------------------------


def lora(r):
  return NB * (r * (W + Q) + r * (W + V))


def locon(block, r):
  widths = C.encoder_widths
  k, cin, cout = C.conv_kernel, widths[block], widths[block + 1]
  return (k * cin * r + r * cout) + (k * cout * r + r * cout)


def houlsby(features, latent=8):
  return 2 * features * latent + latent + features


# (config verbatim from the adapter guide, the adapters it adds at this width)
SEED = {
  'linear': (GUIDE['linear'], 0),
  'lora': (GUIDE['lora'], lora(8)),
  'locon4': (GUIDE['lora+locon4'], lora(8) + locon(4, 4) + locon(5, 4)),
  'ia3': (GUIDE['ia3'], NB * (C.qk_dim + V + C.mlp_ratio * W)),
  # 'mlp' also matches the pair stack's `pair_update.pair_mlp` (see test_alphagenome_port.py).
  'houlsby-block': (GUIDE['houlsby-block'], 2 * NB * houlsby(W) + PAIR_BLOCKS * houlsby(C.pair_width)),
  'houlsby-linear': (GUIDE['houlsby-linear'], NB * (houlsby(Q) + houlsby(V))),
  'combined': (GUIDE['combined'], lora(8) + locon(5, 4)),
}


def count(tree) -> int:
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('name', list(SEED))
def test_seed_configuration_counts_runs_and_merges(tiny, name):
  variables, dna, organism, _ = tiny
  kwargs, adapters = SEED[name]
  config = fa.TransferConfig(**kwargs)
  adapted, params = fa.prepare_for_transfer(MODEL, variables['params'], config, dna, organism, rng=jax.random.key(2))
  heads = count(params['heads'])
  norms = 0
  if config.unfreeze_norm and config.adapter_modes:  # scale and bias of every norm; running variances are buffers
    sites = fa.trace_model(adapted.base, dna, organism).sites
    norms = sum(int(np.prod(shape)) for s in sites.values() if s.kind == 'norm' for _, shape, _ in s.leaves)
  assert fa.param_summary(adapted, params).trainable == heads + norms + adapters
  assert 'atac' not in params['heads'] and params['heads']['my_atac']['convs_1']['kernel'].shape == (1, W, 4)

  buffers = adapted.base.buffers_for(variables['buffers'])
  np.testing.assert_array_equal(buffers['heads']['my_atac']['track_means'], np.ones((1, 4)))
  # Non-zero adapter values everywhere, so the forward and the merge are exercised.
  params = jax.tree_util.tree_map_with_path(
    lambda p, x: (
      x + 0.05 * jax.random.normal(jax.random.key(len(p)), x.shape) if p[-1].key in fa.methods.LEAF_NAMES else x
    ),
    params,
  )
  # The 128 bp outputs see every adapter of these configurations (tower and encoder) and skip the decoder.
  fast = dict(output_heads=('my_atac', 'chip_tf'), resolutions=(128,))
  out = run(adapted, {'params': params, 'buffers': buffers}, dna, organism, **fast)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(out))
  served, merged = fa.merge_adapters(adapted, params)
  if served is adapted or (isinstance(served, fa.AdaptedModel) and served.plan == adapted.plan):
    return  # nothing folded (linear, Houlsby): the model is unchanged
  merged_out = run(served, {'params': merged, 'buffers': buffers}, dna, organism, **fast)
  for a, b in zip(jax.tree.leaves(merged_out), jax.tree.leaves(out)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


def test_houlsby_block_mlp_target_also_matches_the_pair_mlp_and_a_regex_does_not(tiny):
  """The port wraps only `tower.blocks[i]['mha'|'mlp']`; our substring 'mlp' also finds `pair_update.pair_mlp`."""
  variables, dna, organism, _ = tiny
  plan = lambda targets: sorted(
    dotted(e.site.path)
    for e in fa.prepare_for_transfer(
      MODEL, variables['params'], fa.TransferConfig(mode='houlsby', houlsby_targets=targets), dna, organism
    )[0].plan
  )
  assert [p for p in plan(['mha', 'mlp']) if 'pair' in p] == [
    'tower.blocks.0.pair_update.pair_mlp',
    'tower.blocks.2.pair_update.pair_mlp',
  ]
  assert plan([r're:tower\.blocks\.\d+\.(mha|mlp)']) == [
    f'tower.blocks.{b}.{s}' for b in range(NB) for s in ('mha', 'mlp')
  ]


# -- heads protocol ------------------------------------------------------------------------------


def test_head_surgery_changes_only_the_heads_and_buffers_follow(tiny):
  variables, dna, _, _ = tiny
  other = MODEL.clone(heads={'my_atac': NEW['my_atac'], 'chip_tf': MODEL.heads['chip_tf']})
  shapes = lambda m: traverse_util.flatten_dict(jax.eval_shape(m.init, jax.random.key(0), dna))
  a, b = shapes(MODEL), shapes(other)
  trunk = lambda s: {k: v.shape for k, v in s.items() if k[1] != 'heads'}
  assert trunk(a) == trunk(b)
  buffers = other.buffers_for(variables['buffers'])
  assert sorted(buffers['heads']) == ['chip_tf', 'my_atac']
  np.testing.assert_array_equal(
    buffers['heads']['chip_tf']['track_means'], variables['buffers']['heads']['chip_tf']['track_means']
  )
  v = {'params': jax.eval_shape(other.init, jax.random.key(0), dna)['params'], 'buffers': variables['buffers']}
  with pytest.raises(ValueError, match=r"buffers\['heads'\]\['my_atac'\]\['track_means'\] is missing.*buffers_for"):
    jax.eval_shape(other.apply, v, dna)


# -- training ------------------------------------------------------------------------------------


def test_lora_trains_with_make_train_step(tiny):
  variables, dna, organism, _ = tiny
  config = fa.TransferConfig(mode='lora', remove_heads=['atac'], new_heads=NEW)
  adapted, params = fa.prepare_for_transfer(MODEL, variables['params'], config, dna, organism)
  buffers = adapted.base.buffers_for(variables['buffers'])
  target = jnp.ones((2, dna.shape[1] // 128, 4))

  def loss_fn(p, dna, organism, target):
    out = adapted.apply(
      {'params': p, 'buffers': buffers},
      dna,
      organism,
      output_heads=['my_atac'],
      resolutions=[128],
      return_scaled_predictions=True,
    )
    return jnp.mean((out['my_atac'][128] - target) ** 2)

  tx = optax.adam(1e-2)
  trainable, frozen = fa.partition(params, fa.trainable_mask(adapted, params))
  opt_state = tx.init(trainable)
  step = fa.make_train_step(loss_fn, tx, donate=False)
  losses = []
  for _ in range(4):
    trainable, opt_state, loss = step(trainable, opt_state, frozen, dna, organism, target)
    losses.append(float(loss))
  assert losses[-1] < losses[0], losses
  trained = traverse_util.flatten_dict(trainable)
  assert any(k[-1] == 'lora_b' and np.abs(v).max() > 0 for k, v in trained.items() if v is not None)
