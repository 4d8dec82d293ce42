"""HF PEFT side: `transformers.GPT2LMHeadModel` with PEFT LoRA (or fully fine-tuned), served to run.py.

`python -m benchmarks.torch_worker --mode lora|full --size gpt2|quick --weights W.npz [--gpu]`.
torch uses every core (`torch.set_num_threads(os.cpu_count())`).
"""

from __future__ import annotations

import os
import re
import time

import numpy as np

from benchmarks import common, setup_cfg
from benchmarks.setup_cfg import ADAMW, LORA, hf_config_dict


def blas_versions(config: str) -> list[str]:
  """'MKL 2024.2', 'oneDNN 3.12.0', ... from `torch.__config__.show()`."""
  found = []
  for pattern, name in (
    (r'Math Kernel Library Version ([\d.]+)', 'MKL'),
    (r'MKL-DNN v([\d.]+)', 'oneDNN'),
    (r'OpenBLAS ([\d.]+)', 'OpenBLAS'),
  ):
    m = re.search(pattern, config)
    if m:
      found.append(f'{name} {m.group(1)}')
  return found


class Worker:
  def __init__(self, args):
    self.args = args

  def setup(self):
    t0 = time.perf_counter()
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(os.cpu_count())
    self.torch = torch
    args = self.args
    self.device = torch.device('cuda' if args.gpu else 'cpu')
    weights = dict(np.load(args.weights))
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_dict(args.size)))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items() if ':' not in k and k != 'input_ids'})
    if args.bf16 and args.mode == 'lora':
      model = model.to(torch.bfloat16)  # frozen bf16 base; PEFT keeps the adapters float32
    if args.mode == 'lora':
      model = get_peft_model(
        model,
        LoraConfig(
          r=LORA['rank'],
          lora_alpha=LORA['alpha'],
          target_modules=LORA['targets'],
          lora_dropout=0.0,
          fan_in_fan_out=True,
        ),
        autocast_adapter_dtype=True,
      )
      with torch.no_grad():
        for name, p in model.named_parameters():
          if 'lora_A' in name:
            p.copy_(torch.from_numpy(weights['peft:' + name]))
    model.to(self.device)
    model.train()  # dropout probabilities are all 0
    self.model = model
    self.ids = torch.from_numpy(weights['input_ids']).long().to(self.device)
    del weights
    trainable = [p for p in model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(
      trainable, lr=ADAMW['lr'], betas=(ADAMW['b1'], ADAMW['b2']), eps=ADAMW['eps'], weight_decay=ADAMW['weight_decay']
    )
    out = {
      'build_s': time.perf_counter() - t0,
      'gpu_name': torch.cuda.get_device_name() if args.gpu else None,
      'trainable_params': sum(p.numel() for p in trainable),
      'torch_version': torch.__version__,
      'threads': torch.get_num_threads(),
      'attn_implementation': model.config._attn_implementation,
      # Which kernels torch picks on this processor, and its BLAS (MKL, oneDNN, OpenBLAS versions).
      'cpu_capability': torch.backends.cpu.get_cpu_capability(),
      'blas': blas_versions(torch.__config__.show()),
    }
    # Setup (loading the shared weights file, building, compiling) and the warm-up steps have their
    # own peak. Then the allocator's free pages go back to the OS and the peak count restarts, so
    # the training peak (over the timed steps) holds what training keeps resident on each side.
    out['warmup'] = self.steps(2)
    out['setup_peak_rss_mib'] = common.peak_rss_mib()
    common.release_free_memory()
    out['hwm_reset'] = common.reset_peak_rss()
    # One more untimed step: it faults the released buffers back in (its peak counts as training).
    out['warmup_after_release'] = self.steps(1)
    return out

  def matmul(self, repeats: int = 3):
    """torch's matmul rate in this process (GFLOP/s, best of `repeats`); see jax_worker.matmul."""
    torch = self.torch
    if not hasattr(self, '_mm'):
      n = setup_cfg.MATMUL_N['gpu' if self.args.gpu else 'cpu']
      dtype = torch.bfloat16 if self.args.bf16 else torch.float32
      a = torch.randn(n, n, dtype=dtype, device=self.device)
      b = torch.randn(n, n, dtype=dtype, device=self.device)
      self._mm = (n, lambda: (a @ b, self._sync()))
      self._mm[1]()
    return common.matmul_rate(*self._mm, repeats)

  def _sync(self):
    if self.args.gpu:
      self.torch.cuda.synchronize()

  def _step(self):
    torch = self.torch
    if self.args.bf16:
      with torch.autocast(self.device.type, dtype=torch.bfloat16):
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
    else:
      loss = self.model(input_ids=self.ids, labels=self.ids).loss
    loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return loss

  def steps(self, n: int):
    times, loads, losses, faults = [], [], [], []
    for _ in range(n):
      meter = common.LoadMeter()
      f0 = common.minor_faults()
      t = time.perf_counter()
      loss = self._step()
      self._sync()
      times.append(time.perf_counter() - t)
      loads.append(meter.others())
      faults.append(common.minor_faults() - f0)
      losses.append(float(loss.detach()))
    return {
      'times': times,
      'loads': loads,
      'losses': losses,
      'page_faults': faults,
      'peak_rss_mib': common.peak_rss_mib(),
      **self._device_memory(),
    }

  def _device_memory(self):
    if not self.args.gpu:
      return {}
    return {'device_peak_mib': self.torch.cuda.max_memory_allocated() / 2**20}

  def profile(self, steps: int = 2, top: int = 25):
    """Self time per torch op over a few steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
      for _ in range(steps):
        self._step()
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]:
      rows.append(
        {'op': e.key, 'self_ms_per_step': e.self_cpu_time_total / 1e3 / steps, 'calls_per_step': e.count / steps}
      )
    return {'ops': rows}

  def final(self):
    return {'peak_rss_mib': common.peak_rss_mib(), **self._device_memory()}


def main():
  w = Worker(setup_cfg.worker_args())
  common.serve({'setup': w.setup, 'steps': w.steps, 'matmul': w.matmul, 'profile': w.profile, 'final': w.final})


if __name__ == '__main__':
  main()
