"""Adapter checkpoints: what overwrite may replace, what a save refuses, damaged and foreign directories."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

import flax_adapters as fa
from flax_adapters import checkpoint
from flax_adapters.forward import AdaptedModel
from tests.core import testnet as net
from tests.core.helpers import config, perturb
from tests.core.test_scan import Stack


@pytest.fixture(scope='module')
def trained():
  model, params, x = net.make()
  adapted, p = fa.prepare_for_transfer(model, params, config('lora'), x)
  return model, params, x, adapted, perturb(p, jax.random.key(1))


@pytest.fixture(scope='module')
def saved(trained, tmp_path_factory):
  model, params, x, adapted, p = trained
  return fa.save_adapters(tmp_path_factory.mktemp('saved') / 'ckpt', adapted, p)


def _copy(src, dst):
  import shutil

  shutil.copytree(src, dst)
  return str(dst)


def _plain_orbax(path):
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, {'w': np.ones(3)})
    ckptr.wait_until_finished()


# -- overwrite replaces only a flax_adapters checkpoint ----------------------------------------


def test_overwrite_refuses_a_folder_with_other_files(trained, tmp_path):
  *_, adapted, p = trained
  folder = tmp_path / 'results'
  folder.mkdir()
  (folder / 'notes.txt').write_text('mine')
  with pytest.raises(
    ValueError, match=r"replaces only a flax_adapters adapter checkpoint, but `directory` .* holds \['notes.txt'\]"
  ):
    fa.save_adapters(folder, adapted, p, overwrite=True)
  assert (folder / 'notes.txt').read_text() == 'mine' and os.listdir(folder) == ['notes.txt']


def test_overwrite_refuses_the_working_directory(trained, tmp_path, monkeypatch):
  *_, adapted, p = trained
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'train.py').write_text('print(1)')
  with pytest.raises(FileExistsError, match='exists; pass overwrite=True'):
    fa.save_adapters('', adapted, p)
  with pytest.raises(ValueError, match=r"holds \['train.py'\], which no save writes"):
    fa.save_adapters('', adapted, p, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ['train.py']


def test_overwrite_refuses_a_checkpoint_holding_a_user_file(saved, trained, tmp_path):
  *_, adapted, p = trained
  path = _copy(saved, tmp_path / 'ckpt')
  open(os.path.join(path, 'README.md'), 'w').close()
  with pytest.raises(ValueError, match=r"holds \['README.md'\]"):
    fa.save_adapters(path, adapted, p, overwrite=True)
  assert os.path.exists(os.path.join(path, 'README.md'))


def test_overwrite_refuses_a_file_a_symlink_and_another_orbax_checkpoint(saved, trained, tmp_path):
  *_, adapted, p = trained
  (tmp_path / 'weights.bin').write_bytes(b'\0' * 8)
  with pytest.raises(ValueError, match=r"'.*weights.bin' is a file"):
    fa.save_adapters(tmp_path / 'weights.bin', adapted, p, overwrite=True)
  os.symlink(saved, tmp_path / 'link')
  with pytest.raises(ValueError, match='is a symbolic link'):
    fa.save_adapters(tmp_path / 'link', adapted, p, overwrite=True)
  _plain_orbax(tmp_path / 'plain')
  with pytest.raises(ValueError, match=r"holds \['d', 'manifest.ocdbt', 'ocdbt.process_0'\], which no save writes"):
    fa.save_adapters(tmp_path / 'plain', adapted, p, overwrite=True)
  assert (tmp_path / 'weights.bin').read_bytes() == b'\0' * 8 and os.path.isdir(tmp_path / 'plain')


def test_overwrite_replaces_a_checkpoint(saved, trained, tmp_path):
  model, params, x, adapted, p = trained
  path = _copy(saved, tmp_path / 'ckpt')
  p2 = perturb(p, jax.random.key(7))
  fa.save_adapters(path, adapted, p2, overwrite=True)
  loaded = fa.load_adapters(path, adapted, p)
  np.testing.assert_array_equal(
    loaded['blocks_0']['mha']['q_proj']['lora_b'], p2['blocks_0']['mha']['q_proj']['lora_b']
  )
  assert [n for n in os.listdir(tmp_path) if n.startswith('.ckpt.flax-adapters-') and 'lock' not in n] == []


# -- what a save refuses -------------------------------------------------------------------------


def test_save_refuses_params_without_the_adapter_leaves(trained, tmp_path):
  model, params, x, adapted, p = trained
  with pytest.raises(
    ValueError, match=r"params at 'blocks.0.mha.o_proj' lack the adapter leaves \['lora_a', 'lora_b'\]"
  ):
    fa.save_adapters(tmp_path / 'ckpt', adapted, params)
  assert not os.path.exists(tmp_path / 'ckpt')


def test_save_refuses_a_wrong_shaped_leaf(trained, tmp_path):
  *_, adapted, p = trained
  bad = traverse_util.flatten_dict(p)
  bad[('blocks_1', 'mha', 'v_proj', 'lora_a')] = jnp.zeros((16, 3))
  with pytest.raises(
    ValueError,
    match=r"params at 'blocks.1.mha.v_proj' hold `lora_a` of shape \(16, 3\), but the lora adapter planned there "
    r'expects \(16, 2\)',
  ):
    fa.save_adapters(tmp_path / 'ckpt', adapted, traverse_util.unflatten_dict(bad))
  assert not os.path.exists(tmp_path / 'ckpt')


def test_a_wrong_shaped_lora_a_is_named_before_the_forward(trained):
  """It used to fail inside opt_einsum."""
  model, params, x, adapted, p = trained
  bad = traverse_util.flatten_dict(p)
  bad[('blocks_0', 'mha', 'q_proj', 'lora_a')] = jnp.zeros((2, 16))
  with pytest.raises(ValueError, match=r'hold `lora_a` of shape \(2, 16\), but .* expects \(16, 2\)'):
    adapted.apply({'params': traverse_util.unflatten_dict(bad)}, x)


def test_a_wrong_shaped_stacked_leaf_names_the_stacked_axes(tmp_path):
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  params = Stack().init(jax.random.key(1), x)['params']
  adapted, p = fa.prepare_for_transfer(
    Stack(), params, fa.TransferConfig(mode='lora', lora_rank=2, lora_targets=['q_proj']), x
  )
  bad = traverse_util.flatten_dict(p)
  bad[('layers', 'q_proj', 'lora_b')] = jnp.zeros((2, 2, 8))  # two layers' worth instead of three
  with pytest.raises(
    ValueError, match=r'\(2, 2, 8\), but .* expects \(3, 2, 8\) \(1 leading stacked-layer axes \(3,\)\)'
  ):
    fa.save_adapters(tmp_path / 'ckpt', adapted, traverse_util.unflatten_dict(bad))


def test_save_refuses_an_empty_checkpoint(trained, tmp_path):
  """Nothing trains (e.g. linear probing with every head removed): orbax used to fail with 'Found empty item'."""
  model, params, x, adapted, p = trained
  nothing = AdaptedModel(base=model, plan=())
  with pytest.raises(ValueError, match=r'`params` hold nothing that trains for this model .* would be empty'):
    fa.save_adapters(tmp_path / 'ckpt', nothing, params)
  assert os.listdir(tmp_path) == []


# -- a frozen base with NaN weights ----------------------------------------------------------------


def _with(params, path, index, value):
  flat = traverse_util.flatten_dict(jax.tree.map(np.array, params))
  flat[path][index] = value
  return traverse_util.unflatten_dict(flat)


def test_a_base_with_a_nan_weight_restores_onto_itself_and_nowhere_else(tmp_path):
  model, params, x = net.make()
  kernel = ('blocks_0', 'mlp', 'fc1', 'kernel')
  nan_base = _with(params, kernel, (0, 0), np.nan)
  adapted, p = fa.prepare_for_transfer(model, nan_base, config('lora'), x)
  path = fa.save_adapters(tmp_path / 'ckpt', adapted, perturb(p, jax.random.key(1)))
  _, restored = fa.restore_transfer(path, model, nan_base, x)
  assert np.isnan(restored['blocks_0']['mlp']['fc1']['kernel'][0, 0])
  for other in (_with(nan_base, kernel, (0, 1), 5.0), _with(nan_base, kernel, (0, 0), np.inf), params):
    with pytest.raises(ValueError, match=r"the frozen leaf 'blocks_0/mlp/fc1/kernel' does not match"):
      fa.restore_transfer(path, model, other, x)


def test_checkpoints_with_the_earlier_digest_still_load(trained, saved, tmp_path):
  model, params, x, adapted, p = trained
  path = _copy(saved, tmp_path / 'ckpt')
  meta_file = os.path.join(path, 'meta', 'metadata')
  meta = json.loads(open(meta_file).read())
  flat = {'/'.join(k): v for k, v in traverse_util.flatten_dict(p).items()}
  meta['base']['frozen_values'] = {k: checkpoint._digest_v1(flat[k]) for k in meta['base']['frozen_values']}
  open(meta_file, 'w').write(json.dumps(meta))
  fa.load_adapters(path, adapted, p)
  _, other = fa.prepare_for_transfer(model, net.make(seed=5)[1], adapted.config, x)
  with pytest.raises(ValueError, match='trained on different base weights'):
    fa.load_adapters(path, adapted, other)


# -- damaged and foreign checkpoints ---------------------------------------------------------------


def test_read_meta_on_a_plain_orbax_checkpoint(tmp_path):
  _plain_orbax(tmp_path / 'plain')
  with pytest.raises(ValueError, match=r'is not a flax_adapters adapter checkpoint: it has no `meta` item \(it holds'):
    fa.read_meta(tmp_path / 'plain')


def test_read_meta_on_another_format_and_on_a_file(tmp_path):
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(tmp_path / 'other', ocp.args.Composite(meta=ocp.args.JsonSave({'format': 'someone-else/2'})))
  with pytest.raises(ValueError, match=r"its metadata has format 'someone-else/2', expected 'flax_adapters"):
    fa.read_meta(tmp_path / 'other')
  (tmp_path / 'f').write_text('x')
  with pytest.raises(FileNotFoundError, match='a file, not an adapter checkpoint'):
    fa.read_meta(tmp_path / 'f')


@pytest.mark.parametrize(
  'damage, what',
  [
    ('truncated metadata', 'metadata'),
    ('metadata without base', 'metadata'),
    ('no params item', 'trained leaves'),
    ('params data garbled', 'trained leaves'),
    ('params metadata garbled', 'trained leaves'),
  ],
)
def test_a_damaged_checkpoint_is_named(trained, saved, tmp_path, damage, what):
  *_, adapted, p = trained
  path = _copy(saved, tmp_path / 'ckpt')
  params_dir = os.path.join(path, 'params')
  if damage == 'truncated metadata':
    open(os.path.join(path, 'meta', 'metadata'), 'w').write('{"format": "flax_ad')
  elif damage == 'metadata without base':
    meta = json.loads(open(os.path.join(path, 'meta', 'metadata')).read())
    del meta['base']
    open(os.path.join(path, 'meta', 'metadata'), 'w').write(json.dumps(meta))
  elif damage == 'no params item':
    import shutil

    shutil.rmtree(params_dir)
  elif damage == 'params data garbled':
    for root, _, files in os.walk(params_dir):
      for name in files:
        if os.path.basename(root) == 'd':
          open(os.path.join(root, name), 'wb').write(b'garbage')
  else:
    open(os.path.join(params_dir, '_METADATA'), 'w').write('{"tree_metadata": {"x": 1}}')
  with pytest.raises(ValueError, match=rf'the adapter checkpoint at .* is damaged: its {what}'):
    fa.load_adapters(path, adapted, p)
