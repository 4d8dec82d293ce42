"""The transfer study runs end to end at toy size and its results hold what the design promises.

The full-size study is the README's first command; these tests check the pipeline and the bookkeeping
(grids, chosen rates, seeds, summaries, ablation, probe), not the numbers a toy run produces.
"""

import json
import math

import jax
import numpy as np
import pytest

from flax_adapters.genomics import demo, study


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp('demo_out')
  argv = ['--quick', '--modes', 'linear', 'locon-early', '--seeds', '3', '--out-dir', str(out), '--no-progress']
  return demo.main(argv), out


def test_quick_study_writes_table_json_and_plot(quick_run, capsys):
  results, out = quick_run
  saved = json.loads((out / 'results.json').read_text())
  assert saved['transfer'] == json.loads(json.dumps(results['transfer']))
  assert (out / 'transfer.png').stat().st_size > 10_000
  assert [r['mode'] for r in saved['transfer']] == ['linear', 'locon-early']
  printed = demo.table(results)
  for mode in ('linear', 'locon-early'):
    assert f'\n{mode} ' in printed
  assert 'test r, mean ± sd (n=3)' in printed


def test_each_mode_records_its_grid_choice_seeds_and_spread(quick_run):
  results, _ = quick_run
  s = results['study']
  for r in results['transfer']:
    assert r['lr_grid'] == list(s['lr_grid']) and len(r['grid_val_r']) == len(r['lr_grid'])
    # The chosen rate is the grid's best on validation, and its seed-0 run is the first of the seeds.
    assert r['chosen_lr'] == r['lr_grid'][int(np.argmax(r['grid_val_r']))]
    assert r['runs'][0]['val_r'] == max(r['grid_val_r']) and r['runs'][0]['seed'] == 0
    assert [run['seed'] for run in r['runs']] == [0, 1, 2]
    assert all(run['lr'] == r['chosen_lr'] for run in r['runs'])
    test_r = [run['test_r'] for run in r['runs']]
    assert r['n'] == 3
    np.testing.assert_allclose(r['test_r_mean'], np.mean(test_r), rtol=1e-12)
    np.testing.assert_allclose(r['test_r_sd'], np.std(test_r, ddof=1), rtol=1e-12)
    assert r['test_r_min'] == min(test_r) and r['test_r_max'] == max(test_r)
    assert all(0 < run['best_step'] <= s['steps'] for run in r['runs'])
    assert 0 < r['trainable_params'] < r['total_params'] and r['sec_per_step'] > 0
    assert r['max_abs_merged_minus_adapted'] < 1e-5
  rows = {r['mode']: r for r in results['transfer']}
  # Locon on the plain stem conv folds; on the weight-standardized block convs it stays.
  assert rows['locon-early']['unmerged_after_merge'] == ['locon']
  assert rows['linear']['unmerged_after_merge'] == []


def test_ablation_reruns_the_borrowed_rate_and_the_probe_covers_every_trunk(quick_run):
  results, _ = quick_run
  chosen = {r['mode']: r['chosen_lr'] for r in results['transfer']}
  assert [a['name'] for a in results['ablation']] == ['locon r8, late convs', 'locon r4 a1, early convs']
  for a in results['ablation']:
    assert a['lr'] == chosen[a['lr_from']] and a['n'] == results['study']['ablation_seeds']
  probe = results['probe']
  assert list(probe['scores']) == ['random init', 'pretrained', 'after locon-early']
  for scores in probe['scores'].values():
    assert list(scores) == list(study.PROBE_LAYERS)
    assert all(set(layer) == set(probe['motifs']) for layer in scores.values())
    # Every motif has sites in the held-out bins, so every Pearson r is defined (8 probe sequences left
    # three of four motifs without any: nan).
    assert all(math.isfinite(r) for layer in scores.values() for r in layer.values()), scores


def test_a_run_is_deterministic_for_its_seeds_and_differs_across_seeds():
  s = study.Study.quick(steps=6, eval_every=3, progress=False)
  model = study.build_model(s.size)
  splits = study.make_splits(model, s)
  pretrained = study.init_params(model, 0)
  runner = study.ModeRunner(model, pretrained, study.MODES['lora'].config, splits, s)
  a, b, c = runner.fit(1e-2, 0, 'a'), runner.fit(1e-2, 0, 'b'), runner.fit(1e-2, 1, 'c')
  assert a.losses == b.losses and a.test_r == b.test_r and a.best_step == b.best_step
  assert a.losses != c.losses
  # Training never touched the pretrained arrays (the step donates copies).
  again = study.init_params(model, 0)
  assert all(bool((x == y).all()) for x, y in zip(jax.tree.leaves(pretrained), jax.tree.leaves(again)))


def test_probe_scores_a_feature_that_holds_the_target_high_and_noise_low():
  rng = np.random.default_rng(0)
  target = rng.poisson(0.5, 4000).astype(float)
  holds = np.stack([target + 0.1 * rng.standard_normal(4000), rng.standard_normal(4000)], 1)
  noise = rng.standard_normal((4000, 2))
  assert study._ridge_r(holds, target) > 0.95
  assert abs(study._ridge_r(noise, target)) < 0.1


def test_numpy_pearson_matches_the_task_metric():
  rng = np.random.default_rng(1)
  pred, target = rng.random((5, 8, 3)), rng.random((5, 8, 3))
  from flax_adapters.genomics import data

  np.testing.assert_allclose(study.pearson_r(pred, target), float(data.pearson_r(pred, target)), atol=1e-6)


def test_study_settings_are_checked():
  with pytest.raises(ValueError, match='`modes`'):
    study.Study(modes=('loraa',))
  with pytest.raises(ValueError, match="borrow the learning rate of modes \\['locon-early'\\]"):
    study.Study(modes=('linear', 'lora'), ablations=('locon r8, late convs',))
  with pytest.raises(ValueError, match='`lr_grid`'):
    study.Study(lr_grid=())
  with pytest.raises(ValueError, match='`seeds`'):
    study.Study(seeds=0)


def test_cli_presets_and_options(capsys):
  with pytest.raises(SystemExit) as e:
    demo.parse_args(['--help'])
  assert e.value.code == 0
  text = capsys.readouterr().out
  for option in ('--study', '--seed', '--out-dir', '--modes', '--steps', '--seeds', '--lr-grid', '--quick'):
    assert option in text
  full = demo.parse_args(['--study', 'full'])
  assert full.modes == tuple(study.MODES) and full.ablations == tuple(study.ABLATIONS)
  assert len(full.lr_grid) > len(study.Study().lr_grid) and full.seeds > study.Study().seeds >= 3
  # Ablations whose borrowed rate comes from a mode that does not run are dropped.
  assert demo.parse_args(['--modes', 'linear', 'lora']).ablations == ()
  with pytest.raises(SystemExit):
    demo.parse_args(['--modes', 'loraa'])
  with pytest.raises(SystemExit):
    demo.parse_args(['--seeds', '0'])
