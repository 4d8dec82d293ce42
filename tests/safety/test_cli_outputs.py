"""The CLI never writes into its inputs, and never over files it did not create."""

import os
import shutil

import peft
import pytest

from conversion.cli import main
from tests.conversion.peft_helpers import make_adapter
from tests.conversion.test_gpt2 import tiny_gpt2


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  """A tiny GPT-2 base, a PEFT LoRA adapter of it, its import as an adapter checkpoint, another model."""
  root = tmp_path_factory.mktemp('cli')
  hf = tiny_gpt2(n_layer=1)
  hf.save_pretrained(root / 'base')
  make_adapter(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=['c_attn']), root / 'peft')
  tiny_gpt2(n_layer=2).save_pretrained(root / 'other_model')
  assert main(['import-peft', str(root / 'peft'), str(root / 'base'), str(root / 'ckpt')]) == 0
  assert main(['to-flax', str(root / 'base'), str(root / 'flax')]) == 0
  return root


def snapshot(directory):
  """Every file under `directory` with its bytes."""
  out = {}
  for path, _, files in os.walk(directory):
    for name in files:
      full = os.path.join(path, name)
      out[os.path.relpath(full, directory)] = open(full, 'rb').read()
  return out


def refused(capsys, argv, message):
  assert main(argv) == 1
  err = capsys.readouterr().err
  assert message in err, err


def test_to_flax_onto_its_own_input(dirs, capsys):
  """It used to rewrite the input's config.json, dropping fields."""
  before = snapshot(dirs / 'base')
  for flags in ([], ['--overwrite']):
    refused(capsys, ['to-flax', str(dirs / 'base'), str(dirs / 'base'), *flags], 'is the input HF_DIR')
  refused(capsys, ['to-flax', str(dirs / 'base'), str(dirs / 'base' / 'sub')], 'is inside the input HF_DIR')
  assert snapshot(dirs / 'base') == before


def test_export_merged_onto_the_base(dirs, capsys):
  """It used to replace the base's weights with the merged ones."""
  before = snapshot(dirs / 'base')
  refused(
    capsys,
    ['export-merged', str(dirs / 'ckpt'), str(dirs / 'base'), str(dirs / 'base'), '--overwrite'],
    'is the input BASE_DIR',
  )
  refused(
    capsys, ['export-merged', str(dirs / 'ckpt'), str(dirs / 'base'), str(dirs / 'ckpt')], 'is the input ADAPTERS_DIR'
  )
  assert snapshot(dirs / 'base') == before


def test_import_peft_onto_its_base_or_a_user_folder(dirs, tmp_path, capsys):
  """`import-peft P B B --overwrite` used to delete the base model."""
  before = snapshot(dirs / 'base')
  refused(
    capsys,
    ['import-peft', str(dirs / 'peft'), str(dirs / 'base'), str(dirs / 'base'), '--overwrite'],
    'is the input BASE_DIR',
  )
  assert snapshot(dirs / 'base') == before
  folder = tmp_path / 'my_results'
  folder.mkdir()
  (folder / 'notes.txt').write_text('mine')
  refused(
    capsys,
    ['import-peft', str(dirs / 'peft'), str(dirs / 'base'), str(folder), '--overwrite'],
    "replaces only a flax_adapters adapter checkpoint, but `directory` '" + str(folder),
  )
  assert snapshot(folder) == {'notes.txt': b'mine'}
  refused(capsys, ['import-peft', str(dirs / 'peft'), str(dirs / 'base'), ''], 'OUT_DIR is empty')
  # Replacing an adapter checkpoint is what --overwrite is for.
  shutil.copytree(dirs / 'ckpt', tmp_path / 'ckpt')
  assert main(['import-peft', str(dirs / 'peft'), str(dirs / 'base'), str(tmp_path / 'ckpt'), '--overwrite']) == 0


def test_export_peft_over_an_unrelated_adapter(dirs, tmp_path, capsys):
  """It used to replace that adapter's files and delete its adapter_model.bin."""
  theirs = tmp_path / 'their_adapter'
  theirs.mkdir()
  (theirs / 'adapter_config.json').write_text('{"peft_type": "LORA"}')
  (theirs / 'adapter_model.bin').write_bytes(b'weights')
  before = snapshot(theirs)
  argv = ['export-peft', str(dirs / 'ckpt'), str(dirs / 'base'), str(theirs)]
  refused(capsys, argv, 'is not empty')
  refused(capsys, [*argv, '--overwrite'], "holds ['adapter_model.bin'], which this command does not write")
  assert snapshot(theirs) == before


def test_export_peft_overwrite_replaces_only_its_own_files(dirs, tmp_path, capsys):
  out = tmp_path / 'out'
  argv = ['export-peft', str(dirs / 'ckpt'), str(dirs / 'base'), str(out)]
  assert main(argv) == 0
  (out / 'README.md').write_text('notes')
  refused(capsys, argv, 'pass --overwrite to replace its adapter_config.json and adapter_model.safetensors')
  assert main([*argv, '--overwrite']) == 0
  assert sorted(os.listdir(out)) == ['README.md', 'adapter_config.json', 'adapter_model.safetensors']
  assert (out / 'README.md').read_text() == 'notes'


def test_to_torch_over_another_models_directory(dirs, tmp_path, capsys):
  """It used to replace the other model's files without being asked."""
  other = shutil.copytree(dirs / 'other_model', tmp_path / 'other_model')
  before = snapshot(other)
  argv = ['to-torch', str(dirs / 'flax'), str(other)]
  refused(capsys, argv, 'is not empty')
  assert snapshot(other) == before
  (other / 'pytorch_model.bin').write_bytes(b'old weights')
  refused(capsys, [*argv, '--overwrite'], "holds ['pytorch_model.bin'], which this command does not write")
  os.remove(other / 'pytorch_model.bin')
  (other / 'tokenizer.json').write_text('{}')
  assert main([*argv, '--overwrite']) == 0  # asked for: its config.json and model.safetensors are replaced
  assert (other / 'tokenizer.json').read_text() == '{}'
  assert snapshot(other)['model.safetensors'] != before['model.safetensors']


def test_task_type_is_checked_before_anything_runs(dirs, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    main(['export-peft', str(dirs / 'ckpt'), str(dirs / 'base'), str(tmp_path / 'out'), '--task-type', 'NOT_A_TASK'])
  assert exit_info.value.code == 2
  assert "argument --task-type: invalid choice: 'NOT_A_TASK'" in capsys.readouterr().err
  assert not (tmp_path / 'out').exists()
