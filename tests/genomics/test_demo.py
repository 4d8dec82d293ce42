"""The demo's pipeline runs end to end at toy size (the full run is the README's first command)."""

import json

import pytest

from flax_adapters.genomics import demo


def test_quick_demo_writes_table_json_and_plot(tmp_path, capsys):
  results = demo.main(
    ['--quick', '--modes', 'linear', 'lora+locon', 'houlsby', '--out-dir', str(tmp_path), '--no-progress']
  )
  printed = capsys.readouterr().out
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert (tmp_path / 'transfer.png').stat().st_size > 10_000
  assert [r['mode'] for r in saved['transfer']] == ['linear', 'lora+locon', 'houlsby']
  rows = {r['mode']: r for r in results['transfer']}
  # Locon on the standardized convs and Houlsby stay unmerged; everything that merged agrees.
  assert rows['lora+locon']['unmerged_after_merge'] == ['locon']
  assert rows['houlsby']['unmerged_after_merge'] == ['houlsby']
  assert rows['linear']['unmerged_after_merge'] == []
  for r in rows.values():
    assert r['max_abs_merged_minus_adapted'] < 1e-5
    assert 0 < r['trainable_params'] < r['total_params']
    assert r['adapter_checkpoint_bytes'] < saved['base_checkpoint_bytes']
  for mode in rows:
    assert f'\n{mode} ' in '\n' + printed


def test_help_documents_the_options(capsys):
  with pytest.raises(SystemExit) as e:
    demo.parse_args(['--help'])
  assert e.value.code == 0
  text = capsys.readouterr().out
  for option in ('--seed', '--out-dir', '--pretrain-steps', '--transfer-steps', '--modes', '--quick'):
    assert option in text


def test_unknown_mode_is_refused():
  with pytest.raises(SystemExit):
    demo.parse_args(['--modes', 'loraa'])
