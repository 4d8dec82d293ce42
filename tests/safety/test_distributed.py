"""Multi-process training on JAX's own distributed runtime: two processes on this host, one 8-device mesh.

`distributed_training.py` runs as process 0 and 1 (`jax.distributed.initialize` with a coordinator
on 127.0.0.1, four CPU devices each, gloo collectives); the adapters train sharded over the global
mesh, both processes save one checkpoint, and this process restores it.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util

import flax_adapters as fa
from tests.core import testnet as net

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp('distributed')
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)
  procs = [
    subprocess.Popen(
      [sys.executable, '-m', 'tests.safety.distributed_training', str(i), str(port), str(out)],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  results = []
  try:
    for proc in procs:
      stdout, stderr = proc.communicate(timeout=600)
      assert proc.returncode == 0, stderr[-3000:]
      results.append(json.loads(stdout.strip().splitlines()[-1]))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  return out, results


def test_two_processes_train_on_one_mesh_with_the_losses_of_one_device(run):
  _, results = run
  assert [r['process'] for r in results] == [0, 1]
  for r in results:
    assert r['devices'] == 8
    assert r['losses_8'][-1] < r['losses_8'][0]
    for a, b in zip(r['losses_1'], r['losses_8']):
      assert abs(a - b) <= 1e-5 * max(1.0, abs(a))
    # B of a head-sharded kernel follows it over 'model'; each process holds its four shards.
    assert r['lora_b_spec'] == "P(None, 'model', None)" and r['local_shards_lora_b'] == 4
  assert results[0]['losses_8'] == results[1]['losses_8']


def test_checkpoint_saved_by_both_processes_restores_here(run):
  out, results = run
  for r in results:
    assert r['restored_equal']  # restored inside the job, onto the sharded params
    assert 'exists; pass overwrite=True' in r['refused']  # both processes learn process 0's refusal
  assert sorted(n for n in os.listdir(out) if not n.startswith('.')) == ['ckpt', 'trained.npz']
  model, params, x = net.make()
  _, restored = fa.restore_transfer(out / 'ckpt', model, params, x)
  trained = np.load(out / 'trained.npz')
  flat = traverse_util.flatten_dict(restored)
  assert len(trained.files) > 10
  for key in trained.files:
    np.testing.assert_array_equal(np.asarray(flat[tuple(key.split('/'))]), trained[key], err_msg=key)
