"""The real AlphaGenome (450M): a LoRA training step, Flax (flax_adapters) vs the PyTorch port, side by side.

    python -m benchmarks.alphagenome            # 2048 bp, then the longest input that fits (~30-60 min on 2 cores)
    python -m benchmarks.alphagenome --quick    # tiny widths, 2 steps: a smoke test of this script
    python -m benchmarks.alphagenome --readme   # also write the table into README.md

Both sides train the same thing from the same weights and batch: the adapter guide's LoRA (rank 8,
alpha 16, on `q_proj`/`v_proj`) with one new head `my_atac` (ATAC, 4 tracks) in place of the
pretrained heads, norms frozen (the port's default), AdamW (torch's defaults, lr 1e-4), loss the mean
squared error of `my_atac` at 1 bp and 128 bp in model space, batch one 2048 bp sequence. The weights
are a random model with calibrated norm statistics (`random_variables`), written once in the port's
safetensors format: the port reads it with `AlphaGenome.from_pretrained`, Flax with
`conversion.alphagenome`. The run checks that the two sides' losses agree.

Each side runs in its own process (its peak RSS is its own; the Flax process never imports torch):
Flax steps are `fa.make_train_step` (jitted; compile time reported apart), torch steps the usual
`zero_grad / backward / step`. Peak RSS is reported for the whole process and for training alone
(the peak count restarts after the warm-up steps, once setup's free pages are given back). The
longest input that fits: lengths double from 4096 bp while the training peak of each side stays under
`--memory-gib` (default 8, the per-process budget of this shared machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import common

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NEW = {'my_atac': {'modality': 'atac', 'num_tracks': 4}}
LORA = dict(mode='lora', lora_rank=8, lora_alpha=16, lora_targets=['q_proj', 'v_proj'])
ADAMW = dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)


def processor() -> dict:
  """Vendor, model and the instruction-set flags that matter for float32 matmuls, from /proc/cpuinfo."""
  info = {}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        key = key.strip()
        if key in ('vendor_id', 'model name', 'flags') and key not in info:
          info[key] = value.strip()
  except OSError:
    pass
  flags = set(info.get('flags', '').split())
  wanted = ('avx', 'avx2', 'fma', 'avx512f', 'avx512_bf16', 'amx_tile', 'amx_bf16')
  return {
    'vendor': info.get('vendor_id'),
    'model': info.get('model name'),
    'flags': [f for f in wanted if f in flags],
    'cores': os.cpu_count(),
  }


# -- the shared setup --------------------------------------------------------------------------------


def config(quick: bool):
  from flax_adapters.genomics.alphagenome import AlphaGenomeConfig

  return AlphaGenomeConfig.tiny() if quick else AlphaGenomeConfig()


def ours(quick: bool, length: int):
  """Our model, base variables and the adapted model with its initial params (deterministic)."""
  import jax
  import jax.numpy as jnp

  import flax_adapters as fa
  from flax_adapters.genomics.alphagenome import AlphaGenome

  model = AlphaGenome(config(quick))
  cfg = fa.TransferConfig(**LORA, keep_heads=[], new_heads=NEW, unfreeze_norm=False)
  dna = jax.ShapeDtypeStruct((1, length, 4), jnp.float32)
  organism = jax.ShapeDtypeStruct((1,), jnp.int32)
  return model, cfg, dna, organism


def make_weights(directory: str, quick: bool, length: int) -> dict:
  """The base weights (port format), the initial adapter and head values (port names), the batch."""
  import jax
  import numpy as np

  import flax_adapters as fa
  from conversion import alphagenome as ca
  from flax_adapters.genomics.alphagenome import random_variables

  model, cfg, dna, organism = ours(quick, length)
  t = time.perf_counter()
  variables = random_variables(model, seed=0)
  ca.save_port_checkpoint(os.path.join(directory, 'base.safetensors'), variables, model.config)
  adapted, params = fa.prepare_for_transfer(model, variables['params'], cfg, dna, organism, rng=jax.random.key(0))
  state = ca.port_adapter_state_dict(adapted, params, adapted.base.buffers_for(variables['buffers']))
  trainable = {k: v for k, v in state.items() if 'lora_' in k or k.startswith('heads.')}
  np.savez(os.path.join(directory, 'init.npz'), **trainable)
  return {'weights_s': time.perf_counter() - t}


def batch(length: int, quick: bool):
  import numpy as np

  rng = np.random.default_rng(length)
  dna = np.eye(4, dtype=np.float32)[rng.integers(0, 4, (1, length))]
  targets = {r: rng.uniform(0.0, 2.0, (1, length // r, 4)).astype(np.float32) for r in (1, 128)}
  return dna, np.zeros((1,), np.int64), targets


# -- the two sides (each its own process) ------------------------------------------------------------


def run_jax(args) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from safetensors.numpy import load_file

  import flax_adapters as fa
  from conversion import alphagenome as ca

  t0 = time.perf_counter()
  model, cfg, dna_spec, organism_spec = ours(args.quick, args.length)
  variables = ca.variables_from_port(load_file(os.path.join(args.dir, 'base.safetensors')), model.config)
  adapted, params = fa.prepare_for_transfer(
    model, variables['params'], cfg, dna_spec, organism_spec, rng=jax.random.key(0)
  )
  buffers = adapted.base.buffers_for(variables['buffers'])
  del variables
  dna, organism, targets = batch(args.length, args.quick)
  dna, organism = jnp.asarray(dna), jnp.asarray(organism, jnp.int32)
  targets = {r: jnp.asarray(t) for r, t in targets.items()}

  def loss_fn(p, dna, organism, targets):
    out = adapted.apply(
      {'params': p, 'buffers': buffers}, dna, organism, output_heads=['my_atac'], return_scaled_predictions=True
    )
    return sum(jnp.mean((out['my_atac'][r] - targets[r]) ** 2) for r in (1, 128)) / 2

  tx = optax.adamw(ADAMW['lr'], b1=ADAMW['b1'], b2=ADAMW['b2'], eps=ADAMW['eps'], weight_decay=ADAMW['weight_decay'])
  trainable, frozen = fa.partition(params, fa.trainable_mask(adapted, params))
  del params
  opt_state = tx.init(trainable)
  step = fa.make_train_step(loss_fn, tx)
  t1 = time.perf_counter()
  compiled = step.lower(trainable, opt_state, frozen, dna, organism, targets).compile()
  t2 = time.perf_counter()
  state = {'trainable': trainable, 'opt_state': opt_state}

  def one_step():
    state['trainable'], state['opt_state'], loss = compiled(
      state['trainable'], state['opt_state'], frozen, dna, organism, targets
    )
    jax.block_until_ready((state['trainable'], loss))
    return float(loss)

  n_train = sum(int(x.size) for x in jax.tree.leaves(trainable))
  return {'setup_s': t1 - t0, 'compile_s': t2 - t1, 'trainable_params': n_train, **measure(one_step, args)}


def run_torch(args) -> dict:
  import numpy as np
  import torch
  from alphagenome_pytorch import AlphaGenome
  from alphagenome_pytorch.extensions.finetuning import transfer

  torch.set_num_threads(os.cpu_count() or 1)
  if args.quick:
    raise SystemExit('the port has fixed widths: --quick runs the Flax side only')
  t0 = time.perf_counter()
  model = AlphaGenome.from_pretrained(os.path.join(args.dir, 'base.safetensors'))
  transfer.remove_all_heads(model)
  model = transfer.prepare_for_transfer(model, transfer.TransferConfig(**LORA, new_heads=NEW))
  init = {k: torch.from_numpy(v) for k, v in np.load(os.path.join(args.dir, 'init.npz')).items()}
  missing, unexpected = model.load_state_dict(init, strict=False)
  trainable = [n for n, p in model.named_parameters() if p.requires_grad]
  if unexpected or set(trainable) - set(init):
    raise RuntimeError(
      f'initial values do not fit the port model: unexpected {unexpected[:3]}, unset {sorted(set(trainable) - set(init))[:3]}'
    )
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(
    params, lr=ADAMW['lr'], betas=(ADAMW['b1'], ADAMW['b2']), eps=ADAMW['eps'], weight_decay=ADAMW['weight_decay']
  )
  dna, organism, targets = batch(args.length, args.quick)
  dna, organism = torch.from_numpy(dna), torch.from_numpy(organism)
  targets = {r: torch.from_numpy(t) for r, t in targets.items()}
  model.train()

  def one_step():
    opt.zero_grad(set_to_none=True)
    out = model(dna, organism, heads=('my_atac',), return_scaled_predictions=True)
    loss = sum(torch.mean((out['my_atac'][r] - targets[r]) ** 2) for r in (1, 128)) / 2
    loss.backward()
    opt.step()
    return float(loss)

  t1 = time.perf_counter()
  return {
    'setup_s': t1 - t0,
    'trainable_params': sum(p.numel() for p in params),
    'torch_version': torch.__version__,
    **measure(one_step, args),
  }


def measure(one_step, args) -> dict:
  """Warm-up steps, then the training peak restarts (after giving setup's free pages back) and timed steps."""
  warmup = [one_step() for _ in range(args.warmup)]
  process_peak = common.peak_rss_mib()
  common.release_free_memory()
  common.reset_peak_rss()
  times, loads, losses = [], [], []
  for _ in range(args.steps):
    meter = common.LoadMeter()
    t = time.perf_counter()
    losses.append(one_step())
    times.append(time.perf_counter() - t)
    loads.append(meter.others())
  return {
    'warmup_losses': warmup,
    'times': times,
    'losses': losses,
    'others_load': loads,
    'training_peak_rss_mib': common.peak_rss_mib(),
    'process_peak_rss_mib': max(process_peak, common.peak_rss_mib()),
  }


# -- the driver --------------------------------------------------------------------------------------


def side(name: str, args, length: int, steps: int, warmup: int) -> dict:
  cmd = [sys.executable, '-m', 'benchmarks.alphagenome', '--side', name, '--dir', args.dir, '--length', str(length)]
  cmd += ['--steps', str(steps), '--warmup', str(warmup)] + (['--quick'] if args.quick else [])
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT})
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode or not lines:
    return {'failed': True, 'returncode': proc.returncode, 'stderr': proc.stderr[-2000:]}
  return json.loads(lines[-1])


def longest(name: str, args, at_2048: dict) -> dict:
  """Double the length while the training peak stays under the budget (predicted first, then measured)."""
  budget = args.memory_gib * 1024
  fits = {
    'length': 2048,
    'training_peak_rss_mib': at_2048['training_peak_rss_mib'],
    'step_s': statistics.median(at_2048['times']),
  }
  tried = [dict(fits)]
  per_bp = None
  length = 4096
  while length <= args.max_length:
    if per_bp is not None and fits['training_peak_rss_mib'] + per_bp * (length - fits['length']) > budget:
      break  # the linear trend of the peak says it would not fit: do not push the machine past it
    r = side(name, args, length, steps=1, warmup=1)
    if r.get('failed'):
      tried.append({'length': length, 'failed': True})
      break
    entry = {'length': length, 'training_peak_rss_mib': r['training_peak_rss_mib'], 'step_s': r['times'][0]}
    tried.append(entry)
    if entry['training_peak_rss_mib'] > budget:
      break
    per_bp = (entry['training_peak_rss_mib'] - fits['training_peak_rss_mib']) / (length - fits['length'])
    fits = entry
    length *= 2
  return {'fits': fits, 'tried': tried}


def table(result: dict) -> str:
  j, t = result['jax'], result['torch']
  med = lambda r: statistics.median(r['times'])
  p = result['processor']
  rows = [
    '| AlphaGenome (450M), LoRA r=8 on q/v + new head, 2048 bp, batch 1, fp32 | flax_adapters | the port (torch) | ratio |',
    '|---|---|---|---|',
    f'| step (s, median of {len(j["times"])}; range) | {med(j):.2f} ({min(j["times"]):.2f}–{max(j["times"]):.2f}) '
    f'| {med(t):.2f} ({min(t["times"]):.2f}–{max(t["times"]):.2f}) | {med(j) / med(t):.2f} |',
    f'| peak RSS while training (MiB) | {j["training_peak_rss_mib"]:.0f} | {t["training_peak_rss_mib"]:.0f} | {j["training_peak_rss_mib"] / t["training_peak_rss_mib"]:.2f} |',
    f'| peak RSS of the process, incl. setup (MiB) | {j["process_peak_rss_mib"]:.0f} | {t["process_peak_rss_mib"]:.0f} | {j["process_peak_rss_mib"] / t["process_peak_rss_mib"]:.2f} |',
  ]
  if 'longest' in result:
    lj, lt = result['longest']['jax']['fits'], result['longest']['torch']['fits']
    rows.append(
      f'| longest input training in {result["memory_gib"]} GiB (bp; step s, peak MiB) | {lj["length"]:,} ({lj["step_s"]:.1f} s, {lj["training_peak_rss_mib"]:.0f}) '
      f'| {lt["length"]:,} ({lt["step_s"]:.1f} s, {lt["training_peak_rss_mib"]:.0f}) | |'
    )
  rows.append(f'| compile (s), not in the step | {j["compile_s"]:.0f} | – | |')
  if 'longest' in result:
    tried = lambda n: ', '.join(f'{e["length"]:,}' for e in result['longest'][n]['tried'])
    rows.append(
      f'\nLongest input: lengths doubled while the training peak stayed under {result["memory_gib"]} GiB; the next one is '
      f"run only if the peak's linear trend predicts it fits (measured: {tried('jax')} bp for flax_adapters, "
      f'{tried("torch")} for the port).'
    )
  loss = max(abs(a - b) / abs(b) for a, b in zip(j['losses'], t['losses']))
  load = statistics.median(j['others_load'] + t['others_load'])
  note = (
    f'Processor: {p["vendor"]} {p["model"]}, {p["cores"]} cores, flags {" ".join(p["flags"])}; {result["date"]}. '
    f'Trainable params {j["trainable_params"]:,} (both). Losses agree to {loss:.1e} (relative). '
    f'Median CPU share taken by other processes during the steps: {load:.2f}'
    + (' (a shared machine: the times are slower than on a quiet one).' if load > 0.05 else '.')
  )
  return '\n'.join(rows) + '\n\n' + note


def write_readme(text: str) -> None:
  path = os.path.join(ROOT, 'README.md')
  readme = open(path).read()
  start, end = '<!-- alphagenome-table:start -->', '<!-- alphagenome-table:end -->'
  if start not in readme:
    raise SystemExit(f'README.md has no {start} marker')
  head, rest = readme.split(start, 1)
  _, tail = rest.split(end, 1)
  with open(path, 'w') as f:
    f.write(f'{head}{start}\n{text}\n{end}{tail}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--readme', action='store_true')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--memory-gib', type=float, default=8.0)
  parser.add_argument('--max-length', type=int, default=2**17)
  parser.add_argument('--no-longest', action='store_true')
  parser.add_argument('--side', choices=('jax', 'torch', 'weights'))
  parser.add_argument('--dir')
  parser.add_argument('--length', type=int, default=2048)
  parser.add_argument('--table', help='render the table of a results JSON (with --readme: into README.md) and stop')
  args = parser.parse_args()
  if args.table:
    text = table(json.load(open(args.table)))
    print(text)
    if args.readme:
      write_readme(text + f'\n\nJSON: `{os.path.relpath(os.path.abspath(args.table), ROOT)}`')
    return
  if args.side == 'weights':
    print(json.dumps(make_weights(args.dir, args.quick, args.length)))
    return
  if args.side:
    print(json.dumps((run_jax if args.side == 'jax' else run_torch)(args)))
    return

  length = 512 if args.quick else 2048
  with tempfile.TemporaryDirectory() as directory:
    args.dir = directory
    subprocess.run(
      [sys.executable, '-m', 'benchmarks.alphagenome', '--side', 'weights', '--dir', directory, '--length', str(length)]
      + (['--quick'] if args.quick else []),
      check=True,
      cwd=ROOT,
      env={**os.environ, 'PYTHONPATH': ROOT},
    )
    result = {
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'processor': processor(),
      'machine': common.machine(),
      'memory_gib': args.memory_gib,
    }
    steps, warmup = (2, 1) if args.quick else (args.steps, args.warmup)
    result['jax'] = side('jax', args, length, steps, warmup)
    if args.quick:
      print(json.dumps(result['jax'], indent=1))
      return
    result['torch'] = side('torch', args, length, steps, warmup)
    for name in ('jax', 'torch'):
      if result[name].get('failed'):
        raise SystemExit(f'{name} side failed:\n{result[name]["stderr"]}')
    if not args.no_longest:
      result['longest'] = {name: longest(name, args, result[name]) for name in ('jax', 'torch')}
  text = table(result)
  print(text)
  os.makedirs(os.path.join(HERE, 'results'), exist_ok=True)
  out = os.path.join(HERE, 'results', f'alphagenome-cpu-{result["date"].replace(":", "")}.json')
  with open(out, 'w') as f:
    json.dump(result, f, indent=1)
  print(f'\nJSON: {os.path.relpath(out, ROOT)}')
  if args.readme:
    write_readme(text + f'\n\nJSON: `{os.path.relpath(out, ROOT)}`')


if __name__ == '__main__':
  main()
