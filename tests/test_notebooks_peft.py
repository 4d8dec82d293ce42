"""The MiniLM PEFT notebook runs top to bottom (small mode: fewer training steps) and its checks hold."""

import os
import pathlib

import nbclient
import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / 'notebooks' / 'minilm_peft_lora.ipynb'


def test_minilm_peft_notebook_runs(monkeypatch):
  monkeypatch.setenv('FA_NOTEBOOK_SMALL', '1')
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('TRANSFORMERS_OFFLINE', '1')
  # The kernel must import this checkout, not another installed copy of the library.
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(
    nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': str(ROOT / 'notebooks')}}
  ).execute()
  outputs = '\n'.join(o.get('text', '') for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs)
  assert 'PEFT (torch) vs imported (JAX) embeddings: max |diff|' in outputs
  assert 'fine-tuned adapter, PEFT (torch) vs JAX' in outputs
  assert 'merged BertModel (torch) vs adapted JAX model' in outputs
  errors = [o for cell in nb.cells for o in cell.get('outputs', []) if o.get('output_type') == 'error']
  assert not errors
