"""The flax_adapters demo: pretrain a genomics model, then transfer it to a new assay, once per mode.

    python -m flax_adapters.genomics.demo            # the full demo (a few minutes on 2 CPU cores)
    python -m flax_adapters.genomics.demo --help     # options

1. Pretrain an AlphaGenome-style model (`flax_adapters.genomics.seq2func`, conv tower + transformer
   tower + heads) on a synthetic genomics task: motifs planted in random DNA drive the coverage
   tracks of four assays (`flax_adapters.genomics.data`).
2. Transfer it to a new assay (`my_atac`: the same motifs, combined differently) with a new head,
   once per mode: linear probing, LoRA, Locon, IA3, Houlsby, LoRA+Locon and full fine-tuning.
3. Print a table — trainable params, validation Pearson r (against the true, noise-free
   coverage of held-out sequences), seconds per step, the largest
   |merged - adapted| output difference, the adapter checkpoint size — and write it as JSON with
   a PNG plot (metric against trainable params; loss curves).

Everything is deterministic for a given `--seed`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import flax_adapters as fa
from flax_adapters.genomics import data as genomics
from flax_adapters.genomics.seq2func import Seq2Func, Seq2FuncConfig

PRETRAIN_HEADS = ('atac', 'dnase', 'chip_tf', 'chip_histone')
NEW_HEAD = 'my_atac'
LOCON4 = ['down_blocks.4', 'down_blocks.5']

# Each mode as a user would write it: the seed document's configurations.
MODES = {
  'linear': dict(mode='linear'),
  'lora': dict(mode='lora', lora_rank=8, lora_alpha=16, lora_targets=['q_proj', 'v_proj']),
  'locon': dict(mode='locon', locon_rank=4, locon_alpha=1, locon_targets=LOCON4),
  'ia3': dict(mode='ia3', ia3_targets=['k_proj', 'v_proj'], ia3_ff_targets=['fc2']),
  'houlsby': dict(mode='houlsby', houlsby_latent_dim=8, houlsby_placement='block', houlsby_targets=['mha', 'mlp']),
  'lora+locon': dict(mode=['lora', 'locon'], lora_targets=['q_proj', 'v_proj'], locon_targets=LOCON4),
  'full': dict(mode='full'),
}
# Full fine-tuning moves pretrained weights, so it takes a smaller step.
LEARNING_RATE = {'full': 3e-3}
DEFAULT_LR = 1e-2
PRETRAIN_LR = 2e-3


@dataclasses.dataclass(frozen=True)
class Settings:
  size: str = 'small'
  seed: int = 0
  pretrain_steps: int = 1000
  transfer_steps: int = 250
  batch_size: int = 32
  pretrain_examples: int = 16384
  transfer_examples: int = 2048
  val_examples: int = 512
  modes: tuple[str, ...] = tuple(MODES)
  out_dir: str = 'demo_out'
  progress: bool = True

  @classmethod
  def quick(cls, **changes):
    """A tiny run for smoke tests: the same steps, at toy sizes."""
    return cls(
      **{
        **dict(
          size='tiny',
          pretrain_steps=30,
          transfer_steps=10,
          batch_size=8,
          pretrain_examples=64,
          transfer_examples=32,
          val_examples=32,
        ),
        **changes,
      }
    )


def poisson_loss(pred: dict, target: dict) -> jax.Array:
  """Poisson negative log-likelihood of coverage, averaged over heads, bins and tracks."""
  losses = [jnp.mean(pred[k] - target[k] * jnp.log(pred[k] + 1e-6)) for k in target]
  return sum(losses) / len(losses)


def batches(n_examples: int, batch_size: int, steps: int, seed: int):
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    yield rng.choice(n_examples, size=batch_size, replace=False)


def train(model, params, data, *, steps: int, batch_size: int, lr: float, seed: int, desc: str, progress: bool = True):
  """Adam on the trainable part of `params`; returns (params, losses, median seconds per step)."""
  x, y = data
  trainable, frozen = fa.partition(params, fa.trainable_mask(model, params))
  tx = optax.adam(lr)
  opt_state = tx.init(trainable)
  # No donation: `trainable` shares its arrays with `params`, which the caller reuses for every mode.
  step = fa.make_train_step(lambda p, x, y: poisson_loss(model.apply({'params': p}, x), y), tx, donate=False)
  losses, times = [], []
  bar = tqdm(
    batches(len(x), batch_size, steps, seed), total=steps, desc=f'{desc:>10}', disable=not progress, leave=False
  )
  for idx in bar:
    start = time.perf_counter()
    trainable, opt_state, loss = step(trainable, opt_state, frozen, x[idx], {k: v[idx] for k, v in y.items()})
    losses.append(float(loss))  # float() waits for the step to finish
    times.append(time.perf_counter() - start)
    if len(losses) % 10 == 0:
      bar.set_postfix(loss=f'{losses[-1]:.4f}')
  # The first step includes compilation.
  return fa.combine(trainable, frozen), losses, float(np.median(times[1:] or times))


def evaluate(apply_fn, params, data, head: str, batch_size: int = 128) -> tuple[float, np.ndarray]:
  x, y = data
  preds = [np.asarray(apply_fn(params, x[i : i + batch_size])[head]) for i in range(0, len(x), batch_size)]
  pred = np.concatenate(preds)
  return float(genomics.pearson_r(pred, y[head])), pred


def directory_size(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def run(settings: Settings) -> dict:
  """The whole demo; returns the results that it also writes to `settings.out_dir`."""
  started = time.perf_counter()
  unknown = [m for m in settings.modes if m not in MODES]
  if unknown:
    raise ValueError(f'`modes` {unknown} are unknown; choose from {list(MODES)}.')
  config = Seq2FuncConfig.small() if settings.size == 'small' else Seq2FuncConfig.tiny()
  heads = {h: genomics.ASSAYS[h].head() for h in PRETRAIN_HEADS}
  model = Seq2Func(config, heads=heads)
  task = genomics.GenomicsTask.for_model(model, seed=settings.seed)
  new_bin = config.head_bin_size(genomics.ASSAYS[NEW_HEAD].modality)
  transfer_task = task.with_assays([NEW_HEAD], bin_size=new_bin)

  pre_train = task.sample(settings.pretrain_examples, rng=settings.seed + 1)
  # Validation compares predictions with the true (noise-free) coverage.
  pre_val = task.sample(settings.val_examples, rng=settings.seed + 2, noise=False)
  tr_train = transfer_task.sample(settings.transfer_examples, rng=settings.seed + 3)
  tr_val = transfer_task.sample(settings.val_examples, rng=settings.seed + 4, noise=False)

  # 1. Pretraining: every weight trains (mode='full' on the model as it is).
  params = model.init(jax.random.key(settings.seed), model.dummy_input())['params']
  full, params = fa.prepare_for_transfer(model, params, fa.TransferConfig(mode='full'), model.dummy_input())
  params, pre_losses, pre_step = train(
    full,
    params,
    pre_train,
    steps=settings.pretrain_steps,
    batch_size=settings.batch_size,
    lr=PRETRAIN_LR,
    seed=settings.seed,
    desc='pretrain',
    progress=settings.progress,
  )
  pretrained = params
  apply = jax.jit(model.apply)
  pre_r = {h: evaluate(lambda p, x: apply({'params': p}, x), pretrained, pre_val, h)[0] for h in heads}

  # 2. Transfer, once per mode, each from the same pretrained params.
  rows, curves = [], {}
  base_size = None
  with tempfile.TemporaryDirectory() as tmp:
    for i, name in enumerate(settings.modes):
      cfg = fa.TransferConfig(
        **MODES[name], remove_heads=list(heads), new_heads={NEW_HEAD: genomics.ASSAYS[NEW_HEAD].head()}
      )
      adapted, p = fa.prepare_for_transfer(
        model, pretrained, cfg, model.dummy_input(), rng=jax.random.key(settings.seed + 100)
      )
      adapted_apply = jax.jit(adapted.apply)
      untrained_r, _ = evaluate(lambda p, x: adapted_apply({'params': p}, x), p, tr_val, NEW_HEAD)
      lr = LEARNING_RATE.get(name, DEFAULT_LR)
      p, losses, sec = train(
        adapted,
        p,
        tr_train,
        steps=settings.transfer_steps,
        batch_size=settings.batch_size,
        lr=lr,
        seed=settings.seed + 10 + i,
        desc=name,
        progress=settings.progress,
      )
      val_r, pred = evaluate(lambda p, x: adapted_apply({'params': p}, x), p, tr_val, NEW_HEAD)
      served, merged = fa.merge_adapters(adapted, p)
      served_apply = jax.jit(served.apply)
      _, merged_pred = evaluate(lambda p, x: served_apply({'params': p}, x), merged, tr_val, NEW_HEAD)
      summary = fa.param_summary(adapted, p)
      ckpt = fa.save_adapters(os.path.join(tmp, name), adapted, p)
      if base_size is None:
        base_dir = os.path.join(tmp, 'base')
        import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

        with ocp.StandardCheckpointer() as c:
          c.save(base_dir, pretrained)
        base_size = directory_size(base_dir)
      stays = sorted({m.name for e in getattr(served, 'plan', ()) for m in e.methods})
      rows.append(
        {
          'mode': name,
          'trainable_params': summary.trainable,
          'total_params': summary.total,
          'trainable_pct': 100 * summary.trainable_fraction,
          'untrained_head_val_r': untrained_r,
          'val_pearson_r': val_r,
          'sec_per_step': sec,
          'max_abs_merged_minus_adapted': float(np.max(np.abs(merged_pred - pred))),
          'unmerged_after_merge': stays,
          'adapter_checkpoint_bytes': directory_size(ckpt),
          'final_train_loss': float(np.mean(losses[-10:])),
        }
      )
      curves[name] = losses

  results = {
    'settings': dataclasses.asdict(settings),
    'model': {'config': dataclasses.asdict(config), 'pretrain_heads': list(heads), 'new_head': NEW_HEAD},
    'pretrain': {'val_pearson_r': pre_r, 'sec_per_step': pre_step, 'final_loss': float(np.mean(pre_losses[-10:]))},
    'base_checkpoint_bytes': base_size,
    'transfer': rows,
    'loss_curves': {'pretrain': pre_losses, **curves},
    'seconds': time.perf_counter() - started,
    'jax': jax.__version__,
    'device': str(jax.devices()[0].device_kind),
  }
  os.makedirs(settings.out_dir, exist_ok=True)
  with open(os.path.join(settings.out_dir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  plot(results, os.path.join(settings.out_dir, 'transfer.png'))
  return results


def table(results: dict) -> str:
  head = f'{"mode":<11} {"trainable":>10} {"% total":>8} {"val r":>7} {"(untrained)":>11} {"s/step":>7} {"|merged-adapted|":>17} {"ckpt":>9}'
  lines = [head, '-' * len(head)]
  for r in results['transfer']:
    stays = f' ({"+".join(r["unmerged_after_merge"])} stay)' if r['unmerged_after_merge'] else ''
    lines.append(
      f'{r["mode"]:<11} {r["trainable_params"]:>10,} {r["trainable_pct"]:>7.2f}% {r["val_pearson_r"]:>7.3f} '
      f'{r["untrained_head_val_r"]:>11.3f} {r["sec_per_step"]:>7.3f} {r["max_abs_merged_minus_adapted"]:>17.2e} '
      f'{r["adapter_checkpoint_bytes"] / 1024:>7.0f}KB{stays}'
    )
  pre = results['pretrain']['val_pearson_r']
  lines.append('')
  lines.append('pretrained heads, val r: ' + ', '.join(f'{k} {v:.3f}' for k, v in pre.items()))
  lines.append(
    f'base checkpoint: {results["base_checkpoint_bytes"] / 1024:.0f}KB; total time {results["seconds"]:.0f}s'
  )
  return '\n'.join(lines)


def plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  # Labels alternate above and below in order of size, so that neighbouring modes stay readable.
  color = {r['mode']: f'C{i}' for i, r in enumerate(results['transfer'])}  # the same in both panels
  for i, r in enumerate(sorted(results['transfer'], key=lambda r: r['trainable_params'])):
    ax1.scatter(r['trainable_params'], r['val_pearson_r'], s=40, color=color[r['mode']])
    ax1.annotate(
      r['mode'],
      (r['trainable_params'], r['val_pearson_r']),
      textcoords='offset points',
      xytext=(4, 6 if i % 2 == 0 else -14),
      fontsize=9,
    )
  untrained = np.mean([r['untrained_head_val_r'] for r in results['transfer']])
  ax1.axhline(untrained, color='gray', ls='--', lw=1, label='untrained new head')
  ax1.set_xscale('log')
  ax1.margins(x=0.12)
  ax1.set_xlabel('trainable parameters')
  ax1.set_ylabel(f'validation Pearson r ({results["model"]["new_head"]})')
  ax1.set_title('Transfer: metric vs trainable parameters')
  ax1.legend(loc='lower right')
  for name, losses in results['loss_curves'].items():
    if name == 'pretrain':
      continue
    k = max(1, len(losses) // 30)
    smooth = np.convolve(losses, np.ones(k) / k, mode='valid')
    ax2.plot(smooth, label=name, color=color.get(name))
  ax2.set_xlabel('step')
  ax2.set_ylabel('training loss (Poisson NLL)')
  ax2.set_title('Transfer loss curves')
  ax2.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> Settings:
  d = Settings()
  p = argparse.ArgumentParser(
    prog='python -m flax_adapters.genomics.demo',
    description='Pretrain an AlphaGenome-style model on a synthetic genomics task, transfer it to a new assay '
    'with every adapter mode, and compare them (table, JSON, PNG).',
  )
  p.add_argument('--seed', type=int, default=d.seed, help='seed for data, init and batches (default %(default)s)')
  p.add_argument('--out-dir', default=d.out_dir, help='where results.json and transfer.png go (default %(default)s)')
  p.add_argument('--size', choices=('small', 'tiny'), default=d.size, help='model size preset (default %(default)s)')
  p.add_argument('--pretrain-steps', type=int, default=d.pretrain_steps, help='pretraining steps (default %(default)s)')
  p.add_argument(
    '--transfer-steps', type=int, default=d.transfer_steps, help='training steps per mode (default %(default)s)'
  )
  p.add_argument('--batch-size', type=int, default=d.batch_size, help='batch size (default %(default)s)')
  p.add_argument(
    '--modes', nargs='+', default=list(d.modes), choices=list(MODES), help='modes to compare (default: all)'
  )
  p.add_argument('--quick', action='store_true', help='a tiny smoke run (toy sizes, few steps)')
  p.add_argument('--no-progress', action='store_true', help='hide progress bars')
  a = p.parse_args(argv)
  common = dict(seed=a.seed, out_dir=a.out_dir, modes=tuple(a.modes), progress=not a.no_progress)
  if a.quick:
    return Settings.quick(**common)
  for name in ('pretrain_steps', 'transfer_steps', 'batch_size'):
    if getattr(a, name) < 1:
      p.error(f'--{name.replace("_", "-")} must be at least 1')
  return Settings(
    size=a.size, pretrain_steps=a.pretrain_steps, transfer_steps=a.transfer_steps, batch_size=a.batch_size, **common
  )


def main(argv: Sequence[str] | None = None) -> dict:
  settings = parse_args(argv)
  results = run(settings)
  print(table(results))
  print(
    f'\nwrote {os.path.join(settings.out_dir, "results.json")} and {os.path.join(settings.out_dir, "transfer.png")}'
  )
  return results


if __name__ == '__main__':
  main()
