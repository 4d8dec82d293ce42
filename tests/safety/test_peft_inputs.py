"""PEFT adapter configs: every regex, number and task type is checked by name before anything is read."""

import json
import shutil

import peft
import pytest

from conversion import get_family, import_peft
from conversion.peft import export_peft, parse_peft_config
from tests.conversion.peft_helpers import make_adapter
from tests.conversion.test_gpt2 import tiny_gpt2

GPT2 = get_family('gpt2')
VALID = {'peft_type': 'LORA', 'r': 4, 'lora_alpha': 8, 'target_modules': ['c_attn']}


@pytest.fixture(scope='module')
def adapter(tmp_path_factory):
  directory = tmp_path_factory.mktemp('peft') / 'lora'
  hf = tiny_gpt2(n_layer=1)
  _, base = make_adapter(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=['c_attn']), directory)
  config = GPT2.config_from_hf(hf.config.to_dict())
  return directory, GPT2.flax_model(config), GPT2.torch_to_flax(base, config), config


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('target_modules', '(c_attn', r"target_modules='\(c_attn', which is not a valid regular expression"),
    ('exclude_modules', '[', r"exclude_modules='\[', which is not a valid regular expression"),
    ('modules_to_save', ['ln_f', '(x'], r"modules_to_save\[1\]='\(x', which is not a valid regular expression"),
    ('rank_pattern', {'c_(attn': 2}, r"rank_pattern key='c_\(attn', which is not a valid regular expression"),
    ('alpha_pattern', {'*': 2}, r"alpha_pattern key='\*', which is not a valid regular expression"),
    ('layers_pattern', '(h', r"layers_pattern='\(h', which is not a valid regular expression"),
    ('target_modules', ['c_attn', 3], r'target_modules\[1\]=3; expected a module name'),
    ('modules_to_save', 'ln_f', r"modules_to_save='ln_f'; expected a list of module names"),
    ('alpha_pattern', {'c_attn': '16'}, r"alpha_pattern\['c_attn'\]='16'; expected a positive number"),
    ('rank_pattern', {'c_attn': 2.5}, r"rank_pattern\['c_attn'\]=2\.5; expected a positive integer rank"),
    ('rank_pattern', {'c_attn': 0}, r"rank_pattern\['c_attn'\]=0; expected a positive integer rank"),
    ('r', 4.5, r'r=4\.5; expected a positive integer rank \(PEFT refuses 4\.5 too\)'),
    ('r', True, r'r=True; expected a positive integer rank'),
    ('lora_alpha', float('nan'), r'lora_alpha=nan; PEFT config numbers must be finite'),
    ('lora_alpha', float('inf'), r'lora_alpha=inf; PEFT config numbers must be finite'),
    ('alpha_pattern', {'c_attn': float('-inf')}, r"alpha_pattern\['c_attn'\]=-inf; PEFT config numbers must be finite"),
    ('lora_dropout', 1.5, r'lora_dropout=1\.5; expected a probability'),
    ('layers_to_transform', ['0'], r"layers_to_transform=\['0'\]; expected a layer index"),
  ],
)
def test_bad_config_values_are_refused_by_name(field, value, message):
  with pytest.raises(ValueError, match=rf'my_adapter/adapter_config.json has {message}'):
    parse_peft_config({**VALID, field: value}, source='my_adapter/adapter_config.json')


@pytest.mark.parametrize('text', ['NaN', 'Infinity', '-Infinity'])
def test_nan_and_infinity_in_the_json_file(adapter, tmp_path, text):
  """Python's json reads these non-standard literals; the alpha would make every output NaN."""
  directory, model, params, config = adapter
  d = shutil.copytree(directory, tmp_path / 'a')
  raw = json.loads((d / 'adapter_config.json').read_text())
  (d / 'adapter_config.json').write_text(json.dumps(raw).replace('"lora_alpha": 8', f'"lora_alpha": {text}'))
  with pytest.raises(
    ValueError, match=r'/a/adapter_config.json has lora_alpha=-?(nan|inf); PEFT config numbers must be finite'
  ):
    import_peft(d, model, params, config=config)


def test_malformed_adapter_config_json(adapter, tmp_path):
  directory, model, params, config = adapter
  d = shutil.copytree(directory, tmp_path / 'a')
  (d / 'adapter_config.json').write_text('{"peft_type": "LORA", ')
  with pytest.raises(ValueError, match=r"adapter_config.json' is not a valid PEFT adapter config JSON file"):
    import_peft(d, model, params, config=config)
  (d / 'adapter_config.json').write_text('"LORA"')
  with pytest.raises(ValueError, match=r'must hold a JSON object \(PEFT adapter config\), found a str'):
    import_peft(d, model, params, config=config)


def test_export_refuses_a_task_type_peft_does_not_know(adapter, tmp_path):
  directory, model, params, config = adapter
  adapted, p = import_peft(directory, model, params, config=config)
  with pytest.raises(
    ValueError, match=r"`task_type`='NOT_A_TASK' is not a PEFT task type; expected one of \['SEQ_CLS'"
  ):
    export_peft(tmp_path / 'out', adapted, p, config=config, task_type='NOT_A_TASK')
  assert not (tmp_path / 'out').exists()
  export_peft(tmp_path / 'out', adapted, p, config=config, task_type=None)  # None and the listed ones are fine
