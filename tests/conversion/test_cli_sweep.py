"""User mistakes on the command line and in checkpoint files: one clear line, exit status 1, nothing written."""

import numpy as np
import pytest
import torch

from conversion.cli import main
from conversion.state_dict import load_state_dict


@pytest.mark.parametrize(
  'argv',
  [
    ['to-flax', '{missing}', '{out}'],
    ['to-torch', '{missing}', '{out}'],
    ['import-peft', '{missing}', '{dir}', '{out}'],
    ['import-peft', '{dir}', '{missing}', '{out}'],
    ['export-peft', '{missing}', '{dir}', '{out}'],
    ['export-merged', '{dir}', '{missing}', '{out}'],
  ],
)
def test_a_missing_input_is_named_as_missing(tmp_path, capsys, argv):
  paths = {'missing': str(tmp_path / 'nope'), 'dir': str(tmp_path), 'out': str(tmp_path / 'out')}
  assert main([a.format(**paths) for a in argv]) == 1
  err = capsys.readouterr().err
  assert f"'{tmp_path / 'nope'}' does not exist" in err and len(err.splitlines()) == 1
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('command', ['to-flax', 'to-torch', 'import-peft'])
def test_a_file_given_for_an_input_directory(tmp_path, capsys, command):
  (tmp_path / 'weights.safetensors').write_bytes(b'')
  argv = [command, str(tmp_path / 'weights.safetensors'), str(tmp_path / 'out')]
  if command == 'import-peft':
    argv.insert(2, str(tmp_path))
  assert main(argv) == 1
  assert "weights.safetensors' is a file; expected a directory" in capsys.readouterr().err
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('command', ['to-flax', 'import-peft'])
def test_an_out_dir_inside_a_file_is_refused_before_any_work(tmp_path, capsys, command):
  (tmp_path / 'in').mkdir()
  (tmp_path / 'afile').write_text('x')
  inputs = [str(tmp_path / 'in')] * (2 if command == 'import-peft' else 1)
  assert main([command, *inputs, str(tmp_path / 'afile' / 'out')]) == 1
  assert "is inside '" in capsys.readouterr().err
  assert (tmp_path / 'afile').read_text() == 'x'


def test_a_wrapped_or_annotated_bin_names_the_file_and_the_fix(tmp_path):
  weights = {'w': torch.ones(2)}
  torch.save({'epoch': 3, 'state_dict': weights}, tmp_path / 'wrapped.bin')
  with pytest.raises(TypeError, match=r"wrapped\.bin' is not a plain state dict.*save loaded\['state_dict'\]"):
    load_state_dict(tmp_path / 'wrapped.bin')
  torch.save({**weights, 'step': 3}, tmp_path / 'step.bin')
  with pytest.raises(TypeError, match=r"step\.bin' is not a plain state dict.*'step': 'int'"):
    load_state_dict(tmp_path / 'step.bin')


def test_a_sparse_tensor_is_read_as_its_dense_values(tmp_path):
  dense = torch.tensor([[0.0, 1.5], [2.0, 0.0]])
  torch.save({'w': dense.to_sparse()}, tmp_path / 'sparse.bin')
  np.testing.assert_array_equal(load_state_dict(tmp_path / 'sparse.bin')['w'], dense.numpy())


def test_a_field_set_twice_is_refused(tmp_path, capsys):
  # The last value won without a word.
  argv = ['to-flax', str(tmp_path), str(tmp_path / 'out'), '--set', 'n_layer=2', '--set', 'n_layer=3']
  assert main(argv) == 1
  err = capsys.readouterr().err
  assert "--set gives n_layer twice (n_layer=2, then 'n_layer=3'); give each field once." in err
  assert len(err.splitlines()) == 1 and not (tmp_path / 'out').exists()
