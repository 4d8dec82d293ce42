"""Shared helpers: machine load, timing, memory, FLOP counts and the worker protocol."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time

NCPU = os.cpu_count() or 1


def _busy_jiffies() -> int:
  """Non-idle CPU time of the whole machine, in clock ticks (first line of /proc/stat)."""
  with open('/proc/stat') as f:
    fields = [int(x) for x in f.readline().split()[1:]]
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  return sum(fields[:8]) - idle


_TICK = os.sysconf('SC_CLK_TCK')


class LoadMeter:
  """Share of the machine's cores that *other* processes used over an interval (0 = quiet, 1 = all).

  Machine busy time from /proc/stat minus this process's own CPU time (all threads).
  """

  def __init__(self):
    self.start()

  def start(self):
    self._t, self._busy, self._own = time.perf_counter(), _busy_jiffies(), _own_cpu()

  def others(self) -> float:
    wall = time.perf_counter() - self._t
    busy = (_busy_jiffies() - self._busy) / _TICK
    own = _own_cpu() - self._own
    return max(0.0, (busy - own) / max(wall * NCPU, 1e-9))


def _own_cpu() -> float:
  t = os.times()
  return t.user + t.system


def machine_load(window: float = 0.5) -> float:
  """Others' share of all cores over `window` seconds (this process idle meanwhile)."""
  m = LoadMeter()
  time.sleep(window)
  return m.others()


def wait_quiet(threshold: float = 0.08, window: float = 0.5, max_wait: float = 120.0) -> float:
  """Wait (at most `max_wait` s) until other processes use under `threshold` of the cores.

  Returns the seconds waited. Both sides of every comparison wait the same way, so a busy machine
  (other jobs) does not bias one side; the load during each step is also recorded.
  """
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < max_wait:
    if machine_load(window) < threshold:
      break
  return time.perf_counter() - t0


def peak_rss_mib() -> float:
  """This process's peak resident set size (VmHWM), MiB."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def minor_faults() -> int:
  """Minor page faults of this process so far (first touches of freshly mapped memory)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def release_free_memory() -> None:
  """Give the allocator's free pages back to the OS (glibc `malloc_trim(0)`), e.g. after setup.

  With the 'retain' malloc settings nothing freed is returned on its own, so without this the
  garbage of setup (the weights file's arrays, compilation) would stay resident through training.
  """
  try:
    import ctypes

    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


def reset_peak_rss() -> bool:
  """Restart the peak-RSS count (VmHWM) from the current RSS (Linux >= 4.0); False if unsupported."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def rss_mib() -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024
  return float('nan')


# ISA extensions that decide which GEMM kernels a library can use (x86 and Arm spellings of /proc/cpuinfo).
ISA_FLAGS = (
  'avx2',
  'fma',
  'avx512f',
  'avx512bw',
  'avx512vl',
  'avx512_vnni',
  'avx512_bf16',
  'avx512_fp16',
  'avx_vnni',
  'amx_tile',
  'amx_bf16',
  'amx_int8',
  'amx_fp16',
  'asimd',
  'sve',
  'sve2',
  'bf16',
)


def _cpuinfo() -> dict:
  """The first processor's `key: value` block of /proc/cpuinfo ({} where there is none)."""
  info = {}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if not line.strip():
          if info:
            break
          continue
        key, _, value = line.partition(':')
        info.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return info


def _caches() -> dict:
  """Cache sizes of cpu0 by level and type, e.g. {'L1d': '48K', 'L2': '2048K', 'L3': '32768K'}."""
  out = {}
  base = '/sys/devices/system/cpu/cpu0/cache'
  try:
    for index in sorted(os.listdir(base)):
      d = os.path.join(base, index)
      read = lambda name, d=d: open(os.path.join(d, name)).read().strip()
      kind = read('type')
      out['L' + read('level') + {'Data': 'd', 'Instruction': 'i'}.get(kind, '')] = read('size')
  except OSError:
    pass
  return out


def processor() -> dict:
  """What a CPU speed claim depends on: vendor, model, family/model numbers, the GEMM-relevant ISA
  extensions (AVX-512, AMX, ...), caches, cores, and whether it is a virtual machine."""
  info = _cpuinfo()
  flags = set((info.get('flags') or info.get('Features') or '').split())
  vendor = info.get('vendor_id', '')
  return {
    'vendor': {'AuthenticAMD': 'AMD', 'GenuineIntel': 'Intel'}.get(vendor, vendor or platform.machine()),
    'model_name': info.get('model name') or platform.processor() or platform.machine(),
    'family': info.get('cpu family'),
    'model': info.get('model'),
    'stepping': info.get('stepping'),
    'arch': platform.machine(),
    'isa': [f for f in ISA_FLAGS if f in flags],
    'caches': _caches(),
    'cores': NCPU,
    'virtual_machine': 'hypervisor' in flags,
  }


def describe_processor(p: dict) -> str:
  """One line, e.g. 'AMD EPYC (family 26, model 2; AVX-512 with bf16/VNNI; no AMX; L3 32768K; 2 cores, VM)'."""
  isa = set(p.get('isa', ()))
  if 'avx512f' in isa:
    extras = [n for f, n in (('avx512_bf16', 'bf16'), ('avx512_vnni', 'VNNI'), ('avx512_fp16', 'fp16')) if f in isa]
    vec = 'AVX-512' + (' with ' + '/'.join(extras) if extras else '')
  elif 'avx2' in isa:
    vec = 'AVX2'
  elif 'sve' in isa or 'asimd' in isa:
    vec = 'SVE' if 'sve' in isa else 'NEON'
  else:
    vec = 'no AVX2'
  amx = [f[4:] for f in ('amx_bf16', 'amx_int8', 'amx_fp16') if f in isa]
  parts = [f'family {p["family"]}, model {p["model"]}' if p.get('family') else p.get('arch', '')]
  parts.append(vec + ('; AMX ' + '/'.join(amx) if amx else ('; no AMX' if p.get('arch') == 'x86_64' else '')))
  if p.get('caches', {}).get('L3'):
    parts.append(f'L3 {p["caches"]["L3"]}')
  parts.append(f'{p["cores"]} cores' + (', VM' if p.get('virtual_machine') else ''))
  name = p['model_name'] if p['model_name'].startswith(p['vendor']) else f'{p["vendor"]} {p["model_name"]}'
  return f'{name} ({"; ".join(parts)})'


def cpu_name() -> str:
  return _cpuinfo().get('model name') or platform.processor() or platform.machine()


def machine() -> dict:
  mem = None
  try:
    with open('/proc/meminfo') as f:
      mem = round(int(f.readline().split()[1]) / 1024**2, 1)
  except OSError:
    pass
  return {
    'cpu': cpu_name(),
    'processor': processor(),
    'cores': NCPU,
    'mem_gib': mem,
    'os': platform.platform(),
    'python': platform.python_version(),
  }


# -- FLOPs ---------------------------------------------------------------------------------------


def gpt2_flops(*, n_layer, n_embd, vocab, batch, seq, mode, rank=8, inner=None, heads_dim=None):
  """Analytic matmul FLOPs of one training step (2 per multiply-add), the same for both sides.

  Forward: the four projections per layer, attention scores and values (full T×T, as both sides
  compute them), and the tied LM head on all T positions. Backward: `full` computes input and
  weight gradients (2 × forward); `lora` computes input gradients for every layer but weight
  gradients only for the adapters (frozen weights need none), and no input gradient for the
  embedding; the LoRA adapters' own forward/backward are counted too.
  """
  inner = inner or 4 * n_embd
  n = batch * seq
  d = n_embd
  proj = 2 * n * (d * 3 * d + d * d + d * inner + inner * d)
  attn = 2 * 2 * batch * seq * seq * d
  head = 2 * n * d * vocab
  fwd = n_layer * (proj + attn) + head
  if mode == 'full':
    return {'forward': fwd, 'step': 3 * fwd}
  lora_fwd = n_layer * 2 * n * (d * rank + rank * 3 * d)
  # Backward: input grads of everything (= forward), plus adapter weight grads and input grads.
  lora_bwd = n_layer * 2 * (2 * n * (d * rank + rank * 3 * d))
  return {'forward': fwd + lora_fwd, 'step': 2 * fwd + lora_fwd + lora_bwd}


def matmul_rate(n: int, run, repeats: int) -> dict:
  """GFLOP/s of an `n`³ matmul that `run()` computes (and waits for): the best of `repeats`."""
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    run()
    times.append(time.perf_counter() - t)
  return {'n': n, 'gflops': 2 * n**3 / min(times) / 1e9, 'times': times}


# -- worker protocol: one JSON object per line ----------------------------------------------------


def send(obj) -> None:
  sys.__stdout__.write(json.dumps(obj) + '\n')
  sys.__stdout__.flush()


def serve(handlers: dict) -> None:
  """Read one JSON command per stdin line, answer each with one JSON line on stdout."""
  # Libraries print to stdout; keep the protocol channel clean.
  sys.stdout = sys.stderr
  for line in sys.__stdin__:
    line = line.strip()
    if not line:
      continue
    cmd = json.loads(line)
    op = cmd.pop('op')
    if op == 'exit':
      send({'ok': True})
      return
    try:
      send({'ok': True, **handlers[op](**cmd)})
    except Exception as e:  # report, the driver decides
      import traceback

      send({'ok': False, 'error': f'{type(e).__name__}: {e}', 'trace': traceback.format_exc()})
