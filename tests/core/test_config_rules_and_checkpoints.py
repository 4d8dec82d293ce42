"""Options that would do nothing, ordered rules (first match wins), numpy settings in
checkpoints, load errors that name the difference, and method names that clash with base modes."""

import dataclasses

import numpy as np
import pytest

import flax_adapters as fa
from tests.core import testnet as net


@pytest.fixture(scope='module')
def setup():
  return net.make()


def test_options_for_a_built_in_method_are_refused():
  with pytest.raises(ValueError, match=r"`options\['lora'\]` would be ignored: lora reads its own"):
    fa.TransferConfig(mode='lora', options={'lora': {'targets': ['fc2']}})


def test_fields_of_modes_that_are_off_serve_a_sweep_over_modes():
  # One set of settings for every mode (AlphaGenome's API): the modes that are off do not read theirs.
  shared = dict(lora_rank=2, locon_targets=['conv1d'], ia3_ff_targets=['fc2'], houlsby_latent_dim=4)
  assert [r.argument for r in fa.TransferConfig(mode='lora', **shared).rules()] == ['lora_targets'] * 2
  assert list(fa.TransferConfig(mode='linear', **shared).rules()) == []


def test_ordered_rules_first_match_wins(setup):
  model, params, x = setup
  rules = [
    fa.Rule(target='blocks.0.mha.q_proj', methods=fa.LoRA(rank=1)),
    fa.Rule(target='q_proj', methods=fa.LoRA(rank=4)),
  ]
  adapted, p = fa.adapt(model, params, rules, x)
  ranks = {e.site.name: e.methods[0].rank for e in adapted.plan}
  assert ranks == {'blocks.0.mha.q_proj': 1, 'blocks.1.mha.q_proj': 4}
  # A rule that only matches modules an earlier rule already covers places nothing: an error.
  with pytest.raises(
    ValueError, match=r"`rules\[1\]` entry 'blocks\.0\.mha\.q_proj' places nothing: every module .*first match wins"
  ):
    fa.adapt(model, params, list(reversed(rules)), x)
  # ... and a config list that names one module twice is still refused.
  with pytest.raises(ValueError, match=r'lora would be added twice .* in `lora_targets`'):
    fa.prepare_for_transfer(model, params, fa.TransferConfig(mode='lora', lora_targets=['q_proj', 'mha.q']), x)


def test_numpy_numbers_in_a_config_survive_a_checkpoint(setup, tmp_path):
  model, params, x = setup
  config = fa.TransferConfig(mode='lora', lora_rank=np.int64(2), lora_alpha=np.float32(4.0))
  adapted, p = fa.prepare_for_transfer(model, params, config, x)
  fa.save_adapters(tmp_path / 'ckpt', adapted, p)
  meta = fa.read_meta(tmp_path / 'ckpt')
  assert meta['config']['lora_rank'] == 2 and meta['config']['lora_alpha'] == 4.0
  restored, _ = fa.restore_transfer(tmp_path / 'ckpt', model, params, x)
  assert {e.methods[0].rank for e in restored.plan} == {2}


def test_regex_flags_survive_a_checkpoint(setup, tmp_path):
  """A compiled target's flags were dropped on save ('re:' + pattern), so the checkpoint restored with
  other targets (here: none, and an error)."""
  import re

  model, params, x = setup
  config = fa.TransferConfig(mode='lora', lora_rank=2, lora_targets=[re.compile(r'.*Q_PROJ', re.IGNORECASE)])
  adapted, p = fa.prepare_for_transfer(model, params, config, x)
  fa.save_adapters(tmp_path / 'ckpt', adapted, p)
  assert fa.read_meta(tmp_path / 'ckpt')['config']['lora_targets'] == ['re:(?i).*Q_PROJ']
  restored, _ = fa.restore_transfer(tmp_path / 'ckpt', model, params, x)
  assert [e.site.path for e in restored.plan] == [e.site.path for e in adapted.plan] != []


def test_load_names_what_differs(setup, tmp_path):
  model, params, x = setup
  adapted, p = fa.prepare_for_transfer(model, params, fa.TransferConfig(mode='lora', lora_rank=2), x)
  fa.save_adapters(tmp_path / 'ckpt', adapted, p)
  other, q = fa.prepare_for_transfer(model, params, fa.TransferConfig(mode='lora', lora_rank=4), x)
  with pytest.raises(
    ValueError,
    match=r"do not fit this model at 4 site\(s\) \(blocks_0\.mha\.q_proj: saved \[\{'method': 'lora', 'rank': 2, .*\] vs this model \[\{'method': 'lora', 'rank': 4,",
  ):
    fa.load_adapters(tmp_path / 'ckpt', other, q)
  frozen_norms, r = fa.prepare_for_transfer(
    model, params, fa.TransferConfig(mode='lora', lora_rank=2, unfreeze_norm=False), x
  )
  with pytest.raises(ValueError, match=r'holds another set of trained leaves than this model trains .*`unfreeze_norm`'):
    fa.load_adapters(tmp_path / 'ckpt', frozen_norms, r)


def test_a_method_cannot_take_a_base_mode_name():
  @dataclasses.dataclass(frozen=True, kw_only=True)
  class Linear(fa.Method):
    name = 'linear'
    leaf_names = ('linear_shift',)
    stage = 'additive'

  with pytest.raises(ValueError, match=r"name 'linear' / mode 'linear' is one of TransferConfig's base modes"):
    fa.register_method(Linear)
