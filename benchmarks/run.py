"""flax_adapters vs HF PEFT: GPT-2 LoRA and full fine-tuning steps, memory, matmul peaks, merge,
and the library's own overhead against a hand-written LoRA.

    python -m benchmarks.run            # GPT-2 small (124M), CPU, ~10-15 min; writes benchmarks/results/
    python -m benchmarks.run --quick    # a 2-layer model, for smoke tests (~2 min)
    python -m benchmarks.run --gpu      # one GPU, both sides: bf16 compute, fp32 adapters (< 5 min)

Each side runs in its own worker process (so each peak RSS is its own), both models start from the
same weights, batch and loss (the run checks that the losses agree), and the timed steps are
interleaved in rounds: each round runs k steps of one side, then k of the other, alternating which
goes first, for flax_adapters-LoRA / PEFT-LoRA and flax_adapters-full / PEFT-full. A ratio is the
median over rounds of the per-round ratio of medians. Before each block of steps the driver waits
(bounded) for the machine to be quiet, and it records the CPU share other processes took during every
step, since a shared machine slows torch's OpenMP pool far more than XLA's.

A speed ratio between two frameworks is partly the ratio of their GEMM libraries on the processor
(XLA:CPU's YNNPACK/Eigen vs torch's MKL/oneDNN) and partly what each side makes of its own. So the
run records the processor (vendor, model, ISA extensions such as AVX-512 and AMX), each framework's
matmul peak (a fresh process, and a 2048³ matmul in every worker after each round's steps), and
each step's fraction of its own framework's peak in the same round; the table splits each ratio
into the two factors. The library-overhead row runs the same GPT-2 adapted by flax_adapters and by
a hand-written LoRA interceptor in one process, interleaved.
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
from benchmarks.setup_cfg import LORA, SIZES

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# glibc malloc settings (GLIBC_TUNABLES), applied to both sides alike. XLA:CPU allocates a step's
# temporaries as one buffer (~0.5 GB for GPT-2 LoRA) on every call; glibc serves it with a fresh
# mmap and returns it with munmap, so every step page-faults it in again (~180k faults of 4 KiB,
# ~20% of the step) and, on this VM, memory returned to the host while a process idles costs up to
# a second to fault back in. 'thp' backs malloc's large blocks with transparent huge pages (512x
# fewer faults); 'retain' also keeps freed memory in the process (one arena, no mmap, no trimming),
# so a training loop's buffers are reused without faults. torch gets the same settings.
MALLOC = {
  'default': '',
  'thp': 'glibc.malloc.hugetlb=1',
  'retain': 'glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
  'glibc.malloc.trim_threshold=68719476736',
}

TARGETS = {
  'lora_vs_peft': 1.0,
  'lora_vs_peft_aim': 0.85,
  'lora_mem_vs_peft': 0.85,
  'full_vs_peft': 0.85,
  'lora_vs_own_full': 0.68,
  'lora_own_peak_fraction': 0.80,
  'library_overhead': 1.02,
  'merge_s': 0.5,
  'merged_latency_tolerance': 0.05,
}


# XLA flags for our side (the jax workers only), applied when README.md tells users to set them.
# None is recommended: see README.md ("XLA:CPU options") for the A/B of the ones that were tried.
RECOMMENDED_XLA_FLAGS = ''

# --gpu: one prepared run that finishes within five minutes on an H100/H200, so that a session lent
# a GPU measures it at once: the workers set up in parallel, no RSS run (the device peak is recorded
# during the timed steps), no fresh-process peak (each worker times an 8192³ bf16 matmul per round),
# and no new round starts after `deadline` seconds.
GPU_DEFAULTS = dict(rounds=8, steps_per_round=10, deadline=240.0, skip='memory,peak', max_wait=2.0)


class Worker:
  """A side in its own process, driven by one JSON line per command."""

  def __init__(self, name, module, args, env=None, mode=None, extra=()):
    self.name = name
    self.log = open(os.path.join(args.tmp, f'{name}.log'), 'w')
    cmd = (
      [
        sys.executable,
        '-m',
        f'benchmarks.{module}',
        '--mode',
        mode or name.split('_')[1],
        '--size',
        args.size,
        '--weights',
        args.weights,
      ]
      + (['--gpu'] if args.gpu else [])
      + (['--bf16'] if args.bf16 else [])
      + list(extra)
    )
    self.proc = subprocess.Popen(
      cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env
    )

  def call(self, op, **kw):
    self.send(op, **kw)
    return self.receive(op)

  def send(self, op, **kw):
    self.proc.stdin.write(json.dumps({'op': op, **kw}) + '\n')
    self.proc.stdin.flush()

  def receive(self, op):
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'{self.name} died; see {self.log.name}')
    out = json.loads(line)
    if not out.pop('ok'):
      raise RuntimeError(f'{self.name}.{op}: {out["error"]}\n{out["trace"]}')
    return out

  def close(self):
    try:
      self.call('exit')
    except Exception:
      pass
    self.proc.wait(timeout=60)


def run_json(cmd, env=None):
  out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, env=env)
  return json.loads(out.stdout.strip().splitlines()[-1])


def say(*a):
  print(*a, file=sys.stderr, flush=True)


def matmul_peak(args, env, jax_env):
  """Each framework's matmul peak in a fresh process (best of 2048³ and 4096³, twice, interleaved)."""
  best = {'jax': {}, 'torch': {}}
  for _ in range(2):  # interleaved: jax, torch, jax, torch
    for fw in ('jax', 'torch'):
      common.wait_quiet(max_wait=args.max_wait)
      got = run_json(
        [sys.executable, '-m', 'benchmarks.matmul_peak', fw]
        + (['--gpu'] if args.gpu else [])
        + (['--bf16'] if args.bf16 else []),
        jax_env if fw == 'jax' else env,
      )
      for n, v in got.items():
        best[fw][n] = max(best[fw].get(n, 0.0), v)
  peak = max(v for fw in best.values() for v in fw.values())
  return {'by_framework': best, 'peak_gflops': peak}


def median(xs):
  return statistics.median(xs) if xs else float('nan')


def summarize_pair(rounds, a, b):
  """Per-round ratio of medians a/b, and the median over rounds; each side's median step time."""
  ratios, ta, tb, la, lb = [], [], [], [], []
  for r in rounds:
    ratios.append(median(r[a]['times']) / median(r[b]['times']))
    ta += r[a]['times']
    tb += r[b]['times']
    la += r[a]['loads']
    lb += r[b]['loads']
  return {
    'ratio': median(ratios),
    'round_ratios': ratios,
    a: median(ta),
    b: median(tb),
    f'{a}_min': min(ta),
    f'{b}_min': min(tb),
    f'{a}_load': median(la),
    f'{b}_load': median(lb),
    f'{a}_steps': len(ta),
    f'{b}_steps': len(tb),
  }


# Timed sides: name -> (worker, variant of that worker's step or None).
SIDES = {
  'jax_lora': ('jax_lora', None),
  'torch_lora': ('torch_lora', None),
  'jax_full': ('jax_full', None),
  'torch_full': ('torch_full', None),
  'lib_lora': ('jax_lora', 'library'),
  'hand_lora': ('jax_lora', 'handwritten'),
}


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--quick', action='store_true', help='small model, few rounds (smoke test)')
  p.add_argument(
    '--gpu', action='store_true', help='on a GPU, both sides: bf16 compute, fp32 adapters; a < 5 min prepared run'
  )
  p.add_argument(
    '--bf16',
    action='store_true',
    help='bf16 compute, fp32 adapters (implied by --gpu; on CPU: a smoke test of that mode)',
  )
  p.add_argument('--rounds', type=int, default=None, help='interleaved rounds (default 6; 3 quick; 8 gpu)')
  p.add_argument('--steps-per-round', type=int, default=None, help='steps per side per round (default 3; 10 gpu)')
  p.add_argument(
    '--max-wait',
    type=float,
    default=None,
    help='seconds to wait for a quiet machine before each block of steps (default 20; gpu 2)',
  )
  p.add_argument(
    '--deadline', type=float, default=None, help='start no round after this many seconds (default: none; gpu 240)'
  )
  p.add_argument(
    '--malloc',
    choices=tuple(MALLOC),
    default='retain',
    help='glibc malloc settings for both sides in the timed run (default: retain; see README.md)',
  )
  p.add_argument(
    '--mem-malloc',
    choices=tuple(MALLOC),
    default='thp',
    help='glibc malloc settings for the memory run, each side alone (default: thp)',
  )
  p.add_argument(
    '--parallel-setup',
    action='store_true',
    help='set the workers up at once (default with --gpu; a CPU smoke test of it)',
  )
  p.add_argument('--skip', default=None, help='comma list of parts to skip: peak,full,overhead,merge,memory')
  p.add_argument('--out', default=None, help='JSON path (default benchmarks/results/<size>-<device>-<time>.json)')
  p.add_argument('--readme', action='store_true', help='write the table into benchmarks/README.md and README.md')
  args = p.parse_args(argv)
  args.size = 'quick' if args.quick else 'gpt2'
  args.bf16 = args.bf16 or args.gpu
  args.parallel_setup = args.parallel_setup or args.gpu
  # Three steps per side per round: the round's median then drops one step slowed by the host (a
  # median of two is their mean); the VM this was tuned on swings 20-30% within minutes.
  defaults = (
    GPU_DEFAULTS if args.gpu else dict(rounds=3 if args.quick else 6, steps_per_round=3, skip='', max_wait=20.0)
  )
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  return args


def start_workers(names, args, env, jax_env, setup_in_parallel, overhead):
  """Start the workers and run their setup (one after the other on CPU, so that each compiles alone).
  With `overhead`, the jax LoRA worker also builds the hand-written LoRA of the library-overhead pair."""
  workers, setups = {}, {}
  for n in names:
    say(f'[run] starting {n} ...')
    jax_side = n.startswith('jax')
    extra = ['--overhead'] if overhead and n == 'jax_lora' else []
    workers[n] = Worker(
      n, 'jax_worker' if jax_side else 'torch_worker', args, jax_env if jax_side else env, extra=extra
    )
    if setup_in_parallel:
      workers[n].send('setup')
    else:
      common.wait_quiet(max_wait=args.max_wait)
      setups[n] = workers[n].call('setup')
  if setup_in_parallel:
    setups = {n: w.receive('setup') for n, w in workers.items()}
  for n, st in setups.items():
    say(
      f'[run]   {n}: build {st["build_s"]:.1f}s'
      + (f', compile {st["compile_s"]:.1f}s' if 'compile_s' in st else '')
      + f', warm-up {["%.3f" % t for t in st["warmup"]["times"]]}'
    )
  return workers, setups


def timed_rounds(workers, pairs, args, t_start):
  rounds = []
  for r in range(args.rounds):
    if r and args.deadline and time.perf_counter() - t_start > args.deadline:
      say(f'[run] deadline ({args.deadline:.0f}s) reached after {r} rounds')
      break
    got = {}
    for a, b in pairs:
      for n in (a, b) if r % 2 == 0 else (b, a):
        worker, variant = SIDES[n]
        waited = common.wait_quiet(max_wait=args.max_wait)
        got[n] = workers[worker].call('steps', n=args.steps_per_round, **({'variant': variant} if variant else {}))
        got[n]['waited_s'] = waited
    # Each framework's matmul rate right after its steps: the peak its steps are put against.
    for fw in ('jax', 'torch'):
      got[f'{fw}_matmul'] = workers[f'{fw}_lora'].call('matmul')
    rounds.append(got)
    say(
      f'[run] round {r + 1}/{args.rounds}: '
      + ', '.join(f'{n} {median(v["times"]):.3f}s (load {max(v["loads"]):.2f})' for n, v in got.items() if n in SIDES)
      + f'; matmul jax {got["jax_matmul"]["gflops"]:.0f}, torch {got["torch_matmul"]["gflops"]:.0f} GFLOP/s'
    )
  return rounds


def memory_run(names, args, env, jax_env):
  """Each side alone in a fresh process, under an allocator that returns freed memory (the speed
  run's 'retain' setting keeps it, and how its heap fragments varies run to run)."""
  out = {'malloc': args.mem_malloc, 'glibc_tunables': MALLOC[args.mem_malloc]}
  for n in names:
    say(f'[run] memory of {n} (malloc={args.mem_malloc}) ...')
    jax_side = n.startswith('jax')
    menv = dict(jax_env if jax_side else env, GLIBC_TUNABLES=MALLOC[args.mem_malloc])
    w = Worker(n + '_mem', 'jax_worker' if jax_side else 'torch_worker', args, menv, mode=n.split('_')[1])
    try:
      st = w.call('setup')
      steps = w.call('steps', n=4)
      out[n] = {
        'train_peak_rss_mib': max(st['warmup_after_release']['peak_rss_mib'], steps['peak_rss_mib']),
        'process_peak_rss_mib': max(
          st['setup_peak_rss_mib'], steps['peak_rss_mib'], st['warmup_after_release']['peak_rss_mib']
        ),
        'times': steps['times'],
      }
    finally:
      w.close()
  return out


def main(argv=None):
  args = parse_args(argv)
  skip = set(filter(None, args.skip.split(',')))
  env = dict(os.environ)
  if not args.gpu:
    env.setdefault('JAX_PLATFORMS', 'cpu')
  else:
    # Several jax processes share the GPU: allocate on demand instead of 75% each at start-up.
    env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  if MALLOC[args.malloc]:
    # The same glibc malloc settings for every worker (both sides); see MALLOC and README.md.
    env['GLIBC_TUNABLES'] = ':'.join(filter(None, [env.get('GLIBC_TUNABLES'), MALLOC[args.malloc]]))
  jax_env = dict(env)
  if RECOMMENDED_XLA_FLAGS and not args.gpu:
    jax_env['XLA_FLAGS'] = ' '.join(filter(None, [env.get('XLA_FLAGS'), RECOMMENDED_XLA_FLAGS]))
  t_start = time.perf_counter()

  with tempfile.TemporaryDirectory() as tmp:
    args.tmp = tmp
    args.weights = os.path.join(tmp, 'weights.npz')
    say(f'[run] weights for {args.size} ...')
    subprocess.run(
      [sys.executable, '-m', 'benchmarks.make_weights', args.size, args.weights],
      cwd=ROOT,
      check=True,
      env=env,
      stderr=subprocess.DEVNULL,
    )
    result = {
      'machine': common.machine(),
      'size': args.size,
      'config': SIZES[args.size],
      'lora': LORA,
      'gpu': args.gpu,
      'bf16': args.bf16,
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'xla_flags': jax_env.get('XLA_FLAGS', ''),
      'malloc': args.malloc,
      'mem_malloc': args.mem_malloc,
      'glibc_tunables': env.get('GLIBC_TUNABLES', ''),
      'n_rounds': args.rounds,
      'steps_per_round': args.steps_per_round,
      'targets': TARGETS,
    }
    if 'peak' not in skip:
      say('[run] matmul peak ...')
      result['matmul'] = matmul_peak(args, env, jax_env)
      say(f'[run]   {result["matmul"]}')

    names = ['jax_lora', 'torch_lora']
    pairs = [('jax_lora', 'torch_lora')]
    if 'full' not in skip:
      names += ['jax_full', 'torch_full']
      pairs.append(('jax_full', 'torch_full'))
    if 'overhead' not in skip:
      pairs.append(('lib_lora', 'hand_lora'))
    workers = {}
    try:
      workers, result['setup'] = start_workers(
        names, args, env, jax_env, setup_in_parallel=args.parallel_setup, overhead='overhead' not in skip
      )
      result['rounds'] = timed_rounds(workers, pairs, args, t_start)
      if 'merge' not in skip:
        say('[run] merge and inference ...')
        common.wait_quiet(max_wait=args.max_wait)
        result['merge'] = workers['jax_lora'].call('merge')
      result['final'] = {n: w.call('final') for n, w in workers.items()}
    finally:
      for w in workers.values():
        w.close()

    if 'memory' not in skip:
      result['memory'] = memory_run(names, args, env, jax_env)

  if args.gpu:
    result['gpu_name'] = result['setup']['torch_lora'].get('gpu_name') or ''
  result['summary'] = summarize(result)
  result['wall_s'] = time.perf_counter() - t_start
  out = args.out or os.path.join(
    HERE,
    'results',
    f'{args.size}-{"gpu" if args.gpu else "cpu"}{"-bf16" if args.bf16 else ""}'
    f'{"" if args.malloc == "retain" else "-malloc-" + args.malloc}-{result["date"].replace(":", "")}.json',
  )
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, 'w') as f:
    json.dump(result, f, indent=1)
  table = format_table(result)
  print(table)
  say(f'[run] wrote {out} ({result["wall_s"]:.0f}s)')
  if args.readme:
    write_readme(table, os.path.relpath(out, HERE))


def _sides(rounds):
  return [n for n in SIDES if n in rounds[0]]


def own_peak_fractions(rounds, side, flops):
  """Per round: the side's GFLOP/s (median step of the round) over its own framework's matmul
  rate measured in the same round; the median over rounds, and each round's value."""
  fw = side.split('_')[0] if side.split('_')[0] in ('jax', 'torch') else 'jax'
  per_round = [flops / median(r[side]['times']) / 1e9 / r[f'{fw}_matmul']['gflops'] for r in rounds]
  return {'fraction': median(per_round), 'round_fractions': per_round}


def summarize(res):
  s = {}
  rounds = res['rounds']
  cfg = res['config']
  fl = {
    m: common.gpt2_flops(
      n_layer=cfg['n_layer'],
      n_embd=cfg['n_embd'],
      vocab=cfg['vocab_size'],
      batch=cfg['batch'],
      seq=cfg['seq'],
      mode=m,
      rank=LORA['rank'],
    )['step']
    for m in ('lora', 'full')
  }
  s['flops'] = fl
  sides = _sides(rounds)
  s['lora'] = summarize_pair(rounds, 'jax_lora', 'torch_lora')
  if 'jax_full' in sides:
    s['full'] = summarize_pair(rounds, 'jax_full', 'torch_full')
    s['lora_vs_own_full'] = summarize_pair(rounds, 'jax_lora', 'jax_full')
    s['peft_lora_vs_peft_full'] = summarize_pair(rounds, 'torch_lora', 'torch_full')
  if 'lib_lora' in sides:
    s['overhead'] = summarize_pair(rounds, 'lib_lora', 'hand_lora')
  # The losses: same weights, batch and optimizer, so the two sides must agree step by step.
  s['loss_max_abs_diff'] = {}
  for mode in ('lora', 'full'):
    if f'jax_{mode}' not in sides:
      continue

    def losses(side):
      st = res['setup'][f'{side}_{mode}']
      return (
        st['warmup']['losses']
        + st['warmup_after_release']['losses']
        + [x for r in rounds for x in r[f'{side}_{mode}']['losses']]
      )

    ja, to = losses('jax'), losses('torch')
    s['loss_max_abs_diff'][mode] = max(abs(x - y) for x, y in zip(ja, to))
    s.setdefault('first_loss', {})[mode] = {'jax': ja[0], 'torch': to[0]}
  if 'lib_lora' in sides:
    lib = [x for r in rounds for x in r['lib_lora']['losses']]
    hand = [x for r in rounds for x in r['hand_lora']['losses']]
    s['loss_max_abs_diff']['overhead'] = max(abs(x - y) for x, y in zip(lib, hand))
  # Peak RSS while training (over the timed steps, counted from after the warm-up and a
  # malloc_trim, up to before merging, which adds a merged copy of the params), and the whole
  # process's peak including setup (loading the shared weights file, building, compiling) and the
  # two warm-up steps.
  workers = sorted({SIDES[n][0] for n in sides})
  s['peak_rss_mib'] = {
    w: max(
      [r[n]['peak_rss_mib'] for r in rounds for n in sides if SIDES[n][0] == w]
      + [res['setup'][w]['warmup_after_release']['peak_rss_mib']]
    )
    for w in workers
  }
  s['page_faults_per_step'] = {n: median([x for r in rounds for x in r[n]['page_faults']]) for n in sides}
  s['dispatch_ms'] = {
    n: 1e3 * median([x for r in rounds for x in r[n]['dispatch_s']]) for n in sides if 'dispatch_s' in rounds[0][n]
  }
  s['process_peak_rss_mib'] = {w: max(s['peak_rss_mib'][w], res['setup'][w]['setup_peak_rss_mib']) for w in workers}
  if res['gpu']:
    s['device_peak_mib'] = {
      w: max(r[n].get('device_peak_mib', 0) for r in rounds for n in sides if SIDES[n][0] == w) for w in workers
    }
  for key, peaks in (('', s['peak_rss_mib']), ('process_', s['process_peak_rss_mib'])):
    s[f'speedrun_{key}mem_ratio_lora'] = peaks['jax_lora'] / peaks['torch_lora']
    if 'full' in s:
      s[f'speedrun_{key}mem_ratio_full'] = peaks['jax_full'] / peaks['torch_full']
  if 'memory' in res:
    mem = res['memory']
    for key in ('train', 'process'):
      for mode in ('lora', 'full'):
        if f'jax_{mode}' in mem:
          s[f'{key}_mem_ratio_{mode}'] = (
            mem[f'jax_{mode}'][f'{key}_peak_rss_mib'] / mem[f'torch_{mode}'][f'{key}_peak_rss_mib']
          )
  # Speed against each framework's own matmul peak, and each step ratio split into the ratio of
  # the two GEMM libraries' peaks and the ratio of the fractions of them the two sides reach:
  # t_jax / t_torch = (peak_torch / peak_jax) x (fraction_torch / fraction_jax), round by round.
  s['matmul_in_rounds'] = {fw: median([r[f'{fw}_matmul']['gflops'] for r in rounds]) for fw in ('jax', 'torch')}
  s['achieved_gflops'] = {}
  for n in sides:
    mode = 'lora' if n.endswith('lora') else 'full'
    t = median([x for r in rounds for x in r[n]['times']])
    s['achieved_gflops'][n] = {'gflops': fl[mode] / t / 1e9, **own_peak_fractions(rounds, n, fl[mode])}
    if 'matmul' in res:
      fw = n.split('_')[0] if n.split('_')[0] in ('jax', 'torch') else 'jax'
      peak = max(res['matmul']['by_framework'][fw].values())
      s['achieved_gflops'][n]['fraction_of_standalone_peak'] = fl[mode] / t / 1e9 / peak
  s['ratio_split'] = {}
  for mode in ('lora', 'full'):
    if f'jax_{mode}' in sides:
      gemm = median([r['torch_matmul']['gflops'] / r['jax_matmul']['gflops'] for r in rounds])
      eff = median(
        [
          x / y
          for x, y in zip(
            s['achieved_gflops'][f'torch_{mode}']['round_fractions'],
            s['achieved_gflops'][f'jax_{mode}']['round_fractions'],
          )
        ]
      )
      s['ratio_split'][mode] = {'gemm_peak_ratio': gemm, 'efficiency_ratio': eff}
  if 'merge' in res:
    m = res['merge']
    lat = m['latency_s']
    ratios = [x / y for x, y in zip(lat['merged'], lat['base'])]
    s['merge'] = {
      'merge_s_first': m['merge_s'][0],
      'merge_s': median(m['merge_s'][1:] or m['merge_s']),
      'base_latency_s': median(lat['base']),
      'merged_latency_s': median(lat['merged']),
      'adapted_latency_s': median(lat['adapted']),
      'merged_over_base': median(ratios),
      'merged_vs_adapted_max_abs': m['merged_vs_adapted_max_abs'],
    }
  return s


def _ok(flag):
  return 'yes' if flag else 'NO'


def _gemm_libraries(res):
  """'XLA:CPU (jax 0.x) vs torch 2.x (MKL ..., oneDNN ...; AVX512 kernels)' from the workers' setup."""
  js, ts = res['setup']['jax_lora'], res['setup']['torch_lora']
  blas = ', '.join(ts.get('blas', []))
  cap = ts.get('cpu_capability')
  return f'jax {js.get("jax_version", "?")} ({js.get("device", "")}) vs torch {ts.get("torch_version", "?")}' + (
    f' ({blas}' + (f'; {cap} kernels' if cap else '') + ')' if blas or cap else ''
  )


def format_table(res):
  s, m = res['summary'], res['machine']
  proc = m.get('processor')
  where = (
    f'GPU {res.get("gpu_name", "")}, host {m["cpu"]}'
    if res['gpu']
    else (common.describe_processor(proc) if proc else f'{m["cpu"]}, {m["cores"]} cores')
  )
  ja, to = s['lora']['jax_lora'], s['lora']['torch_lora']
  rows = [
    f'Processor: {where}; {m["mem_gib"]} GiB. '
    f'{"bf16 compute, fp32 adapters" if res.get("bf16") else "fp32"}; '
    f'model {res["size"]} {res["config"]}; {res["date"]}'
    + ('' if res['size'] == 'gpt2' else ' (smoke test: the targets are for GPT-2 small)'),
    f'Frameworks: {_gemm_libraries(res)}.',
    '',
    '| measurement | flax_adapters | PEFT (torch) | ratio | target | met |',
    '|---|---|---|---|---|---|',
    f'| LoRA step (s, median) | {ja:.3f} | {to:.3f} | {s["lora"]["ratio"]:.3f} | <= 1.0 (aim 0.85) | '
    f'{_ok(s["lora"]["ratio"] <= 1.0)} |',
  ]
  if 'full' in s:
    f = s['full']
    rows.append(
      f'| full fine-tuning step (s, median) | {f["jax_full"]:.3f} | {f["torch_full"]:.3f} | '
      f'{f["ratio"]:.3f} | <= 0.85 | {_ok(f["ratio"] <= 0.85)} |'
    )
    o = s['lora_vs_own_full']
    rows.append(
      f'| LoRA step / own full step | {o["ratio"]:.3f} | '
      f'{s["peft_lora_vs_peft_full"]["ratio"]:.3f} | | <= 0.68 (FLOP floor '
      f'{s["flops"]["lora"] / s["flops"]["full"]:.2f}) | {_ok(o["ratio"] <= 0.68)} |'
    )
  if 'memory' in res:
    mem = res['memory']
    for mode in ('lora', 'full'):
      if f'jax_{mode}' not in mem:
        continue
      target = ' <= 0.85 |' if mode == 'lora' else ' |'
      for key, label in (('train', 'while training'), ('process', 'of the whole process, incl. setup')):
        r = s[f'{key}_mem_ratio_{mode}']
        met = _ok(r <= 0.85) if mode == 'lora' else ''
        rows.append(
          f'| {"LoRA" if mode == "lora" else "full"} peak RSS {label} (MiB) | '
          f'{mem[f"jax_{mode}"][f"{key}_peak_rss_mib"]:.0f} | {mem[f"torch_{mode}"][f"{key}_peak_rss_mib"]:.0f} | '
          f'{r:.3f} |{target} {met} |'
        )
  if res['gpu'] and 'device_peak_mib' in s:
    dp = s['device_peak_mib']
    rows.append(
      f'| LoRA peak device memory (MiB) | {dp["jax_lora"]:.0f} | {dp["torch_lora"]:.0f} | '
      f'{dp["jax_lora"] / max(dp["torch_lora"], 1):.3f} | | |'
    )
  a = s['achieved_gflops']
  mm = s['matmul_in_rounds']
  dtype = 'bf16' if res.get('bf16') else 'fp32'
  n = res['rounds'][0]['jax_matmul']['n']
  if 'matmul' in res:
    by = res['matmul']['by_framework']
    rows.append(
      f'| matmul peak, {dtype} (GFLOP/s): fresh process, best of 2048³/4096³ | {max(by["jax"].values()):.0f} (XLA) | '
      f'{max(by["torch"].values()):.0f} (torch) | {max(by["torch"].values()) / max(by["jax"].values()):.3f} | | |'
    )
  rows.append(
    f'| matmul peak in the workers, {n}³ after each round (GFLOP/s, median) | {mm["jax"]:.0f} | {mm["torch"]:.0f} | '
    f'{mm["torch"] / mm["jax"]:.3f} | | |'
  )
  fj, ft = a['jax_lora']['fraction'], a['torch_lora']['fraction']
  rows.append(
    f"| LoRA step GFLOP/s (fraction of its own framework's matmul peak) | {a['jax_lora']['gflops']:.0f} ({fj:.0%}) | "
    f'{a["torch_lora"]["gflops"]:.0f} ({ft:.0%}) | | >= 80% | {_ok(fj >= TARGETS["lora_own_peak_fraction"])} |'
  )
  if 'jax_full' in a:
    rows.append(
      f'| full step GFLOP/s (fraction of own peak) | {a["jax_full"]["gflops"]:.0f} '
      f'({a["jax_full"]["fraction"]:.0%}) | {a["torch_full"]["gflops"]:.0f} ({a["torch_full"]["fraction"]:.0%}) '
      '| | | |'
    )
  for mode, split in s['ratio_split'].items():
    rows.append(
      f'| {"LoRA" if mode == "lora" else "full"} ratio = GEMM-peak ratio x efficiency ratio | | | '
      f'{s[mode]["ratio"]:.3f} = {split["gemm_peak_ratio"]:.3f} x {split["efficiency_ratio"]:.3f} | | |'
    )
  if 'overhead' in s:
    o = s['overhead']
    rows.append(
      f'| library overhead: LoRA step adapted by flax_adapters / by a hand-written interceptor (s) | '
      f'{o["lib_lora"]:.3f} | {o["hand_lora"]:.3f} (hand-written) | {o["ratio"]:.3f} | <= 1.02 | '
      f'{_ok(o["ratio"] <= TARGETS["library_overhead"])} |'
    )
  if 'merge' in s:
    g = s['merge']
    rows.append(
      f'| merge all adapters (s; first call {g["merge_s_first"]:.3f}) | {g["merge_s"]:.3f} | | | < 0.5 | '
      f'{_ok(g["merge_s_first"] < 0.5)} |'
    )
    rows.append(
      f'| forward latency merged / base (s) | {g["merged_latency_s"]:.4f} / {g["base_latency_s"]:.4f} '
      f'(adapted, unmerged: {g["adapted_latency_s"]:.4f}) | | {g["merged_over_base"]:.3f} | 1 +- 0.05 | '
      f'{_ok(abs(g["merged_over_base"] - 1) <= 0.05)} |'
    )
  st = res['setup']
  rows.append(
    f'| compile (s), not in step times | LoRA {st["jax_lora"]["compile_s"]:.1f}'
    + (f', full {st["jax_full"]["compile_s"]:.1f}' if 'jax_full' in st else '')
    + ' | | | | |'
  )
  rows.append('')
  lo = s['lora']
  rows.append(
    f'Steps per side: {lo["jax_lora_steps"]} timed (after 3 warm-up), {len(res["rounds"])} interleaved rounds. '
    "Ratios are medians over rounds of per-round ratios; a fraction of own peak is, per round, the step's "
    f'GFLOP/s over the best of three {n}³ matmuls its own worker ran right after (median over rounds'
    + (
      '; against the fresh-process peaks: '
      + ', '.join(f'{k} {v["fraction_of_standalone_peak"]:.0%}' for k, v in a.items())
      if 'matmul' in res
      else ''
    )
    + '). Loss agreement (same weights, batch, AdamW): max |loss_jax - loss_torch| = '
    + ', '.join(f'{k} {v:.1e}' for k, v in s['loss_max_abs_diff'].items())
    + '. Median CPU share taken by other processes during the steps: '
    + ', '.join(f'{n} {s[k][n + "_load"]:.2f}' for k in ('lora', 'full', 'overhead') if k in s for n in _pair(k))
    + '.'
  )
  rows.append(
    'Page faults per step (median): '
    + ', '.join(f'{n} {v:.0f}' for n, v in s['page_faults_per_step'].items())
    + '. Host time to launch a jitted step: '
    + ', '.join(f'{n} {v:.2f} ms' for n, v in s['dispatch_ms'].items())
    + '.'
  )
  speed_mem = ', '.join(f'{n} {v:.0f}' for n, v in s['peak_rss_mib'].items())
  if 'memory' in res:
    rows.append(
      f'Peak RSS: each side alone in a fresh process with GLIBC_TUNABLES={res["memory"]["glibc_tunables"]!r} '
      '(freed memory goes back to the OS); "while training" counts from after 2 warm-up steps and a '
      f'malloc_trim. In the timed run (retaining allocator) the training peaks were: {speed_mem} MiB.'
    )
  else:
    rows.append(f'Peak RSS while training, timed run: {speed_mem} MiB.')
  rows.append(
    'FLOPs per step (analytic, both sides): LoRA %.1f G, full %.1f G. XLA_FLAGS=%r (our side), '
    'GLIBC_TUNABLES=%r (both sides).'
    % (s['flops']['lora'] / 1e9, s['flops']['full'] / 1e9, res['xla_flags'], res.get('glibc_tunables', ''))
  )
  return '\n'.join(rows)


def _pair(key):
  return {
    'lora': ('jax_lora', 'torch_lora'),
    'full': ('jax_full', 'torch_full'),
    'overhead': ('lib_lora', 'hand_lora'),
  }[key]


def write_readme(table, json_rel):
  """The table goes between the markers of benchmarks/README.md and of the project's README.md."""
  for path in (os.path.join(HERE, 'README.md'), os.path.join(ROOT, 'README.md')):
    with open(path) as f:
      text = f.read()
    start, end = '<!-- table:start -->', '<!-- table:end -->'
    i, j = text.index(start) + len(start), text.index(end)
    text = text[:i] + '\n' + table + f'\n\nJSON: `benchmarks/{json_rel}`\n' + text[j:]
    with open(path, 'w') as f:
      f.write(text)


if __name__ == '__main__':
  main()
