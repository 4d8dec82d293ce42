"""The benchmarked model, batch and training settings, shared by both sides."""

from __future__ import annotations

SIZES = {
  # GPT-2 small (124M): the benchmark.
  'gpt2': dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024, batch=4, seq=128),
  # A small model for smoke tests (--quick).
  'quick': dict(n_layer=2, n_embd=256, n_head=4, vocab_size=8192, n_positions=256, batch=4, seq=64),
}

LORA = dict(rank=8, alpha=16, targets=['c_attn'])
# The matmul each worker times between rounds (n x n x n): its framework's peak in that round.
MATMUL_N = {'cpu': 2048, 'gpu': 8192}
# torch.optim.AdamW's defaults, written out for both sides.
ADAMW = dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)


def hf_config_dict(size: str) -> dict:
  s = SIZES[size]
  return dict(
    vocab_size=s['vocab_size'],
    n_positions=s['n_positions'],
    n_embd=s['n_embd'],
    n_layer=s['n_layer'],
    n_head=s['n_head'],
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
  )


def worker_args(argv=None):
  """The command line both workers take (run.py starts them): mode, size, weights, device flags."""
  import argparse

  parser = argparse.ArgumentParser()
  parser.add_argument('--mode', choices=('lora', 'full'), required=True)
  parser.add_argument('--size', choices=tuple(SIZES), default='gpt2')
  parser.add_argument('--weights', required=True)
  parser.add_argument('--gpu', action='store_true')
  parser.add_argument('--bf16', action='store_true')
  # jax side, LoRA: also a hand-written LoRA on the same model (the library-overhead pair).
  parser.add_argument('--overhead', action='store_true')
  args = parser.parse_args(argv)
  args.bf16 = args.bf16 or args.gpu
  return args
