"""The transfer study behind the demo: which adapters close how much of the gap to full fine-tuning, and why.

The design (`run`):

1. **Pretrain** a `Seq2Func` model on four assays of the synthetic task (`flax_adapters.genomics.data`).
2. **Splits** for the new assay (`my_atac`): a training split (noisy Poisson counts), a validation split
   and a test split (held-out sequences, scored against the noise-free coverage, Pearson r).
3. **Per mode** (`MODES`: the seed document's configurations, plus Locon moved to the first
   convolutions), every learning rate of a small grid trains once (run seed 0); each run keeps the
   checkpoint with the best validation r (evaluated every `eval_every` steps). The rate with the best
   validation r is chosen, and rerun with more run seeds (adapter and head init, batch order). Each run
   is scored once, on test: the table reports mean ± standard deviation over the run seeds.
4. **Why**: a linear probe of what each layer of the trunk encodes (per motif; `probe`), and a Locon
   ablation (`ABLATIONS`) that separates placement from rank.

`Study.default()` fits the demo's time budget (under 5 minutes on 2 CPU cores); `Study.full()` runs every
mode on a wider grid with more seeds and steps; `Study.quick()` is a toy-size smoke run. Everything is
deterministic for a given seed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

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
PRETRAIN_LR = 2e-3
# The seed document's Locon4 preset: the last two conv blocks (4 Locon adapters).
LOCON4 = ('down_blocks.4', 'down_blocks.5')
# The first convolutions, where motifs are detected: the stem and the first two conv blocks (5 adapters).
EARLY_CONVS = ('stem', 'down_blocks.0', 'down_blocks.1')


@dataclasses.dataclass(frozen=True)
class Mode:
  """A transfer mode of the study: `TransferConfig` fields (heads are added by the study) and a one-line why."""

  config: Mapping[str, Any]
  about: str


MODES: Mapping[str, Mode] = {
  'linear': Mode(dict(mode='linear'), 'new head only (linear probing)'),
  'lora': Mode(
    dict(mode='lora', lora_rank=8, lora_alpha=16, lora_targets=['q_proj', 'v_proj']), 'LoRA on attention q/v'
  ),
  'locon': Mode(
    dict(mode='locon', locon_rank=4, locon_alpha=1, locon_targets=list(LOCON4)), 'Locon4: last two conv blocks'
  ),
  'ia3': Mode(dict(mode='ia3', ia3_targets=['k_proj', 'v_proj'], ia3_ff_targets=['fc2']), 'IA3 on k/v, IA3_FF on fc2'),
  'houlsby': Mode(
    dict(mode='houlsby', houlsby_latent_dim=8, houlsby_placement='block', houlsby_targets=['mha', 'mlp']),
    'Houlsby bottlenecks on mha/mlp',
  ),
  'lora+locon': Mode(
    dict(mode=['lora', 'locon'], lora_targets=['q_proj', 'v_proj'], locon_targets=list(LOCON4)),
    'LoRA q/v + Locon4',
  ),
  'locon-early': Mode(
    dict(mode='locon', locon_rank=8, locon_alpha=8, locon_targets=list(EARLY_CONVS)),
    'Locon r8 on the stem and conv blocks 0-1',
  ),
  'full': Mode(dict(mode='full'), 'every weight (full fine-tuning)'),
}

# What the ablation varies, one thing at a time, against 'locon-early' (Locon r8, alpha 8 on the first convs).
ABLATIONS: Mapping[str, Mode] = {
  'locon r8, late convs': Mode(
    dict(mode='locon', locon_rank=8, locon_alpha=8, locon_targets=list(LOCON4)),
    "placement: locon-early's rank and scale on the last two conv blocks",
  ),
  'locon r4 a1, early convs': Mode(
    dict(mode='locon', locon_rank=4, locon_alpha=1, locon_targets=list(EARLY_CONVS)),
    "rank and scale: the seed's Locon defaults (r4, alpha 1) on locon-early's convs",
  ),
  'lora r8, every tower linear': Mode(
    dict(mode='lora', lora_rank=8, lora_alpha=16, lora_targets=['q_proj', 'k_proj', 'v_proj', 'o_proj', 'fc1', 'fc2']),
    'capacity in the transformer: LoRA on all six linears of each block',
  ),
  'fine-tune conv tower only': Mode(
    dict(mode='linear', modules_to_save=['encoder']), 'every conv-tower weight trains, the transformer is frozen'
  ),
  'fine-tune transformer only': Mode(
    dict(mode='linear', modules_to_save=['tower']), 'every transformer weight trains, the conv tower is frozen'
  ),
}

# The modes and ablations whose learning rate the ablation borrows: it reruns the chosen rate of this mode.
ABLATION_LR_FROM = {
  'locon r8, late convs': 'locon-early',
  'locon r4 a1, early convs': 'locon-early',
  'lora r8, every tower linear': 'lora',
  'fine-tune conv tower only': 'full',
  'fine-tune transformer only': 'full',
}


@dataclasses.dataclass(frozen=True)
class Study:
  """Sizes of a study: the model, the data, the grid, the seeds and the steps."""

  name: str = 'default'
  size: str = 'small'
  seq_len: int = 1024
  seed: int = 0
  pretrain_steps: int = 1000
  pretrain_examples: int = 16384
  train_examples: int = 2048
  val_examples: int = 512
  test_examples: int = 512
  probe_examples: int = 256
  batch_size: int = 32
  steps: int = 250
  eval_every: int = 50
  lr_grid: tuple[float, ...] = (3e-3, 1e-2)
  seeds: int = 3
  modes: tuple[str, ...] = ('linear', 'lora', 'locon', 'locon-early', 'full')
  ablations: tuple[str, ...] = ()
  ablation_seeds: int = 3
  out_dir: str = 'demo_out'
  progress: bool = True

  def __post_init__(self):
    unknown = [m for m in self.modes if m not in MODES]
    if unknown:
      raise ValueError(f'`modes` {unknown} are unknown; choose from {list(MODES)}.')
    unknown = [a for a in self.ablations if a not in ABLATIONS]
    if unknown:
      raise ValueError(f'`ablations` {unknown} are unknown; choose from {list(ABLATIONS)}.')
    for name in ('pretrain_steps', 'steps', 'batch_size', 'seeds', 'eval_every'):
      if getattr(self, name) < 1:
        raise ValueError(f'`{name}` must be at least 1, found {getattr(self, name)}.')
    if not self.lr_grid or any(not lr > 0 for lr in self.lr_grid):
      raise ValueError(f'`lr_grid` must hold positive learning rates, found {self.lr_grid}.')
    needed = {ABLATION_LR_FROM[a] for a in self.ablations}
    missing = sorted(needed - set(self.modes))
    if missing:
      raise ValueError(
        f'the ablations {list(self.ablations)} borrow the learning rate of modes {missing}; add them to `modes`.'
      )

  def replace(self, **changes) -> Study:
    return dataclasses.replace(self, **changes)

  @classmethod
  def default(cls, **changes) -> Study:
    """The demo's default: five modes, a 2-point grid, 3 seeds, the probe; about 4-5 minutes on 2 CPU cores."""
    return cls(**changes)

  @classmethod
  def full(cls, **changes) -> Study:
    """Every mode, a 4-point grid, 5 seeds, twice the steps, every ablation with 3 seeds (about an hour)."""
    return cls(
      **{
        **dict(
          name='full',
          steps=500,
          eval_every=25,
          lr_grid=(1e-3, 3e-3, 1e-2, 3e-2),
          seeds=5,
          modes=tuple(MODES),
          ablations=tuple(ABLATIONS),
          ablation_seeds=3,
        ),
        **changes,
      }
    )

  @classmethod
  def quick(cls, **changes) -> Study:
    """A toy-size smoke run of the same pipeline (tiny model, few steps, 2 seeds)."""
    return cls(
      **{
        **dict(
          name='quick',
          size='tiny',
          pretrain_steps=30,
          pretrain_examples=64,
          train_examples=32,
          val_examples=16,
          test_examples=16,
          probe_examples=32,  # fewer leave some motifs without sites in the held-out bins (r undefined)
          batch_size=8,
          steps=10,
          eval_every=5,
          seeds=2,
          ablations=('locon r8, late convs', 'locon r4 a1, early convs'),
          ablation_seeds=1,
        ),
        **changes,
      }
    )


# --------------------------------------------------------------------------------------------
# Training and evaluation


def poisson_loss(pred: Mapping[str, jax.Array], target: Mapping[str, jax.Array]) -> jax.Array:
  """Poisson negative log-likelihood of coverage, averaged over heads, bins and tracks."""
  losses = [jnp.mean(pred[k] - target[k] * jnp.log(pred[k] + 1e-6)) for k in target]
  return sum(losses) / len(losses)


def batches(n_examples: int, batch_size: int, steps: int, seed) -> Any:
  """`steps` index arrays of `batch_size` distinct examples each, deterministic for `seed`."""
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    yield rng.choice(n_examples, size=batch_size, replace=False)


def predict(apply_fn: Callable, params, x: np.ndarray, head: str, batch_size: int = 128) -> np.ndarray:
  """`apply_fn(params, x_batch)[head]` over `x` in batches, as one numpy array."""
  return np.concatenate(
    [np.asarray(apply_fn(params, x[i : i + batch_size])[head]) for i in range(0, len(x), batch_size)]
  )


def pearson_r(pred: np.ndarray, target: np.ndarray) -> float:
  """`genomics.pearson_r` in numpy (float64; no device work): per track over all bins, averaged over tracks."""
  p = np.asarray(pred, np.float64).reshape(-1, pred.shape[-1])
  t = np.asarray(target, np.float64).reshape(-1, target.shape[-1])
  p, t = p - p.mean(0), t - t.mean(0)
  denom = np.sqrt((p * p).sum(0) * (t * t).sum(0))
  with np.errstate(invalid='ignore', divide='ignore'):
    return float(np.mean(np.where(denom > 0, (p * t).sum(0) / denom, np.nan)))


def pearson(apply_fn: Callable, params, split, head: str) -> float:
  """Pearson r of `head`'s predictions on a split `(x, {head: y})`, averaged over tracks."""
  x, y = split
  return pearson_r(predict(apply_fn, params, x, head), y[head])


# One compiled copy per tree structure (eager jnp.copy would compile once per leaf shape).
copy_tree = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def train(model, params, data, *, steps: int, batch_size: int, lr: float, seed: int, desc: str, progress: bool = True):
  """Adam on the trainable part of `params` (e.g. pretraining); returns (params, losses, median seconds per step)."""
  trainable, frozen = fa.partition(params, fa.trainable_mask(model, params))
  fit = Fitter(model, tx_lr=lr)
  x, y = data
  trainable, losses, times = fit.loop(
    copy_tree(trainable), fit.tx.init(trainable), frozen, x, y, steps, batch_size, seed, desc, progress
  )
  return fa.combine(trainable, frozen), losses, _median_step(times)


def _median_step(times: Sequence[float]) -> float:
  return float(np.median(times[1:] or times))  # the first step includes compilation


class Fitter:
  """One compiled train step for an adapted model; `tx_lr=None` puts the learning rate in the optimizer state.

  With the rate in the state (`optax.inject_hyperparams`), every learning rate and every run seed of a
  mode reuse one compiled step.
  """

  def __init__(self, model, tx_lr: float | None = None):
    self.model = model
    self.tx = optax.adam(tx_lr) if tx_lr is not None else optax.inject_hyperparams(optax.adam)(learning_rate=0.0)
    loss = lambda p, x, y: poisson_loss(model.apply({'params': p}, x), y)
    # Donated: the caller passes copies (partition shares arrays with the pretrained params).
    self.step = fa.make_train_step(loss, self.tx)
    self.apply = jitted_apply(model)

  def init(self, trainable, lr: float):
    state = self.tx.init(trainable)
    state.hyperparams['learning_rate'] = jnp.asarray(lr, jnp.float32)
    return state

  def loop(self, trainable, opt_state, frozen, x, y, steps, batch_size, seed, desc, progress, on_eval=None, every=0):
    """Runs `steps` steps; calls `on_eval(step, trainable)` every `every` steps and at the end."""
    losses, times = [], []
    bar = tqdm(
      batches(len(x), batch_size, steps, seed), total=steps, desc=f'{desc:>28}', disable=not progress, leave=False
    )
    for i, idx in enumerate(bar, 1):
      start = time.perf_counter()
      trainable, opt_state, loss = self.step(trainable, opt_state, frozen, x[idx], {k: v[idx] for k, v in y.items()})
      losses.append(float(loss))  # float() waits for the step to finish
      times.append(time.perf_counter() - start)
      if on_eval is not None and (i % every == 0 or i == steps):
        on_eval(i, trainable)
      if i % 10 == 0:
        bar.set_postfix(loss=f'{losses[-1]:.4f}')
    return trainable, losses, times


@dataclasses.dataclass
class Run:
  """One training run: its rate and seed, its best validation r (and step), and its test r there."""

  lr: float
  seed: int
  val_r: float
  best_step: int
  test_r: float
  sec_per_step: float
  losses: list[float]
  val_curve: list[tuple[int, float]] = dataclasses.field(default_factory=list)
  params: Any = dataclasses.field(repr=False, default=None)

  def record(self) -> dict:
    return {
      'lr': self.lr,
      'seed': self.seed,
      'val_r': self.val_r,
      'best_step': self.best_step,
      'test_r': self.test_r,
      'val_curve': [list(point) for point in self.val_curve],
    }


class ModeRunner:
  """Trains one mode from the pretrained params: `fit(lr, seed)` is one run."""

  def __init__(self, model: Seq2Func, pretrained, config: Mapping[str, Any], splits: Mapping[str, Any], study: Study):
    self.base, self.pretrained, self.splits, self.study = model, pretrained, splits, study
    self.config = fa.TransferConfig(
      **config, remove_heads=list(model.heads), new_heads={NEW_HEAD: genomics.ASSAYS[NEW_HEAD].head()}
    )
    self._prepared = {}
    self.model, params = self.prepare(0)
    self.mask = fa.trainable_mask(self.model, params)
    self.summary = fa.param_summary(self.model, params)
    self.fitter = Fitter(self.model)

  def prepare(self, run_seed: int):
    """The adapted model and params; the new head and the adapters start from a key of the study and run seeds."""
    if run_seed not in self._prepared:
      key = jax.random.key(1000 * self.study.seed + run_seed + 100)
      dummy = self.base.dummy_input()
      self._prepared[run_seed] = fa.prepare_for_transfer(self.base, self.pretrained, self.config, dummy, rng=key)
    return self._prepared[run_seed]

  def fit(self, lr: float, run_seed: int, desc: str, *, test: bool = True) -> Run:
    _, params = self.prepare(run_seed)
    trainable, frozen = fa.partition(params, self.mask)
    trainable = copy_tree(trainable)  # donated by the step; the pretrained arrays stay intact
    apply = self.fitter.apply
    best = {'r': -np.inf, 'step': 0, 'trainable': None}
    curve = []

    def on_eval(step, current):
      r = pearson(apply, fa.combine(current, frozen), self.splits['val'], NEW_HEAD)
      curve.append((step, r))
      if r > best['r']:  # nan (a collapsed run) never counts as best
        best.update(r=r, step=step, trainable=copy_tree(current))

    x, y = self.splits['train']
    s = self.study
    last, losses, times = self.fitter.loop(
      trainable,
      self.fitter.init(trainable, lr),
      frozen,
      x,
      y,
      s.steps,
      s.batch_size,
      [s.seed, run_seed, 7],
      desc,
      s.progress,
      on_eval=on_eval,
      every=s.eval_every,
    )
    # A run whose validation r was never a number (collapsed) keeps its last step.
    params = fa.combine(last if best['trainable'] is None else best['trainable'], frozen)
    test_r = pearson(apply, params, self.splits['test'], NEW_HEAD) if test else float('nan')
    return Run(lr, run_seed, float(best['r']), best['step'], test_r, _median_step(times), losses, curve, params)


def summarize(runs: Sequence[Run]) -> dict:
  """Mean, standard deviation (n-1) and range of the test r over runs."""
  r = np.array([run.test_r for run in runs])
  return {
    'n': len(r),
    'test_r_mean': float(np.mean(r)),
    'test_r_sd': float(np.std(r, ddof=1)) if len(r) > 1 else 0.0,
    'test_r_min': float(np.min(r)),
    'test_r_max': float(np.max(r)),
  }


# --------------------------------------------------------------------------------------------
# What the trunk encodes


PROBE_LAYERS = ('stem', 'down_blocks_0', 'down_blocks_1', 'down_blocks_2', 'down_blocks_3', 'down_blocks_4')
PROBE_LAYERS += ('down_blocks_5', 'tower')


def _layer_outputs(intermediates) -> dict[str, np.ndarray]:
  enc = intermediates['encoder']
  out = {name: enc[name]['__call__'][0] for name in PROBE_LAYERS[:-1]}
  out['tower'] = intermediates['tower']['__call__'][0]
  return {k: np.asarray(v) for k, v in out.items()}


def _ridge_r(features: np.ndarray, target: np.ndarray, l2: float = 1.0) -> float:
  """Ridge regression fit on the first half of the rows, Pearson r on the second half."""
  half = len(features) // 2
  x = (features - features[:half].mean(0)) / (features[:half].std(0) + 1e-6)  # standardized by the fit half
  x = np.concatenate([x, np.ones((len(x), 1))], 1)
  a, b = x[:half], target[:half]
  w = np.linalg.solve(a.T @ a + l2 * np.eye(a.shape[1]), a.T @ b)
  pred, true = x[half:] @ w, target[half:]
  if pred.std() == 0 or true.std() == 0:
    return float('nan')
  return float(np.corrcoef(pred, true)[0, 1])


def probe(apply_fn: Callable, params, batch: genomics.GenomicsBatch, motifs: Mapping[str, int], bin_size: int) -> dict:
  """How well each layer's features predict, per output bin, how many sites of each motif it holds.

  Each layer's output is mean- and max-pooled to the head's bins and a ridge regression is fit on half of
  the bins (features standardized); the score is the Pearson r on the other half. A motif the trunk
  never learned scores about as low as it does in a randomly initialised trunk. `motifs` maps each
  motif's name to its length; `apply_fn(params, x)` returns the model's intermediates.
  """
  seq_len = batch.onehot.shape[1]
  n_bins = seq_len // bin_size
  counts = np.zeros((len(batch.sites), n_bins, len(motifs)))
  for i, sites in enumerate(batch.sites):
    for site in sites:
      centre = site.start + motifs[site.motif] // 2
      counts[i, centre // bin_size, list(motifs).index(site.motif)] += 1
  pooled: dict[str, list] = {}
  for i in range(0, len(batch.onehot), 64):
    for name, h in _layer_outputs(apply_fn(params, batch.onehot[i : i + 64])).items():
      n, length, c = h.shape
      h = h.reshape(n, n_bins, length // n_bins, c)
      pooled.setdefault(name, []).append(np.concatenate([h.mean(2), h.max(2)], -1))
  out = {}
  for name in PROBE_LAYERS:
    f = np.concatenate(pooled[name]).reshape(-1, pooled[name][0].shape[-1])
    out[name] = {m: _ridge_r(f, counts[..., j].reshape(-1)) for j, m in enumerate(motifs)}
  return out


@functools.cache
def _intermediates_fn(model) -> Callable:
  def run(params, x):
    _, state = model.apply({'params': params}, x, capture_intermediates=True, mutable=['intermediates'])
    return state['intermediates']

  return jax.jit(run)


# --------------------------------------------------------------------------------------------
# The study


@functools.cache
def jitted_apply(model) -> Callable:
  """`jit(lambda params, x: model.apply({'params': params}, x))`, compiled once per model."""
  return jax.jit(lambda p, x: model.apply({'params': p}, x))


@functools.cache
def _jitted_init(model) -> Callable:
  return jax.jit(model.init)


def init_params(model: Seq2Func, seed: int):
  """Freshly initialised params (one compiled init; eager init would compile every op on its own)."""
  return _jitted_init(model)(jax.random.key(seed), model.dummy_input())['params']


def build_model(size: str, seq_len: int | None = None) -> Seq2Func:
  config = Seq2FuncConfig.small() if size == 'small' else Seq2FuncConfig.tiny()
  if seq_len is not None and size == 'small':
    config = config.replace(seq_len=seq_len)
  return Seq2Func(config, heads={h: genomics.ASSAYS[h].head() for h in PRETRAIN_HEADS})


def make_splits(model: Seq2Func, study: Study) -> dict:
  """Pretraining data and the new assay's train / validation / test splits (disjoint random draws)."""
  s = study.seed
  rng = lambda k: np.random.default_rng([s, k])
  task = genomics.GenomicsTask.for_model(model, seed=s)
  new = task.with_assays([NEW_HEAD], bin_size=model.config.head_bin_size(genomics.ASSAYS[NEW_HEAD].modality))
  return {
    'task': task,
    'new_task': new,
    'pretrain': task.sample(study.pretrain_examples, rng=rng(1)),
    # Validation and test compare predictions with the true (noise-free) coverage.
    'pretrain_val': task.sample(study.val_examples, rng=rng(2), noise=False),
    'train': new.sample(study.train_examples, rng=rng(3)),
    'val': new.sample(study.val_examples, rng=rng(4), noise=False),
    'test': new.sample(study.test_examples, rng=rng(5), noise=False),
    'probe': new.generate(study.probe_examples, rng=rng(6)),
  }


def pretrain(model: Seq2Func, splits, study: Study):
  """Every weight trains on the pretraining assays; returns (params, losses, seconds per step)."""
  params = init_params(model, study.seed)
  everything, params = fa.prepare_for_transfer(model, params, fa.TransferConfig(mode='full'), model.dummy_input())
  return train(
    everything,
    params,
    splits['pretrain'],
    steps=study.pretrain_steps,
    batch_size=study.batch_size,
    lr=PRETRAIN_LR,
    seed=[study.seed, 0],
    desc='pretrain',
    progress=study.progress,
  )


def directory_size(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _serving_checks(runner: ModeRunner, run: Run, tmp: str, name: str) -> dict:
  """Merge the run's adapters for serving (max |merged - adapted| on validation) and save them."""
  x_val = runner.splits['val'][0]
  served, merged = fa.merge_adapters(runner.model, run.params)
  merged_pred = predict(jitted_apply(served), merged, x_val, NEW_HEAD)
  pred = predict(runner.fitter.apply, run.params, x_val, NEW_HEAD)
  ckpt = fa.save_adapters(os.path.join(tmp, name.replace(' ', '_')), runner.model, run.params)
  return {
    'max_abs_merged_minus_adapted': float(np.max(np.abs(merged_pred - pred))),
    'unmerged_after_merge': sorted({m.name for e in getattr(served, 'plan', ()) for m in e.methods}),
    'adapter_checkpoint_bytes': directory_size(ckpt),
  }


def run(study: Study) -> dict:
  """The whole study; returns the results that it also writes to `study.out_dir` (JSON and PNG)."""
  started, cpu_started = time.perf_counter(), time.process_time()
  model = build_model(study.size, study.seq_len)
  splits = make_splits(model, study)
  n_runs = len(study.modes) * (len(study.lr_grid) + study.seeds - 1) + len(study.ablations) * study.ablation_seeds
  progress = tqdm(total=n_runs, desc='study runs', disable=not study.progress)

  pretrained, pre_losses, pre_step = pretrain(model, splits, study)
  base_apply = jitted_apply(model)
  pre_r = {h: pearson(base_apply, pretrained, splits['pretrain_val'], h) for h in model.heads}

  rows, runners, chosen = [], {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for name in study.modes:
      mode_start = time.perf_counter()
      runner = runners[name] = ModeRunner(model, pretrained, MODES[name].config, splits, study)
      grid = []
      for lr in study.lr_grid:
        grid.append(runner.fit(lr, 0, f'{name} lr={lr:g} seed 0'))
        progress.update()
      best = max(grid, key=lambda r: (r.val_r, -r.lr))
      seeds = [best]
      for k in range(1, study.seeds):
        seeds.append(runner.fit(best.lr, k, f'{name} lr={best.lr:g} seed {k}'))
        progress.update()
      chosen[name] = best.lr
      rows.append(
        {
          'mode': name,
          'about': MODES[name].about,
          'config': _jsonable(MODES[name].config),
          'trainable_params': runner.summary.trainable,
          'total_params': runner.summary.total,
          'trainable_pct': 100 * runner.summary.trainable_fraction,
          'lr_grid': list(study.lr_grid),
          'grid_val_r': [r.val_r for r in grid],
          'grid_best_step': [r.best_step for r in grid],
          'chosen_lr': best.lr,
          'chosen_at_grid_edge': len(study.lr_grid) > 1 and best.lr in (min(study.lr_grid), max(study.lr_grid)),
          'runs': [r.record() for r in seeds],
          **summarize(seeds),
          'sec_per_step': float(np.median([r.sec_per_step for r in grid + seeds[1:]])),
          'seconds': time.perf_counter() - mode_start,
          'loss_curve': best.losses,
          **_serving_checks(runner, best, tmp, name),
        }
      )
      runner.best = best  # kept for the probe
    base_dir = os.path.join(tmp, 'base')
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    with ocp.StandardCheckpointer() as c:
      c.save(base_dir, pretrained)
    base_size = directory_size(base_dir)

  _add_gap_closed(rows)
  ablation = []
  for name in study.ablations:
    runner = ModeRunner(model, pretrained, ABLATIONS[name].config, splits, study)
    lr = chosen[ABLATION_LR_FROM[name]]
    runs = []
    for k in range(study.ablation_seeds):
      runs.append(runner.fit(lr, k, f'{name} seed {k}'))
      progress.update()
    ablation.append(
      {
        'name': name,
        'about': ABLATIONS[name].about,
        'config': _jsonable(ABLATIONS[name].config),
        'lr': lr,
        'lr_from': ABLATION_LR_FROM[name],
        'trainable_params': runner.summary.trainable,
        'runs': [r.record() for r in runs],
        **summarize(runs),
      }
    )
  progress.close()

  probes = _probes(model, pretrained, runners, splits)
  results = {
    'study': dataclasses.asdict(study),
    'design': DESIGN,
    'model': {
      'config': dataclasses.asdict(model.config),
      'pretrain_heads': list(model.heads),
      'new_head': NEW_HEAD,
      'new_assay': _jsonable(dataclasses.asdict(genomics.ASSAYS[NEW_HEAD])),
    },
    'pretrain': {'val_pearson_r': pre_r, 'sec_per_step': pre_step, 'final_loss': float(np.mean(pre_losses[-10:]))},
    'base_checkpoint_bytes': base_size,
    'transfer': rows,
    'ablation': ablation,
    'probe': probes,
    'seconds': time.perf_counter() - started,
    'cpu_seconds': time.process_time() - cpu_started,
    'jax': jax.__version__,
    'device': str(jax.devices()[0].device_kind),
    'cpu_count': os.cpu_count(),
  }
  return results


DESIGN = (
  'Per mode: each learning rate of lr_grid trains once (run seed 0), keeping the checkpoint with the best '
  'validation Pearson r (checked every eval_every steps); the rate with the best validation r is chosen and '
  'rerun with run seeds 1..seeds-1 (adapter/head init and batch order; one pretrained model). Every run is '
  'scored once on the test split at its best validation checkpoint; test_r_sd is the standard deviation '
  'over run seeds (ddof=1). gap_closed = (mean - linear mean) / (full mean - linear mean). Validation and '
  'test are held-out sequences scored against the noise-free coverage; training targets are noisy counts.'
)


def _add_gap_closed(rows: list[dict]) -> None:
  by_mode = {r['mode']: r for r in rows}
  if 'linear' not in by_mode or 'full' not in by_mode:
    return
  low, high = by_mode['linear']['test_r_mean'], by_mode['full']['test_r_mean']
  for r in rows:
    r['gap_closed'] = (r['test_r_mean'] - low) / (high - low) if high != low else float('nan')


def probe_trunk(model, params, splits) -> dict:
  """`probe` of `model` (a `Seq2Func` or an adapted one) with `params` on the study's probe sequences."""
  motifs = {name: len(m) for name, m in splits['task'].motifs.items()}
  bin_size = splits['new_task'].bin_sizes[NEW_HEAD]
  return probe(_intermediates_fn(model), params, splits['probe'], motifs, bin_size)


def _probes(model, pretrained, runners: Mapping[str, ModeRunner], splits) -> dict:
  """The probe on a random-init trunk, the pretrained trunk, and the trunks after conv-level transfer."""
  out = {
    'random init': probe_trunk(model, init_params(model, 12345), splits),
    'pretrained': probe_trunk(model, pretrained, splits),
  }
  for name in ('locon-early', 'full'):
    if name in runners:
      out[f'after {name}'] = probe_trunk(runners[name].model, runners[name].best.params, splits)
  return {'motifs': list(splits['task'].motifs), 'layers': list(PROBE_LAYERS), 'scores': out}


def _jsonable(x):
  if isinstance(x, Mapping):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x
