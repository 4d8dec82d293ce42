"""conversion.alphagenome at a tiny width: the key table, strictness both ways, other ports refused, adapters in the
port's layout. (Against the port itself, at real width: test_alphagenome_port.py.) No forward passes here."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import flax_adapters as fa
from conversion import alphagenome as ca
from flax_adapters.genomics.alphagenome import AlphaGenome, AlphaGenomeConfig, random_variables

C = AlphaGenomeConfig.tiny()
MODEL = AlphaGenome(C)
NEW = {'my_atac': {'modality': 'atac', 'num_tracks': 4}}


@pytest.fixture(scope='module')
def tiny():
  variables = random_variables(MODEL, seed=3, calibrate=False)
  return variables, ca.port_state_dict(variables, C)


def flat(tree):
  return traverse_util.flatten_dict(tree)


def test_round_trip_is_exact_and_layouts_are_the_ports(tiny):
  variables, sd = tiny
  assert len(sd) == len(ca.key_table(C))
  w = C.encoder_widths
  assert sd['encoder.down_blocks.4.block1.conv.weight'].shape == (w[5], w[4], C.conv_kernel)  # torch (out, in, k)
  assert sd['encoder.down_blocks.4.block1.conv.scale'].shape == (w[5], 1, 1)
  assert sd['tower.blocks.0.mha.q_proj.weight'].shape == (C.num_heads * C.qk_dim, C.trunk_width)  # (out, in)
  assert sd['heads.atac.convs.1.weight'].shape == (2, 3, C.trunk_width)  # (organisms, out, in)
  assert sd['contact_maps_head.linear.weight'].shape == (2, C.pair_width, C.contact_map_tracks)  # (organisms, in, out)
  assert sd['splice_sites_junction_head.rope_params.pos_donor'].shape == (2, 2, 3, C.splice_hidden)
  np.testing.assert_array_equal(
    sd['encoder.dna_embedder.block.norm.running_var'],
    variables['buffers']['encoder']['dna_embedder']['block']['norm']['running_var'],
  )
  back = ca.variables_from_port(sd, C)
  a, b = flat(back), flat(variables)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
    assert a[k].dtype == b[k].dtype


def test_safetensors_file_round_trip(tiny, tmp_path):
  variables, _ = tiny
  path = ca.save_port_checkpoint(tmp_path / 'tiny.safetensors', variables, C)
  back = ca.load_port_checkpoint(path, C)
  for k, v in flat(variables).items():
    np.testing.assert_array_equal(flat(back)[k], v)
  with pytest.raises(ValueError, match=r'`path` must end in .safetensors'):
    ca.save_port_checkpoint(tmp_path / 'tiny.pth', variables, C)


def test_missing_unexpected_and_misshaped_keys_are_all_named(tiny):
  _, sd = tiny
  bad = dict(sd)
  del bad['tower.blocks.1.mlp.fc2.bias']
  bad['tower.blocks.1.mlp.fc3.bias'] = np.zeros(3, np.float32)
  bad['tower.blocks.0.mha.q_proj.weight'] = np.zeros((5, 5), np.float32)
  with pytest.raises(ValueError) as e:
    ca.variables_from_port(bad, C)
  message = str(e.value)
  assert "missing key: 'tower.blocks.1.mlp.fc2.bias'" in message
  assert (
    "unexpected key: 'tower.blocks.1.mlp.fc3.bias' (shape (3,)) has no place in AlphaGenome. Fix: did you mean 'tower.blocks.1.mlp.fc2.bias'?"
    in message
  )
  assert "wrong shape: state_dict['tower.blocks.0.mha.q_proj.weight'] has shape (5, 5)" in message


def test_a_checkpoint_of_another_config_or_with_unknown_heads_is_refused(tiny):
  _, sd = tiny
  with pytest.raises(ValueError, match=r'wrong shape: .*the config does not match the checkpoint'):
    ca.variables_from_port(sd, C.replace(width_step=8))
  extra = {**sd, 'heads.my_atac.convs.1.weight': np.zeros((1, 4, C.trunk_width), np.float32)}
  with pytest.raises(ValueError, match=r"a head 'my_atac' that `heads` does not list; add its spec"):
    ca.variables_from_port(extra, C)


@pytest.mark.parametrize(
  'keys,port',
  [
    (
      ['transformer_unet.dna_embed.conv.weight', 'transformer_unet.transformer.layers.0.0.block.to_qkv.weight'],
      'lucidrains',
    ),
    (
      ['alphagenome/sequence_encoder/dna_embedder/conv1_d/w', 'alphagenome/transformer_tower/mha_block/q_layer/w'],
      "DeepMind's JAX/Haiku",
    ),
    (['module.encoder.dna_embedder.conv1.weight'], 'DistributedDataParallel'),
  ],
)
def test_other_ports_are_refused_by_name(keys, port):
  with pytest.raises(
    ValueError, match=rf'is not a state dict of .*alphagenome-pytorch.*looks like .*{re.escape(port)}'
  ):
    ca.variables_from_port({k: np.zeros(2, np.float32) for k in keys}, C)


def test_a_port_model_with_adapters_applied_is_refused_by_name(tiny):
  _, sd = tiny
  wrapped = {k.replace('mha.q_proj.weight', 'mha.q_proj.original_layer.weight'): v for k, v in sd.items()}
  with pytest.raises(ValueError, match=r'looks like a .*alphagenome-pytorch.* model with adapters applied'):
    ca.variables_from_port(wrapped, C)


def test_export_refuses_adapter_leaves(tiny):
  variables, _ = tiny
  dna = MODEL.dummy_input()
  adapted, params = fa.prepare_for_transfer(MODEL, variables['params'], fa.TransferConfig(mode='lora'), dna)
  with pytest.raises(ValueError, match=r'unexpected path: params/tower/blocks_0/mha/q_proj/lora_a .*merge adapters'):
    ca.port_state_dict({'params': params, 'buffers': variables['buffers']}, C)


def test_adapters_in_the_ports_layout_round_trip(tiny):
  """LoRA inside a Houlsby-wrapped block, IA3 and IA3_FF, Houlsby on layers, Locon on a standardized conv."""
  variables, _ = tiny
  dna = MODEL.dummy_input()
  config = fa.TransferConfig(
    mode=['lora', 'ia3', 'houlsby', 'locon'],
    lora_targets=['re:tower\\.blocks\\.0\\.mha\\.q_proj'],
    ia3_targets=['re:tower\\.blocks\\.1\\.mha\\.k_proj'],
    ia3_ff_targets=['fc2'],
    houlsby_targets=['re:tower\\.blocks\\.0\\.mha'],
    locon_targets=['down_blocks.5.block2'],
    remove_heads=['atac'],
    new_heads=NEW,
  )
  adapted, params = fa.prepare_for_transfer(MODEL, variables['params'], config, dna)
  params = jax.tree.map(lambda x: x + 0.01, params)  # non-zero adapters, trained heads
  buffers = adapted.base.buffers_for(variables['buffers'])
  sd = ca.port_adapter_state_dict(adapted, params, buffers)
  for key in (
    'tower.blocks.0.mha.block.q_proj.original_layer.weight',
    'tower.blocks.0.mha.block.q_proj.lora_A.weight',
    'tower.blocks.0.mha.adapter.down_project.weight',
    'tower.blocks.1.mha.k_proj.original_layer.weight',
    'tower.blocks.1.mha.k_proj.scale',
    'tower.blocks.2.mlp.fc2.scale',
    'encoder.down_blocks.5.block2.conv.original_layer.scale',
    'encoder.down_blocks.5.block2.conv.locon_down.weight',
    'heads.my_atac.convs.1.weight',
  ):
    assert key in sd, key
  assert 'heads.atac.convs.1.weight' not in sd
  assert sd['tower.blocks.0.mha.block.q_proj.lora_A.weight'].shape == (8, C.trunk_width)  # torch (r, in)
  partial = ca.port_adapter_state_dict(adapted, params, buffers, include_trunk=False)  # what trained, port names
  heads = ('heads.', *ca.SPECIAL_HEAD_PREFIX.values())
  assert {k for k in partial if not k.startswith(heads)} == {
    k for k in sd if re.search(r'lora_|locon_|\.adapter\.|_proj\.scale$|fc2\.scale$', k)
  }
  assert {k for k in partial if k.startswith(heads)} == {k for k in sd if k.startswith(heads)}
  assert all(np.array_equal(v, sd[k]) for k, v in partial.items())
  back, _ = ca.adapted_params_from_port(sd, adapted, params)
  for k, v in flat(params).items():
    np.testing.assert_array_equal(flat(back)[k], v)
  kept, none = ca.adapted_params_from_port(sd, adapted, params, keep_trunk=True)
  assert none is None and all(np.array_equal(flat(kept)[k], v) for k, v in flat(params).items())
  with pytest.raises(ValueError, match=r'lacks the adapter tensor .*lora_B'):
    ca.adapted_params_from_port({k: v for k, v in sd.items() if 'lora_B' not in k}, adapted, params)


def test_two_adapters_on_one_layer_have_no_port_layout(tiny):
  variables, _ = tiny
  adapted, params = fa.prepare_for_transfer(
    MODEL, variables['params'], fa.TransferConfig(mode=['lora', 'ia3'], ia3_targets=['v_proj']), MODEL.dummy_input()
  )
  with pytest.raises(
    ValueError, match=r"tower.blocks.0.mha.v_proj has \['lora', 'ia3'\]; the port wraps a layer in one adapter only"
  ):
    ca.port_adapter_state_dict(adapted, params, variables['buffers'])


def test_key_table_matches_the_model_at_real_width():
  """677 rows, each the shape `jax.eval_shape` gives (no weights are allocated)."""
  config = AlphaGenomeConfig()
  table = ca.key_table(config)
  shapes = ca.variable_shapes(AlphaGenome(config))
  assert len(table) == len(shapes) == 677
  assert sum(int(np.prod(s.shape)) for k, s in shapes.items() if k[0] == 'params') == 450_452_613
  assert {r.collection for r in table if r.torch_key.endswith(('running_var', 'track_means'))} == {'buffers'}
  assert jnp.dtype(shapes[('params', 'tower', 'blocks_0', 'mha', 'q_proj', 'kernel')].dtype) == jnp.float32
