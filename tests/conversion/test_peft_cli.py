"""`flax-adapters-convert import-peft / export-peft / export-merged`, driven in-process."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import transformers

import flax_adapters as fa
from conversion import load_pretrained
from conversion.cli import main
from tests.conversion.peft_helpers import TOL, flax_logits, fresh, make_adapter, perturb, torch_logits
from tests.conversion.test_gpt2 import tiny_gpt2
from tests.conversion.test_llama import tiny_llama


@pytest.mark.parametrize('command', ['import-peft', 'export-peft', 'export-merged'])
def test_help(command, capsys):
  with pytest.raises(SystemExit) as exit_info:
    main([command, '--help'])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert f'usage: flax-adapters-convert {command}' in out and 'base_dir' in out


def test_peft_round_trip_through_the_command_line(tmp_path, rng, capsys):
  hf = tiny_llama()
  theirs, base = make_adapter(
    hf,
    peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'], rank_pattern={'v_proj': 2}, modules_to_save=['lm_head']
    ),
    tmp_path / 'peft',
  )
  fresh(transformers.LlamaForCausalLM, hf.config, base).save_pretrained(tmp_path / 'base')
  ids = rng.integers(0, 128, size=(2, 10)).astype(np.int64)
  expected = torch_logits(theirs, ids)

  # The base may also be a to-flax directory.
  assert main(['to-flax', str(tmp_path / 'base'), str(tmp_path / 'base_flax')]) == 0
  assert main(['import-peft', str(tmp_path / 'peft'), str(tmp_path / 'base'), str(tmp_path / 'ckpt')]) == 0
  assert (
    main(
      [
        'export-peft',
        str(tmp_path / 'ckpt'),
        str(tmp_path / 'base_flax'),
        str(tmp_path / 'out'),
        '--base-model-name-or-path',
        'tiny-llama',
      ]
    )
    == 0
  )
  written = json.loads((tmp_path / 'out' / 'adapter_config.json').read_text())
  assert written['base_model_name_or_path'] == 'tiny-llama' and written['task_type'] == 'CAUSAL_LM'
  assert written['rank_pattern'] == {'model.layers.0.self_attn.v_proj': 2, 'model.layers.1.self_attn.v_proj': 2}
  loaded = peft.PeftModel.from_pretrained(fresh(transformers.LlamaForCausalLM, hf.config, base), tmp_path / 'out')
  np.testing.assert_allclose(torch_logits(loaded.eval(), ids), expected, atol=TOL, rtol=0)

  assert main(['export-merged', str(tmp_path / 'ckpt'), str(tmp_path / 'base'), str(tmp_path / 'merged')]) == 0
  merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'merged').eval()
  np.testing.assert_allclose(torch_logits(merged, ids), expected, atol=TOL, rtol=0)

  # Errors are one line on stderr and exit status 1; an existing checkpoint is not overwritten silently.
  capsys.readouterr()
  assert main(['import-peft', str(tmp_path / 'peft'), str(tmp_path / 'base'), str(tmp_path / 'ckpt')]) == 1
  assert 'exists; pass --overwrite to replace it' in capsys.readouterr().err
  assert main(['import-peft', str(tmp_path / 'base'), str(tmp_path / 'base'), str(tmp_path / 'x')]) == 1
  assert 'has no adapter_config.json; it is not a PEFT adapter directory' in capsys.readouterr().err


def test_transfer_config_checkpoint_exports_with_unfrozen_norms(tmp_path, rng):
  """A prepare_for_transfer checkpoint (unfreeze_norm trains GPT-2's LayerNorms, bias included) through
  export-peft: the norms become PEFT modules_to_save, and PEFT's logits equal ours."""
  tiny_gpt2(n_layer=1).save_pretrained(tmp_path / 'base')
  model, params, _ = load_pretrained(tmp_path / 'base')
  config = fa.TransferConfig(mode='lora', lora_rank=4, lora_targets=['c_attn'], unfreeze_norm=True)
  adapted, p = fa.prepare_for_transfer(model, params, config, jax.ShapeDtypeStruct((1, 8), jnp.int32))
  p = perturb(adapted, p, scale=0.1)
  fa.save_adapters(tmp_path / 'ckpt', adapted, p)
  assert main(['export-peft', str(tmp_path / 'ckpt'), str(tmp_path / 'base'), str(tmp_path / 'out')]) == 0
  written = json.loads((tmp_path / 'out' / 'adapter_config.json').read_text())
  assert written['modules_to_save'] == ['transformer.h.0.ln_1', 'transformer.h.0.ln_2', 'transformer.ln_f']
  assert written['target_modules'] == ['transformer.h.0.attn.c_attn'] and written['fan_in_fan_out'] is True
  ids = rng.integers(0, 128, size=(2, 10)).astype(np.int64)
  loaded = peft.PeftModel.from_pretrained(
    transformers.GPT2LMHeadModel.from_pretrained(tmp_path / 'base'), tmp_path / 'out'
  ).eval()
  np.testing.assert_allclose(torch_logits(loaded, ids), flax_logits(adapted, p, ids), atol=TOL, rtol=0)
