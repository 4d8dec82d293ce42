"""Issue 2, item 6: each bad input raises a clear error that names the problem and the fix."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

import flax_adapters as fa
from tests.core import testnet as net


@pytest.fixture(scope='module')
def setup():
  return net.make()


def prepare(setup, **cfg):
  model, params, x = setup
  return fa.prepare_for_transfer(model, params, fa.TransferConfig(**cfg), x)


def test_unknown_mode():
  with pytest.raises(ValueError, match=r"`mode` 'loraa' is unknown; expected one of \['linear', 'full', 'lora'"):
    fa.TransferConfig(mode='loraa')


def test_full_with_another_mode():
  with pytest.raises(
    ValueError, match=r"`mode` 'full' trains every weight and cannot be combined .*\['full', 'lora'\]"
  ):
    fa.TransferConfig(mode=['full', 'lora'])


def test_locon_without_targets():
  with pytest.raises(ValueError, match=r"`locon_targets` is empty but mode includes 'locon'.*down_blocks"):
    fa.TransferConfig(mode='locon')


def test_bad_houlsby_placement():
  with pytest.raises(ValueError, match=r"`houlsby_placement` must be one of \['block', 'linear'\], found 'blok'"):
    fa.TransferConfig(mode='houlsby', houlsby_placement='blok')


@pytest.mark.parametrize(
  'kw,match',
  [
    (dict(lora_rank=0), '`lora_rank` must be a positive integer, found 0'),
    (dict(lora_alpha=-1), '`lora_alpha` must be a positive number, found -1'),
    (dict(lora_targets='q_proj', mode=['lora', 'lora']), '`mode` lists a mode twice'),
    (dict(lora_targets=['q', 'q']), r"`lora_targets` lists \['q'\] more than once"),
    (dict(lora_targets=['re:(']), r"`lora_targets` entry 're:\(' is not a valid regex"),
    (dict(new_heads={'x': {'modality': 'atac'}}), r"`new_heads\['x'\]` lacks \['num_tracks'\]"),
    (dict(new_heads={'x': {'modality': 'atac', 'num_tracks': 0}}), 'num_tracks.*must be a positive integer'),
    (dict(keep_heads=['a'], remove_heads=['a']), r"`keep_heads` and `remove_heads` both name \['a'\]"),
    (dict(lora_targets=[3]), '`lora_targets` entries must be non-empty strings'),
  ],
)
def test_config_validation(kw, match):
  with pytest.raises((ValueError, TypeError), match=match):
    fa.TransferConfig(**{'mode': 'lora', **kw})


def test_target_matching_nothing_lists_near_misses(setup):
  with pytest.raises(
    ValueError,
    match=r"`lora_targets` entry 'q_prj' matches no module\. Nearest module paths: \[.*blocks\.0\.mha\.q_proj",
  ):
    prepare(setup, mode='lora', lora_targets=['q_prj'])


def test_lora_rank_larger_than_layer(setup):
  with pytest.raises(
    ValueError,
    match=r'`lora_rank`=20 is larger than blocks\.0\.mha\.q_proj \(DenseGeneral, dense_general\) allows: .*at most 16\. Lower `lora_rank`',
  ):
    prepare(setup, mode='lora', lora_rank=20)


def test_locon_on_a_dense_layer(setup):
  with pytest.raises(
    ValueError,
    match=r"Locon adapts convolutions .* but blocks\.0\.mha\.q_proj \(DenseGeneral, dense_general\) is not one\. Use 'lora'",
  ):
    prepare(setup, mode='locon', locon_targets=['q_proj'])


def test_locon_on_grouped_conv(setup):
  with pytest.raises(ValueError, match=r'Locon cannot adapt grouped convolution grouped_conv .*feature_group_count=2'):
    prepare(setup, mode='locon', locon_targets=['grouped_conv'])


def test_lora_on_a_conv_points_to_locon(setup):
  with pytest.raises(
    ValueError, match=r"LoRA targets linear layers, but conv1d \(Conv, conv\) is a convolution; .*add 'locon'"
  ):
    prepare(setup, mode='lora', lora_targets=['conv1d'])


def test_houlsby_block_placement_on_a_layer(setup):
  with pytest.raises(
    ValueError, match=r"Houlsby at placement 'block' wraps sub-blocks .* Use houlsby_placement='linear'"
  ):
    prepare(setup, mode='houlsby', houlsby_targets=['fc1'])


def test_same_adapter_twice_on_one_layer(setup):
  with pytest.raises(
    ValueError,
    match=r"lora would be added twice to blocks\.0\.mha\.q_proj: both 'q_proj' and 'mha\.q' in `lora_targets`",
  ):
    prepare(setup, mode='lora', lora_targets=['q_proj', 'mha.q'])


def test_params_that_do_not_fit_the_model(setup):
  model, params, x = setup
  bad = {**params, 'stem_proj': {'kernel': jnp.ones((3, 3)), 'bias': params['stem_proj']['bias']}}
  with pytest.raises(
    ValueError,
    match=r'`params` does not fit the model: wrong shape 1: stem_proj/kernel: expected \(32, 16\), found \(3, 3\)',
  ):
    fa.prepare_for_transfer(model, bad, fa.TransferConfig(mode='lora'), x)
  missing = {k: v for k, v in params.items() if k != 'mix'}
  with pytest.raises(ValueError, match=r'`params` does not fit the model: missing 2: mix/bias, mix/kernel'):
    fa.prepare_for_transfer(model, missing, fa.TransferConfig(mode='lora'), x)
  with pytest.raises(TypeError, match=r"looks like a variables dict .* variables\['params'\]"):
    fa.prepare_for_transfer(model, {'params': params}, fa.TransferConfig(mode='lora'), x)


def test_adapted_params_with_the_base_model_are_refused(setup):
  model, params, x = setup
  adapted, p = fa.prepare_for_transfer(model, params, fa.TransferConfig(mode='lora'), x)
  other, _ = fa.prepare_for_transfer(model, params, fa.TransferConfig(mode='ia3'), x)
  with pytest.raises(
    ValueError,
    match=r"params at 'blocks\.0\.mha\.q_proj' hold adapter leaves \['lora_a', 'lora_b'\] that this model does not run",
  ):
    other.apply({'params': p}, x)
  with pytest.raises(ValueError, match=r"params at 'blocks\.0\.mha\.k_proj' lack the adapter leaves \['ia3_scale'\]"):
    other.apply({'params': params}, x)
  with pytest.raises(ValueError, match='already holds adapter leaves'):
    fa.prepare_for_transfer(model, p, fa.TransferConfig(mode='lora'), x)


def test_head_surgery_errors(setup):
  with pytest.raises(
    ValueError,
    match=r"`remove_heads` names head\(s\) \['chip'\] that the model does not have; its heads are \['atac', 'dnase'\]",
  ):
    prepare(setup, mode='linear', remove_heads=['chip'])
  with pytest.raises(ValueError, match=r"`new_heads` \['atac'\] already exist"):
    prepare(setup, mode='linear', new_heads={'atac': {'modality': 'atac', 'num_tracks': 1}})
  x = jnp.ones((1, 4))
  dense = nn.Dense(2)
  with pytest.raises(TypeError, match='need a model with a `heads` field, but Dense has none'):
    fa.prepare_for_transfer(
      dense,
      dense.init(jax.random.key(0), x)['params'],
      fa.TransferConfig(new_heads={'a': {'modality': 'x', 'num_tracks': 1}}),
      x,
    )


def test_linear_mode_with_nothing_to_train():
  x = jnp.ones((1, 4))
  dense = nn.Dense(2)
  with pytest.raises(ValueError, match="mode 'linear' trains the heads only, but the model has no heads"):
    fa.prepare_for_transfer(dense, dense.init(jax.random.key(0), x)['params'], fa.TransferConfig(), x)


def test_bad_arguments(setup):
  model, params, x = setup
  with pytest.raises(TypeError, match='`config` must be a TransferConfig'):
    fa.prepare_for_transfer(model, params, {'mode': 'lora'}, x)
  with pytest.raises(TypeError, match='needs example inputs to trace the model'):
    fa.prepare_for_transfer(model, params, fa.TransferConfig(mode='lora'))
  adapted, p = fa.prepare_for_transfer(model, params, fa.TransferConfig(mode='lora'), x)
  with pytest.raises(TypeError, match=re.escape("`variables` must be a dict with a 'params' collection")):
    adapted.apply(p, x)


# -- issue 9: values that would silently give NaN, hang, or fail late are refused where written ------


@pytest.mark.parametrize('value', [float('nan'), float('inf'), -float('inf')])
def test_non_finite_alpha_is_refused_in_config_and_method(value):
  with pytest.raises(ValueError, match=r'`lora_alpha` must be a (finite )?positive'):
    fa.TransferConfig(mode='lora', lora_alpha=value)
  with pytest.raises(ValueError, match=r'`locon_alpha` must be a (finite )?positive'):
    fa.TransferConfig(mode='locon', locon_targets=['conv1d'], locon_alpha=value)
  with pytest.raises(ValueError, match=r'`alpha` must be a finite positive number'):
    fa.LoRA(alpha=value)
  with pytest.raises(ValueError, match=r'`alpha` must be a finite positive number'):
    fa.Locon(alpha=value)


@pytest.mark.parametrize('rank', [0, -2, 2.5, True])
def test_bad_method_ranks_are_refused_at_construction(rank):
  with pytest.raises(ValueError, match=rf'`rank` must be a positive integer, found {rank!r}'):
    fa.LoRA(rank=rank)
  with pytest.raises(ValueError, match=rf'`rank` must be a positive integer, found {rank!r}'):
    fa.Locon(rank=rank)


def test_bad_method_options_are_refused_at_construction():
  with pytest.raises(ValueError, match=r'`dropout` must be a number in \[0, 1\), found 1.5'):
    fa.LoRA(dropout=1.5)
  with pytest.raises(ValueError, match=r"`placement` must be one of \['block', 'linear'\], found 'blok'"):
    fa.Houlsby(placement='blok')
  with pytest.raises(ValueError, match=r'`latent_dim` must be a positive integer, found 0'):
    fa.Houlsby(latent_dim=0)
  with pytest.raises(TypeError, match=r'LoRA.__init__\(\) takes 1 positional argument'):
    fa.LoRA(8)  # keyword-only, like qwix's rules: LoRA(rank=8)


def test_huge_houlsby_latent_dim_fails_before_allocating(setup):
  with pytest.raises(
    ValueError, match=r'`houlsby_latent_dim`=10000000000 is larger than the 16 output features of blocks\.0\.mha'
  ):
    prepare(setup, mode='houlsby', houlsby_latent_dim=10**10)


@pytest.mark.parametrize('dtype', ['foo', 'int32', 3])
def test_bad_adapter_dtype_is_refused_in_config(dtype):
  with pytest.raises(TypeError, match='`adapter_dtype` must be a floating dtype'):
    fa.TransferConfig(mode='lora', adapter_dtype=dtype)


def test_linear_mode_with_every_head_removed(setup):
  with pytest.raises(
    ValueError,
    match=r"mode 'linear' trains the heads only, but no head is left after `remove_heads`/`keep_heads` and "
    r'`modules_to_save` is empty, so nothing would train',
  ):
    prepare(setup, mode='linear', remove_heads=['atac', 'dnase'])
  adapted, p = prepare(setup, mode='lora', remove_heads=['atac', 'dnase'])  # adapters still train: fine
  assert adapted.plan and p['heads'] == {}


def test_rules_that_match_nothing_are_reported_together(setup):
  model, params, x = setup
  rules = [
    fa.Rule(target='q_prj', methods=fa.LoRA(rank=2)),
    fa.Rule(target='q_proj', methods=fa.LoRA(rank=2)),
    fa.Rule(target='fc9', methods=fa.IA3()),
  ]
  with pytest.raises(
    ValueError,
    match=r"`rules\[0\]` entry 'q_prj' matches no module\. Nearest module paths: \[.*q_proj.*\]\. "
    r"`rules\[2\]` entry 'fc9' matches no module\.",
  ):
    fa.adapt(model, params, rules, x)


def test_heads_are_checked_once_for_every_model_that_has_them():
  """One check of a heads mapping (core `heads.head_items`), used by head surgery and both genomics models."""
  from flax_adapters import heads

  with pytest.raises(ValueError, match=r"`heads` gives head 'a' twice. Fix: give each head once"):
    heads.head_items([('a', {}), ('a', {})])
  with pytest.raises(ValueError, match=r"head names must be non-empty strings without \"/\" or \"\.\", found 'a/b'"):
    heads.head_items({'a/b': {}})

  class Odd:
    heads = 'atac'

  with pytest.raises(TypeError, match=r"`Odd.heads` must map head names to specs .* found str 'atac'"):
    heads.model_heads(Odd())
