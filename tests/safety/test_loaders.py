"""Loaders read only what they should: damaged files named, sharded indexes followed exactly."""

import json
import os
import shutil

import numpy as np
import pytest
from flax import serialization, traverse_util
from safetensors.torch import load_file, save_file

from conversion import load_pretrained, load_state_dict
from conversion.cli import load_base, main
from tests.conversion.test_gpt2 import tiny_gpt2

INDEX = 'model.safetensors.index.json'


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  """A tiny GPT-2 saved whole, saved in shards, and converted with to-flax."""
  root = tmp_path_factory.mktemp('models')
  hf = tiny_gpt2(n_layer=1)
  hf.save_pretrained(root / 'whole')
  hf.save_pretrained(root / 'sharded', max_shard_size='40KB')
  assert main(['to-flax', str(root / 'whole'), str(root / 'flax')]) == 0
  return root


def copy(dirs, name, tmp_path):
  return shutil.copytree(dirs / name, tmp_path / name)


def _index(path):
  return json.loads((path / INDEX).read_text())


# -- damaged files ---------------------------------------------------------------------------------


@pytest.mark.parametrize('size', [0, 100, -1000])
def test_empty_or_truncated_safetensors(dirs, tmp_path, size):
  d = copy(dirs, 'whole', tmp_path)
  data = (d / 'model.safetensors').read_bytes()
  (d / 'model.safetensors').write_bytes(data[:size])  # empty, header cut, data cut
  with pytest.raises(
    ValueError, match=r"model.safetensors' is not a readable safetensors file .* truncated, empty or damaged"
  ):
    load_pretrained(d)


def test_corrupt_msgpack(dirs, tmp_path, capsys):
  d = copy(dirs, 'flax', tmp_path)
  data = (d / 'flax_params.msgpack').read_bytes()
  (d / 'flax_params.msgpack').write_bytes(data[: len(data) // 2])
  with pytest.raises(
    ValueError, match=r"flax_params.msgpack' is not a readable flax params file .* truncated or damaged"
  ):
    load_base(str(d))
  assert main(['to-torch', str(d), str(tmp_path / 'out')]) == 1
  assert 'is not a readable flax params file' in capsys.readouterr().err
  (d / 'flax_params.msgpack').write_bytes(serialization.msgpack_serialize([1, 2]))
  with pytest.raises(ValueError, match='does not hold a tree of arrays'):
    load_base(str(d))


def test_msgpack_that_does_not_fit_its_config(dirs, tmp_path):
  d = copy(dirs, 'flax', tmp_path)
  params = traverse_util.flatten_dict(serialization.msgpack_restore((d / 'flax_params.msgpack').read_bytes()))
  params[('transformer', 'ln_f', 'scale')] = np.ones(3, np.float32)
  (d / 'flax_params.msgpack').write_bytes(serialization.msgpack_serialize(traverse_util.unflatten_dict(params)))
  with pytest.raises(
    ValueError,
    match=r"does not match its config.json \(1 leaves differ: \['transformer/ln_f/scale \(3,\) \(expected \(64,\)\)'\]",
  ):
    load_base(str(d))


@pytest.mark.parametrize(
  'text, message',
  [
    ('{"model_type": "gpt2", "n_layer": ', r'is not a valid model config JSON file'),
    ('[1, 2]', r'must hold a JSON object \(model config\), found a list'),
    ('{"n_layer": 1}', r'has model_type=None; expected the name of a model family'),
    ('{"model_type": ["gpt2"]}', r"has model_type=\['gpt2'\]"),
    ('{"model_type": "gpt2", "n_layer": 1, "n_layer": 2}', r"key 'n_layer' appears twice"),
  ],
)
def test_malformed_config_json(dirs, tmp_path, text, message):
  d = copy(dirs, 'whole', tmp_path)
  (d / 'config.json').write_text(text)
  with pytest.raises(ValueError, match=rf"config.json'.*{message}|{message}"):
    load_pretrained(d)


# -- sharded checkpoints ---------------------------------------------------------------------------


def test_a_sharded_checkpoint_loads_each_tensor_from_its_shard(dirs):
  shards = sorted(set(_index(dirs / 'sharded')['weight_map'].values()))
  assert len(shards) >= 2
  whole, sharded = load_state_dict(dirs / 'whole'), load_state_dict(dirs / 'sharded')
  assert set(whole) == set(sharded)
  for key in whole:
    np.testing.assert_array_equal(sharded[key], whole[key], err_msg=key)


def test_shards_linked_to_blobs_as_in_the_hugging_face_cache(dirs, tmp_path):
  """The hub cache keeps each file as a symlink to `../../blobs/<hash>`: that is not 'outside'."""
  blobs, snapshot = tmp_path / 'blobs', tmp_path / 'snapshots' / 'abc123'
  blobs.mkdir()
  snapshot.mkdir(parents=True)
  for name in os.listdir(dirs / 'sharded'):
    shutil.copy(dirs / 'sharded' / name, blobs / name)
    os.symlink(os.path.join('..', '..', 'blobs', name), snapshot / name)
  whole, linked = load_state_dict(dirs / 'whole'), load_state_dict(snapshot)
  assert set(whole) == set(linked) and all(np.array_equal(whole[k], linked[k]) for k in whole)


def test_a_stale_copy_in_another_shard_is_refused(dirs, tmp_path):
  """It used to win when its shard sorted last."""
  d = copy(dirs, 'sharded', tmp_path)
  weight_map = _index(d)['weight_map']
  shards = sorted(set(weight_map.values()))
  first_key = next(k for k, s in weight_map.items() if s == shards[0])
  last = load_file(d / shards[-1])
  last[first_key] = load_file(d / shards[0])[first_key] * 0 + 7  # a stale copy with other values
  save_file(last, d / shards[-1], metadata={'format': 'pt'})
  with pytest.raises(
    ValueError,
    match=rf"shard '.*{shards[-1]}' does not match the sharded-checkpoint index: it holds 1 tensors the index puts elsewhere",
  ):
    load_pretrained(d)


def test_a_key_the_index_lists_twice(dirs, tmp_path):
  d = copy(dirs, 'sharded', tmp_path)
  text = (d / INDEX).read_text()
  key, shard = next(iter(_index(d)['weight_map'].items()))
  other = next(s for s in set(_index(d)['weight_map'].values()) if s != shard)
  (d / INDEX).write_text(text.replace('"weight_map": {', f'"weight_map": {{"{key}": "{other}", ', 1))
  with pytest.raises(ValueError, match=rf"key '{key}' appears twice"):
    load_pretrained(d)


def test_a_shard_that_lacks_a_listed_tensor_or_is_missing(dirs, tmp_path):
  d = copy(dirs, 'sharded', tmp_path)
  index = _index(d)
  index['weight_map']['transformer.h.0.attn.c_attn.extra'] = index['weight_map']['transformer.wte.weight']
  (d / INDEX).write_text(json.dumps(index))
  with pytest.raises(
    ValueError, match=r"lacks 1 tensors the index puts there \(\['transformer.h.0.attn.c_attn.extra'\]\)"
  ):
    load_pretrained(d)
  index['weight_map']['transformer.h.0.attn.c_attn.extra'] = 'model-00009-of-00009.safetensors'
  (d / INDEX).write_text(json.dumps(index))
  with pytest.raises(
    FileNotFoundError, match=r"names the shard 'model-00009-of-00009.safetensors', which does not exist"
  ):
    load_pretrained(d)


@pytest.mark.parametrize('where', ['../whole/model.safetensors', 'ABSOLUTE', 'sub/../../whole/model.safetensors'])
def test_index_entries_outside_the_model_directory_are_not_read(dirs, tmp_path, where, monkeypatch):
  d = copy(dirs, 'sharded', tmp_path)
  shutil.copytree(dirs / 'whole', tmp_path / 'whole')
  target = str(tmp_path / 'whole' / 'model.safetensors') if where == 'ABSOLUTE' else where
  index = _index(d)
  index['weight_map'] = {k: target for k in index['weight_map']}
  (d / INDEX).write_text(json.dumps(index))
  import safetensors

  monkeypatch.setattr(safetensors, 'safe_open', lambda *a, **k: pytest.fail('a shard was opened'))
  with pytest.raises(
    ValueError, match=r'points outside the model directory .*; shards are read only from beside their index'
  ):
    load_pretrained(d)


@pytest.mark.parametrize(
  'index, message',
  [
    ('{"weight_map": {"a": "model.safetensors.index.json"}}', r'is not a weights file'),  # was a RecursionError
    ('{"weight_map": ', r'is not a valid sharded-checkpoint index JSON file'),
    ('["model-00001-of-00002.safetensors"]', r'must hold a JSON object \(sharded-checkpoint index\), found a list'),
    ('{"metadata": {}}', r"has no 'weight_map'"),
    ('{"weight_map": {"a": 3}}', r"weight_map\['a'\] is 3; expected a shard file name"),
  ],
)
def test_malformed_or_self_referencing_index(dirs, tmp_path, index, message):
  d = copy(dirs, 'sharded', tmp_path)
  (d / INDEX).write_text(index)
  with pytest.raises(ValueError, match=message):
    load_pretrained(d)
