"""`flax-adapters-convert` round trip: HF dir -> flax msgpack -> HF dir, weights unchanged."""

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file

from conversion.cli import main


def test_round_trip_through_flax_files(tmp_path, capsys):
  torch.manual_seed(0)
  hf = transformers.GPT2LMHeadModel(
    transformers.GPT2Config(
      vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=4, bos_token_id=0, eos_token_id=0
    )
  )
  hf.save_pretrained(tmp_path / 'hf')
  assert main(['to-flax', str(tmp_path / 'hf'), str(tmp_path / 'flax')]) == 0
  assert main(['to-torch', str(tmp_path / 'flax'), str(tmp_path / 'back')]) == 0
  back = load_file(tmp_path / 'back' / 'model.safetensors')
  for key, value in hf.state_dict().items():
    np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
  reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / 'back')
  assert reloaded.config.n_embd == 32

  assert main(['to-torch', str(tmp_path / 'hf'), str(tmp_path / 'x')]) == 1
  assert 'has no flax_params.msgpack' in capsys.readouterr().err


def test_to_flax_drops_a_task_head_and_overrides_config_fields(tmp_path, capsys):
  """A BertForMaskedLM checkpoint: its MLM head goes with --ignore and its missing pooler with --set
  (the errors said to pass ignore= / flip add_pooling_layer, which the CLI had no way to do)."""
  torch.manual_seed(0)
  config = transformers.BertConfig(
    vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
  )
  transformers.BertForMaskedLM(config).save_pretrained(tmp_path / 'hf')  # no pooler, an MLM head
  assert main(['to-flax', str(tmp_path / 'hf'), str(tmp_path / 'refused')]) == 1
  assert "pass ignore=['cls\\\\.predictions" in capsys.readouterr().err
  args = [
    'to-flax',
    str(tmp_path / 'hf'),
    str(tmp_path / 'flax'),
    '--ignore',
    r'cls\..*',
    '--set',
    'add_pooling_layer=false',
  ]
  assert main(args) == 0
  assert main(['to-torch', str(tmp_path / 'flax'), str(tmp_path / 'back')]) == 0
  back = load_file(tmp_path / 'back' / 'model.safetensors')
  trunk = transformers.BertModel.from_pretrained(tmp_path / 'hf', add_pooling_layer=False).state_dict()
  assert set(back) == set(trunk)
  for key, value in trunk.items():
    np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
  assert main(['to-flax', str(tmp_path / 'hf'), str(tmp_path / 'x'), '--set', 'add_pooling_layer']) == 1
  assert "--set 'add_pooling_layer': expected FIELD=VALUE" in capsys.readouterr().err
