"""The flax_adapters demo: a transfer study of every adapter mode on a genomics model.

    python -m flax_adapters.genomics.demo                # the default study (about 4 minutes on 2 CPU cores)
    python -m flax_adapters.genomics.demo --study full   # every mode, wider grid, more seeds (about an hour)
    python -m flax_adapters.genomics.demo --help         # options

1. Pretrain an AlphaGenome-style model (`flax_adapters.genomics.seq2func`: conv tower, transformer
   tower, heads) on a synthetic genomics task: motifs planted in random DNA drive the coverage tracks
   of four assays (`flax_adapters.genomics.data`).
2. Transfer it to a new assay (`my_atac`) with a new head, once per mode, with train / validation /
   test splits: a learning-rate grid per mode chosen on validation, then the chosen rate rerun with
   several seeds and scored on test (`flax_adapters.genomics.study` has the design).
3. Find out why the modes differ: a probe of which motifs each layer of the trunk encodes, and (with
   `--study full`) an ablation that changes one thing at a time (Locon's placement, its rank and scale,
   LoRA's capacity, fine-tuning only the conv tower or only the transformer).
4. Print the tables and write `results.json` and `transfer.png` (test r with error bars against trainable
   params, the grids, validation r along training, the probe).

Everything is deterministic for a given `--seed`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from flax_adapters.genomics import study as study_lib
from flax_adapters.genomics.study import ABLATION_LR_FROM, ABLATIONS, MODES, Study

STUDIES = {'default': Study.default, 'full': Study.full, 'quick': Study.quick}


def _lr(x: float) -> str:
  return f'{x:.0e}'.replace('e-0', 'e-')


def table(results: dict) -> str:
  """The results as plain-text tables: modes, ablation, probe, pretraining and timing."""
  s = results['study']
  n = s['seeds']
  head = (
    f'{"mode":<12} {"trainable":>9} {"%":>6}  {"lr grid (val r)":<27} {"chosen":>6}  '
    f'{f"test r, mean ± sd (n={n})":>24} {"range":>13} {"gap":>5} {"step*":>5} {"s/step":>6} {"|merged-adapted|":>16} {"ckpt":>6}'
  )
  lines = [f'Transfer to {results["model"]["new_head"]}: Pearson r on the test split', head, '-' * len(head)]
  for r in results['transfer']:
    grid = ' '.join(f'{_lr(lr)}({v:.2f})' for lr, v in zip(r['lr_grid'], r['grid_val_r']))
    edge = '*' if r['chosen_at_grid_edge'] and len(r['lr_grid']) > 2 else ''
    gap = f'{100 * r["gap_closed"]:>4.0f}%' if 'gap_closed' in r else '    -'
    stays = f' ({"+".join(r["unmerged_after_merge"])} stays)' if r['unmerged_after_merge'] else ''
    steps = int(np.mean([run['best_step'] for run in r['runs']]))
    lines.append(
      f'{r["mode"]:<12} {r["trainable_params"]:>9,} {r["trainable_pct"]:>5.1f}%  {grid:<27} {_lr(r["chosen_lr"]) + edge:>6}  '
      f'{r["test_r_mean"]:>16.3f} ± {r["test_r_sd"]:.3f} {r["test_r_min"]:>6.3f}-{r["test_r_max"]:.3f} {gap} '
      f'{steps:>5} {r["sec_per_step"]:>6.3f} {r["max_abs_merged_minus_adapted"]:>16.1e} '
      f'{r["adapter_checkpoint_bytes"] / 1024:>4.0f}KB{stays}'
    )
  lines.append(
    f'gap: share of the full-minus-linear gap closed. step*: mean step of the best validation checkpoint '
    f'(of {s["steps"]}). The rate is chosen on validation with seed 0{"; * at the grid edge" if len(s["lr_grid"]) > 2 else ""}.'
  )
  if results['ablation']:
    lines += ['', f'Why: one change at a time (test r, n={s["ablation_seeds"]} seed(s), at the rate of the mode named)']
    for a in results['ablation']:
      sd = f' ± {a["test_r_sd"]:.3f}' if a['n'] > 1 else ''
      lines.append(
        f'  {a["name"]:<28} {a["trainable_params"]:>8,} params  lr {_lr(a["lr"])} ({a["lr_from"]})  '
        f'{a["test_r_mean"]:.3f}{sd}   {a["about"]}'
      )
  probes = results['probe']
  lines += [
    '',
    'What the trunk encodes: linear probe r of motif sites per bin, by layer (random init / pretrained / after)',
  ]
  names = list(probes['scores'])
  lines.append(f'  {"motif":<6} {"layer":<14} ' + ' '.join(f'{n_:>18}' for n_ in names))
  for m in probes['motifs']:
    for layer in ('stem', 'down_blocks_1', 'down_blocks_5', 'tower'):
      lines.append(f'  {m:<6} {layer:<14} ' + ' '.join(f'{probes["scores"][n_][layer][m]:>18.2f}' for n_ in names))
  pre = results['pretrain']['val_pearson_r']
  lines.append('')
  lines.append('pretrained heads, val r: ' + ', '.join(f'{k} {v:.3f}' for k, v in pre.items()))
  lines.append(
    f'base checkpoint {results["base_checkpoint_bytes"] / 1024:.0f}KB; pretraining {results["pretrain"]["sec_per_step"]:.3f} s/step; '
    f'total {results["seconds"]:.0f} s wall, {results["cpu_seconds"]:.0f} s CPU ({results["cpu_count"]} cores)'
  )
  return '\n'.join(lines)


def plot(results: dict, path: str) -> None:
  """Four panels: test r against trainable params (error bars: sd over seeds; gray: the ablation), the
  learning-rate grids, validation r along training, and the probe of what the trunk encodes."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows = results['transfer']
  color = {r['mode']: f'C{i}' for i, r in enumerate(rows)}
  fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))

  ax = axes[0, 0]
  points = [(r['mode'], r, color[r['mode']]) for r in rows] + [(a['name'], a, 'gray') for a in results['ablation']]
  for i, (name, r, c) in enumerate(sorted(points, key=lambda p: p[1]['trainable_params'])):
    x = r['trainable_params']
    ax.errorbar(x, r['test_r_mean'], yerr=r['test_r_sd'], fmt='o' if c != 'gray' else 's', capsize=4, color=c, ms=6)
    ax.scatter([x] * len(r['runs']), [run['test_r'] for run in r['runs']], s=10, color=c, alpha=0.5)
    ax.annotate(name, (x, r['test_r_mean']), textcoords='offset points', xytext=(7, 7 if i % 2 else -13), fontsize=8)
  by_mode = {r['mode']: r for r in rows}
  for name in ('linear', 'full'):
    if name in by_mode:
      ax.axhline(by_mode[name]['test_r_mean'], color=color[name], ls='--', lw=0.8)
  ax.set_xscale('log')
  ax.margins(x=0.2)
  ax.set_xlabel('trainable parameters')
  ax.set_ylabel(f'test Pearson r ({results["model"]["new_head"]})')
  n = results['study']['seeds']
  ax.set_title(f'Test r: mean ± sd over {n} seeds (dots: seeds; gray squares: ablation)', fontsize=10)

  ax = axes[0, 1]
  for r in rows:
    ax.plot(r['lr_grid'], r['grid_val_r'], 'o-', color=color[r['mode']], label=r['mode'])
    ax.scatter([r['chosen_lr']], [max(r['grid_val_r'])], s=140, facecolors='none', edgecolors=color[r['mode']])
  ax.set_xscale('log')
  ax.set_xlabel('learning rate')
  ax.set_ylabel('validation r (seed 0, best checkpoint)')
  ax.set_title('Learning-rate grid, chosen on validation (circled)', fontsize=10)
  ax.legend(fontsize=8)

  ax = axes[1, 0]
  for r in rows:
    for k, run in enumerate(r['runs']):
      steps, val = zip(*run['val_curve']) if run['val_curve'] else ((), ())
      ax.plot(
        steps, val, '.-', color=color[r['mode']], alpha=1.0 if k == 0 else 0.35, label=r['mode'] if k == 0 else None
      )
  ax.set_xlabel('training step')
  ax.set_ylabel('validation r')
  ax.set_title('Validation r along training, chosen rate (faint: other seeds)', fontsize=10)
  ax.legend(fontsize=8)

  ax = axes[1, 1]
  probes = results['probe']
  layers = probes['layers']
  x = range(len(layers))
  for j, m in enumerate(probes['motifs']):
    scores = probes['scores']
    ax.plot(x, [scores['pretrained'][layer][m] for layer in layers], '-', color=f'C{j}', label=f'{m}, pretrained')
    ax.plot(x, [scores['random init'][layer][m] for layer in layers], ':', color=f'C{j}', alpha=0.7)
    for name in scores:
      if name.startswith('after') and m == 'gata':
        style = '--' if 'locon' in name else '-.'
        ax.plot(x, [scores[name][layer][m] for layer in layers], style, color=f'C{j}', label=f'{m}, {name}')
  ax.set_xticks(list(x), [layer.replace('down_blocks_', 'block ') for layer in layers], fontsize=8)
  ax.set_ylabel('probe r (motif sites per bin)')
  ax.set_ylim(-0.1, 1.2)
  ax.set_title('What the trunk encodes, by layer (dotted: random init)', fontsize=10)
  ax.legend(fontsize=7, ncol=3, loc='upper center')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> Study:
  p = argparse.ArgumentParser(
    prog='python -m flax_adapters.genomics.demo',
    description='Pretrain an AlphaGenome-style model on a synthetic genomics task, transfer it to a new assay '
    'with every adapter mode (a learning-rate grid chosen on validation, several seeds, scored on test), find out '
    'why the modes differ, and write a table, results.json and transfer.png.',
  )
  p.add_argument(
    '--study',
    choices=tuple(STUDIES),
    default='default',
    help='default: the key modes, 2-point grid, 3 seeds (< 5 min on 2 cores); full: every mode, 4-point grid, '
    '5 seeds, every ablation (about an hour); quick: a toy smoke run',
  )
  p.add_argument('--quick', action='store_true', help='same as --study quick')
  p.add_argument('--seed', type=int, default=0, help='seed for data, pretraining, init and batches (default 0)')
  p.add_argument('--out-dir', default='demo_out', help='where results.json and transfer.png go (default demo_out)')
  p.add_argument('--modes', nargs='+', choices=list(MODES), help="modes to compare (default: the study's)")
  p.add_argument('--steps', type=int, help="training steps per run (default: the study's)")
  p.add_argument('--seeds', type=int, help="run seeds per mode (default: the study's)")
  p.add_argument('--lr-grid', type=float, nargs='+', help="learning rates to try per mode (default: the study's)")
  p.add_argument('--no-progress', action='store_true', help='hide progress bars')
  a = p.parse_args(argv)
  preset = STUDIES['quick' if a.quick else a.study]
  changes = dict(seed=a.seed, out_dir=a.out_dir, progress=not a.no_progress)
  for name in ('steps', 'seeds'):
    value = getattr(a, name)
    if value is not None:
      if value < 1:
        p.error(f'--{name} must be at least 1')
      changes[name] = value
  if a.lr_grid:
    if any(not lr > 0 for lr in a.lr_grid):
      p.error('--lr-grid takes positive learning rates')
    changes['lr_grid'] = tuple(a.lr_grid)
  if a.modes:
    changes['modes'] = tuple(dict.fromkeys(a.modes))
    # An ablation reruns the chosen rate of one mode; keep those whose mode runs.
    changes['ablations'] = tuple(x for x in preset().ablations if ABLATION_LR_FROM[x] in changes['modes'])
  return preset(**changes)


def main(argv: Sequence[str] | None = None) -> dict:
  study = parse_args(argv)
  results = study_lib.run(study)
  os.makedirs(study.out_dir, exist_ok=True)
  json_path, png_path = os.path.join(study.out_dir, 'results.json'), os.path.join(study.out_dir, 'transfer.png')
  with open(json_path, 'w') as f:
    json.dump(results, f, indent=1)
  plot(results, png_path)
  print(table(results))
  print(f'\nwrote {json_path} and {png_path}')
  return results


# glibc's malloc backed by transparent huge pages. XLA:CPU allocates every step's activations afresh; with
# 4 KiB pages about a third of this model's training CPU time goes to page faults in the kernel (60 steps of
# full fine-tuning: 5.0 s CPU, of which 2.2 s system, against 3.0 s with huge pages). The benchmarks set the
# same variable for their workers. It changes no number the study computes, only how fast.
HUGE_PAGES = 'glibc.malloc.hugetlb=1'


def restart_with_huge_pages() -> None:
  """On Linux, re-executes this command once with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`.

  glibc reads its tunables only at process start. A `GLIBC_TUNABLES` you set yourself (even empty) is
  left alone, so `GLIBC_TUNABLES= python -m flax_adapters.genomics.demo` runs with the stock allocator.
  """
  if sys.platform != 'linux' or 'GLIBC_TUNABLES' in os.environ:
    return
  env = dict(os.environ, GLIBC_TUNABLES=HUGE_PAGES)
  sys.stdout.flush()
  os.execve(sys.executable, sys.orig_argv, env)  # the same command line, interpreter options included


__all__ = ['ABLATIONS', 'MODES', 'Study', 'main', 'parse_args', 'plot', 'table']

if __name__ == '__main__':
  restart_with_huge_pages()
  main()
