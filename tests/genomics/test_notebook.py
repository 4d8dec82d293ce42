"""The genomics transfer notebook runs top to bottom (small mode) and its checks hold."""

import os
import pathlib

import nbclient
import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / 'notebooks' / 'genomics_transfer.ipynb'


def test_genomics_transfer_notebook_runs(monkeypatch):
  monkeypatch.setenv('FA_NOTEBOOK_SMALL', '1')
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(
    nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(ROOT / 'notebooks')}}
  ).execute()
  errors = [o for cell in nb.cells for o in cell.get('outputs', []) if o.get('output_type') == 'error']
  assert not errors
  outputs = '\n'.join(o.get('text', '') for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs)
  for mode in ('linear', 'lora', 'locon', 'locon-early', 'full'):
    assert f'\n{mode} ' in outputs
  assert 'test r (mean ± sd, n=2)' in outputs  # the study's design: seeds scored on test
  assert 'after locon-early' in outputs and '\ngata   stem' in outputs  # the probe table
  assert 'LoRA alone merges completely: True' in outputs
  assert 'restored outputs identical: True' in outputs
  # Locon on the weight-standardized block convs stays; on the plain stem conv it folds.
  assert "('encoder.down_blocks.0.conv1', 'locon')" in outputs
  assert "('encoder.stem', 'locon')" not in outputs
