"""Issue 5, item 5: the same LoRA training on 8 simulated CPU devices, sharded over a mesh."""

import json
import os
import subprocess
import sys

import pytest

EXPECTED = {
  'mha/q_proj/lora_a': 'P(None, None)',  # A follows the kernel's input axis (replicated)...
  'mha/q_proj/lora_b': "P(None, 'model', None)",  # ...B its output axes (heads over 'model').
  'mha/o_proj/lora_a': "P('model', None, None)",  # row-parallel kernel: A is split, B replicated
  'mha/o_proj/lora_b': 'P(None, None)',
  'mha/k_proj/ia3_scale': "P('model', None)",
  'mlp/fc1/lora_b': "P(None, 'model')",
  'mlp/fc2/ia3_ff_scale': "P('model',)",
  'mha/houlsby_down': 'P(None, None)',
}


@pytest.fixture(scope='module')
def run():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  proc = subprocess.run(
    [sys.executable, '-m', 'tests.core.sharded_training'],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_eight_devices_give_the_same_losses_as_one(run):
  assert run['devices'] == 8
  assert run['losses_8'][-1] < run['losses_8'][0]
  for a, b in zip(run['losses_1'], run['losses_8']):
    assert abs(a - b) <= 1e-5 * max(1.0, abs(a))


def test_adapter_leaves_and_optimizer_state_follow_the_kernels(run):
  for block in ('blocks_0', 'blocks_1'):
    for leaf, spec in EXPECTED.items():
      assert run['adapter_specs'][f'{block}/{leaf}'] == spec, leaf
      assert run['mu_specs'][f'{block}/{leaf}'] == spec, leaf
  assert run['n_shards_lora_b'] == 8
