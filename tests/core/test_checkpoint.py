"""Adapter checkpoints: only trained leaves, exact round trip, refused on another base, atomic."""

import os

import jax
import numpy as np
import pytest
from flax import traverse_util

import flax_adapters as fa
from tests.core import testnet as net
from tests.core.helpers import config, perturb

CFG = dict(mode=['lora', 'houlsby'], remove_heads=['dnase'], new_heads={'new': {'modality': 'atac', 'num_tracks': 2}})


@pytest.fixture(scope='module')
def trained():
  model, params, x = net.make()
  adapted, p = fa.prepare_for_transfer(model, params, config(**CFG), x)
  return model, params, x, adapted, perturb(p, jax.random.key(1))


def test_round_trip_is_bitwise_and_only_holds_trained_leaves(trained, tmp_path):
  model, params, x, adapted, p = trained
  path = fa.save_adapters(tmp_path / 'ckpt', adapted, p)
  meta = fa.read_meta(path)
  assert meta['config']['mode'] == ['lora', 'houlsby'] and meta['config']['new_heads'] == {
    'new': {'modality': 'atac', 'num_tracks': 2}
  }
  saved = fa.checkpoint.trained_leaves(adapted, p)
  mask = traverse_util.flatten_dict(fa.trainable_mask(adapted, p))
  assert set(traverse_util.flatten_dict(saved)) == {k for k, m in mask.items() if m}

  fresh, p2 = fa.restore_transfer(path, model, params, x)
  flat, flat2 = traverse_util.flatten_dict(p), traverse_util.flatten_dict(p2)
  assert set(flat) == set(flat2)
  for k in flat:
    np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(flat2[k]), err_msg='/'.join(k))
  np.testing.assert_array_equal(fresh.apply({'params': p2}, x)['new'], adapted.apply({'params': p}, x)['new'])


def test_refused_on_a_different_base(trained, tmp_path):
  model, params, x, adapted, p = trained
  path = fa.save_adapters(tmp_path / 'ckpt', adapted, p)
  # Same architecture, other pretrained weights.
  other_params = net.make(seed=5)[1]
  a2, p2 = fa.prepare_for_transfer(model, other_params, adapted.config, x)
  with pytest.raises(ValueError, match=r'trained on different base weights: the frozen leaf .* does not match'):
    fa.load_adapters(path, a2, p2)
  # Another config: the plan differs.
  a3, p3 = fa.prepare_for_transfer(
    model,
    params,
    config(mode='lora', remove_heads=['dnase'], new_heads={'new': {'modality': 'atac', 'num_tracks': 2}}),
    x,
  )
  with pytest.raises(
    ValueError,
    match=r'do not fit this model at 4 site\(s\) \(blocks_0\.mha: saved \[\{.method.: .houlsby.*vs this model no adapter',
  ):
    fa.load_adapters(path, a3, p3)


def test_refused_on_a_different_architecture(tmp_path):
  model, params, x = net.make()
  adapted, p = fa.prepare_for_transfer(model, params, config('lora'), x)
  path = fa.save_adapters(tmp_path / 'ckpt', adapted, p)
  bigger = net.TestNet(
    heads=(('atac', {'modality': 'atac', 'num_tracks': 5}), ('dnase', {'modality': 'dnase', 'num_tracks': 2}))
  )
  bp = bigger.init(jax.random.key(0), x)['params']
  a2, p2 = fa.prepare_for_transfer(bigger, bp, adapted.config, x)
  with pytest.raises(
    ValueError,
    match=r'trained on a different base model: 2 leaves differ \(heads/atac/bias: saved \(\(3,\), .float32.\), now \(\(5,\)',
  ):
    fa.load_adapters(path, a2, p2)


_CRASHING_SAVE = """
import os, signal, sys
import jax
import orbax.checkpoint as ocp
import flax_adapters as fa
from tests.core import testnet as net
from tests.core.helpers import config

model, params, x = net.make()
adapted, p = fa.prepare_for_transfer(model, params, config('lora'), x)

def die(*args, **kwargs):  # the process is killed after the params are written, before the metadata
  os.kill(os.getpid(), signal.SIGKILL)

ocp.handlers.JsonCheckpointHandler._save_fn = die
fa.save_adapters(sys.argv[1], adapted, p)
"""


def test_killed_save_leaves_nothing_that_loads(tmp_path):
  import subprocess
  import sys

  target = tmp_path / 'ckpt'
  proc = subprocess.run([sys.executable, '-c', _CRASHING_SAVE, str(target)], cwd=os.getcwd(), capture_output=True)
  assert proc.returncode == -9, proc.stderr.decode()[-2000:]
  assert not os.path.exists(target)
  assert any(n.startswith('.ckpt.flax-adapters-tmp-') for n in os.listdir(tmp_path))  # the unfinished save
  model, params, x = net.make()
  adapted, p = fa.prepare_for_transfer(model, params, config('lora'), x)
  with pytest.raises(FileNotFoundError, match='only an unfinished save was found there: it was interrupted'):
    fa.load_adapters(target, adapted, p)
  fa.save_adapters(target, adapted, p)  # a complete save afterwards works
  assert fa.read_meta(target)['format'].startswith('flax_adapters')


def test_existing_directory_needs_overwrite(trained, tmp_path):
  model, params, x, adapted, p = trained
  fa.save_adapters(tmp_path / 'ckpt', adapted, p)
  with pytest.raises(FileExistsError, match='pass overwrite=True'):
    fa.save_adapters(tmp_path / 'ckpt', adapted, p)
  fa.save_adapters(tmp_path / 'ckpt', adapted, p, overwrite=True)


def test_checkpoint_of_explicit_methods_is_rebuilt_from_its_plan(tmp_path):
  """`adapt` checkpoints (per-layer ranks; no TransferConfig) restore from the saved plan and trainable modules."""
  model, params, x = net.make()
  adapted, p = fa.adapt(
    model,
    params,
    {'q_proj': fa.LoRA(rank=4, alpha=8), 'v_proj': fa.LoRA(rank=2, alpha=2), 'fc2': fa.IA3FF()},
    x,
    modules_to_save=['final_norm'],
  )
  p = perturb(p, jax.random.key(3))
  path = fa.save_adapters(tmp_path / 'ckpt', adapted, p)
  restored_model, restored = fa.restore_transfer(path, model, params, x)
  assert restored_model.plan == adapted.plan and restored_model.trainable == adapted.trainable
  np.testing.assert_array_equal(restored['final_norm']['scale'], p['final_norm']['scale'])
  out, ref = restored_model.apply({'params': restored}, x), adapted.apply({'params': p}, x)
  for k in ref:
    np.testing.assert_array_equal(out[k], ref[k])
