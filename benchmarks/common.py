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


def cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict:
  mem = None
  try:
    with open('/proc/meminfo') as f:
      mem = round(int(f.readline().split()[1]) / 1024**2, 1)
  except OSError:
    pass
  return {
    'cpu': cpu_name(),
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
