"""PEFT adapters both ways against the real `peft`: import, export, merged export (logits to 1e-4).

Tiny random LlamaForCausalLM (grouped-query attention: 4 query heads, 2 key/value heads) and
GPT2LMHeadModel. Every adapter tensor gets a random value before saving (see `make_adapter`), and
the JAX side is changed again (optimizer steps or a random perturbation) before exporting, so each
direction is checked on values the other side did not start from.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers

import flax_adapters as fa
from conversion import get_family
from conversion.peft import export_merged, export_peft, import_peft
from tests.conversion.peft_helpers import TOL, flax_logits, fresh, leaf, make_adapter, perturb, torch_logits
from tests.conversion.test_gpt2 import tiny_gpt2
from tests.conversion.test_llama import tiny_llama

LLAMA = get_family('llama')
GPT2 = get_family('gpt2')


@pytest.fixture
def ids(rng):
  return rng.integers(0, 128, size=(2, 12)).astype(np.int64)


def flax_base(family, hf_config, base_state_dict):
  config = family.config_from_hf(hf_config.to_dict())
  return family.flax_model(config), family.torch_to_flax(base_state_dict, config), config


def check_export(tmp_path, cls, hf, base, model, params, ids, *, merged=True):
  """Export ours to PEFT and to merged weights; both must give our logits. Returns the written config."""
  ours = flax_logits(model, params, ids)
  written = export_peft(tmp_path / 'exported', model, params)
  assert json.loads((tmp_path / 'exported' / 'adapter_config.json').read_text()) == written
  loaded = peft.PeftModel.from_pretrained(fresh(cls, hf.config, base), tmp_path / 'exported').eval()
  np.testing.assert_allclose(torch_logits(loaded, ids), ours, atol=TOL, rtol=0)
  if merged:
    export_merged(tmp_path / 'merged', model, params)
    ours_merged = torch_logits(cls.from_pretrained(tmp_path / 'merged').eval(), ids)
    np.testing.assert_allclose(ours_merged, ours, atol=TOL, rtol=0)
    theirs_merged = torch_logits(loaded.merge_and_unload(), ids)
    np.testing.assert_allclose(ours_merged, theirs_merged, atol=TOL, rtol=0)
  return written


def test_adapter_on_the_untied_head_alone_both_ways(tmp_path, ids):
  """Keys all under `lm_head` (outside the trunk) name LlamaForCausalLM, not the bare LlamaModel
  (whose names were given a `model.` prefix and refused); our export of it re-imports."""
  hf = tiny_llama(tie_word_embeddings=False)
  theirs, base = make_adapter(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=['lm_head']), tmp_path / 'peft')
  model, params, _ = flax_base(LLAMA, hf.config, base)
  adapted, p = import_peft(tmp_path / 'peft', model, params, family='llama')
  assert [e.site.name for e in adapted.plan] == ['lm_head']
  np.testing.assert_allclose(flax_logits(adapted, p, ids), torch_logits(theirs, ids), atol=TOL, rtol=0)
  check_export(tmp_path, transformers.LlamaForCausalLM, hf, base, adapted, p, ids, merged=False)
  again, q = import_peft(tmp_path / 'exported', model, params, family='llama')
  assert again.plan == adapted.plan
  np.testing.assert_array_equal(leaf(q, 'lm_head/lora_b'), leaf(p, 'lm_head/lora_b'))


def test_embedding_copies_of_save_embedding_layers_load_into_the_base(tmp_path, ids):
  """`save_pretrained(save_embedding_layers=True)` (a resized vocabulary) writes full copies of
  embed_tokens and lm_head, which PEFT loads into the base model: so do we (they were refused)."""
  hf = tiny_llama()
  theirs, base = make_adapter(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj']), tmp_path / 'peft')
  with torch.no_grad():  # embeddings trained (or resized) alongside the adapter
    for weight in (theirs.base_model.model.model.embed_tokens.weight, theirs.base_model.model.lm_head.weight):
      weight.add_(0.1 * torch.randn_like(weight))
  theirs.save_pretrained(tmp_path / 'peft', save_embedding_layers=True)
  model, params, _ = flax_base(LLAMA, hf.config, base)
  adapted, p = import_peft(tmp_path / 'peft', model, params, family='llama')
  np.testing.assert_array_equal(
    leaf(p, 'model/embed_tokens/embedding'), theirs.base_model.model.model.embed_tokens.weight.detach().numpy()
  )
  np.testing.assert_allclose(flax_logits(adapted, p, ids), torch_logits(theirs, ids), atol=TOL, rtol=0)


def test_llama_lora_patterns_and_lm_head_both_ways(tmp_path, ids):
  hf = tiny_llama()
  config = peft.LoraConfig(
    r=4,
    lora_alpha=8,
    lora_dropout=0.1,
    target_modules=['q_proj', 'k_proj', 'v_proj', 'down_proj'],
    rank_pattern={'layers.1.self_attn.q_proj': 2, 'k_proj': 3},
    alpha_pattern={'v_proj': 3},
    modules_to_save=['lm_head'],
  )
  theirs, base = make_adapter(hf, config, tmp_path / 'peft')
  model, params, _ = flax_base(LLAMA, hf.config, base)
  adapted, p = import_peft(tmp_path / 'peft', model, params, family='llama')
  assert {e.methods[0].dropout for e in adapted.plan} == {0.1}  # lora_dropout carries over (training only)

  ranks = {e.site.name: e.methods[0].rank for e in adapted.plan}
  assert ranks['model.layers.1.self_attn.q_proj'] == 2 and ranks['model.layers.0.self_attn.q_proj'] == 4
  assert ranks['model.layers.0.self_attn.k_proj'] == 3 and len(ranks) == 8
  assert {e.site.name: e.methods[0].alpha for e in adapted.plan}['model.layers.1.self_attn.v_proj'] == 3
  np.testing.assert_array_equal(
    leaf(p, 'lm_head/kernel'), theirs.base_model.model.lm_head.modules_to_save['default'].weight.detach().numpy().T
  )
  np.testing.assert_allclose(flax_logits(adapted, p, ids), torch_logits(theirs, ids), atol=TOL, rtol=0)

  # Two Adam steps on next-token loss move the adapters and the lm_head copy (only those).
  mask = fa.trainable_mask(adapted, p)
  tx = fa.transfer_optimizer(optax.adam(1e-2), mask)

  def loss(q):
    logits = adapted.apply({'params': q}, jnp.asarray(ids[:, :-1]))
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(ids[:, 1:])).mean()

  @jax.jit
  def step(q, state):
    updates, state = tx.update(jax.grad(loss)(q), state, q)
    return optax.apply_updates(q, updates), state

  trained, state = p, tx.init(p)
  for _ in range(2):
    trained, state = step(trained, state)
  assert not np.allclose(leaf(trained, 'lm_head/kernel'), leaf(p, 'lm_head/kernel'))
  np.testing.assert_array_equal(leaf(trained, 'model/norm/scale'), leaf(p, 'model/norm/scale'))

  written = check_export(tmp_path, transformers.LlamaForCausalLM, hf, base, adapted, trained, ids)
  assert written['r'] == 4 and written['lora_alpha'] == 8 and written['modules_to_save'] == ['lm_head']
  assert written['rank_pattern'] == {
    'model.layers.1.self_attn.q_proj': 2,
    'model.layers.0.self_attn.k_proj': 3,
    'model.layers.1.self_attn.k_proj': 3,
  }
  assert written['alpha_pattern'] == {f'model.layers.{i}.self_attn.v_proj': 3 for i in range(2)}
  assert len(written['target_modules']) == 8 and written['fan_in_fan_out'] is False


def test_llama_rslora_with_regex_target_string(tmp_path, ids):
  hf = tiny_llama()
  config = peft.LoraConfig(
    r=8, lora_alpha=4, use_rslora=True, target_modules=r'model\.layers\.\d+\.(self_attn\.k_proj|mlp\.up_proj)'
  )
  theirs, base = make_adapter(hf, config, tmp_path / 'peft')
  model, params, _ = flax_base(LLAMA, hf.config, base)
  adapted, p = import_peft(tmp_path / 'peft', model, params)
  assert sorted(e.site.name for e in adapted.plan) == [
    'model.layers.0.mlp.up_proj',
    'model.layers.0.self_attn.k_proj',
    'model.layers.1.mlp.up_proj',
    'model.layers.1.self_attn.k_proj',
  ]
  assert all(e.methods[0].use_rslora and e.methods[0].scale == 4 / np.sqrt(8) for e in adapted.plan)
  np.testing.assert_allclose(flax_logits(adapted, p, ids), torch_logits(theirs, ids), atol=TOL, rtol=0)

  written = check_export(
    tmp_path, transformers.LlamaForCausalLM, hf, base, adapted, perturb(adapted, p), ids, merged=False
  )
  assert written['use_rslora'] is True and written['r'] == 8 and written['rank_pattern'] == {}


def test_llama_layers_to_transform(tmp_path, ids):
  hf = tiny_llama()
  config = peft.LoraConfig(
    r=4, lora_alpha=16, target_modules=['o_proj', 'gate_proj'], layers_to_transform=[1], layers_pattern='layers'
  )
  theirs, base = make_adapter(hf, config, tmp_path / 'peft')
  model, params, _ = flax_base(LLAMA, hf.config, base)
  adapted, p = import_peft(tmp_path / 'peft', model, params)
  assert sorted(e.site.name for e in adapted.plan) == [
    'model.layers.1.mlp.gate_proj',
    'model.layers.1.self_attn.o_proj',
  ]
  np.testing.assert_allclose(flax_logits(adapted, p, ids), torch_logits(theirs, ids), atol=TOL, rtol=0)


def test_mixed_rslora_and_ranks_from_adapt_export_exactly(tmp_path, ids):
  """Adapters placed in JAX: per-module rank, rsLoRA on some modules only (written as plain alphas)."""
  hf = tiny_llama()
  base = {k: v.detach().clone() for k, v in hf.state_dict().items()}
  model, params, _ = flax_base(LLAMA, hf.config, base)
  adapted, p = fa.adapt(
    model,
    params,
    {'q_proj': fa.LoRA(rank=4, alpha=8, use_rslora=True), 'layers.1.mlp.up_proj': fa.LoRA(rank=2, alpha=8)},
    jax.ShapeDtypeStruct((1, 8), jnp.int32),
    rng=jax.random.key(3),
  )
  p = perturb(adapted, p, scale=0.1)
  written = check_export(tmp_path, transformers.LlamaForCausalLM, hf, base, adapted, p, ids, merged=False)
  assert written['use_rslora'] is False
  assert written['lora_alpha'] == 16  # 8 / sqrt(4) = 16 / 4
  assert written['rank_pattern'] == {'model.layers.1.mlp.up_proj': 2}
  assert written['alpha_pattern'] == {'model.layers.1.mlp.up_proj': 8}


def test_gpt2_conv1d_lora_fan_in_fan_out_both_ways(tmp_path, ids):
  hf = tiny_gpt2()
  config = peft.LoraConfig(
    r=4, lora_alpha=8, target_modules=['c_attn', 'mlp.c_proj'], fan_in_fan_out=True, rank_pattern={'h.1.attn.c_attn': 6}
  )
  theirs, base = make_adapter(hf, config, tmp_path / 'peft')
  # PEFT keeps LoRA Linear-shaped on Conv1D ([r, in] and [out, r]) although Conv1D's weight is [in, out].
  layer = theirs.base_model.model.transformer.h[0].attn.c_attn
  assert tuple(layer.weight.shape) == (64, 192) and tuple(layer.lora_B['default'].weight.shape) == (192, 4)
  model, params, _ = flax_base(GPT2, hf.config, base)
  adapted, p = import_peft(tmp_path / 'peft', model, params)
  assert leaf(p, 'transformer/h_0/attn/c_attn/lora_a').shape == (64, 4)
  assert leaf(p, 'transformer/h_1/attn/c_attn/lora_b').shape == (6, 192)
  np.testing.assert_allclose(flax_logits(adapted, p, ids), torch_logits(theirs, ids), atol=TOL, rtol=0)

  written = check_export(tmp_path, transformers.GPT2LMHeadModel, hf, base, adapted, perturb(adapted, p), ids)
  assert written['fan_in_fan_out'] is True and written['task_type'] == 'CAUSAL_LM'
  assert written['rank_pattern'] == {'transformer.h.1.attn.c_attn': 6}


def test_ia3_with_feedforward_modules_both_ways(tmp_path, ids):
  hf = tiny_llama()
  config = peft.IA3Config(target_modules=['k_proj', 'v_proj', 'down_proj'], feedforward_modules=['down_proj'])
  theirs, base = make_adapter(hf, config, tmp_path / 'peft')
  model, params, _ = flax_base(LLAMA, hf.config, base)
  adapted, p = import_peft(tmp_path / 'peft', model, params)
  methods = {e.site.name: e.methods[0].name for e in adapted.plan}
  assert methods['model.layers.0.mlp.down_proj'] == 'ia3_ff' and methods['model.layers.1.self_attn.k_proj'] == 'ia3'
  assert leaf(p, 'model/layers_0/mlp/down_proj/ia3_ff_scale').shape == (128,)  # [1, in] in PEFT
  assert leaf(p, 'model/layers_0/self_attn/v_proj/ia3_scale').shape == (32,)  # [out, 1]: 2 kv heads x 16
  np.testing.assert_allclose(flax_logits(adapted, p, ids), torch_logits(theirs, ids), atol=TOL, rtol=0)

  written = check_export(tmp_path, transformers.LlamaForCausalLM, hf, base, adapted, perturb(adapted, p), ids)
  assert written['peft_type'] == 'IA3'
  assert written['feedforward_modules'] == ['model.layers.0.mlp.down_proj', 'model.layers.1.mlp.down_proj']


def test_adapter_made_on_the_bare_trunk_class(tmp_path, ids):
  """PEFT on `GPT2Model` names modules `h.0.attn.c_attn` (no `transformer.`); its regex is matched on those."""
  hf = tiny_gpt2()
  trunk = transformers.GPT2Model(hf.config).eval()
  trunk.load_state_dict(
    {k.removeprefix('transformer.'): v for k, v in hf.state_dict().items() if k.startswith('transformer.')}
  )
  config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r'h\.\d+\.mlp\.c_fc', fan_in_fan_out=True)
  theirs, _ = make_adapter(trunk, config, tmp_path / 'peft')
  model, params, _ = flax_base(GPT2, hf.config, hf.state_dict())
  adapted, p = import_peft(tmp_path / 'peft', model, params)
  assert sorted(e.site.name for e in adapted.plan) == ['transformer.h.0.mlp.c_fc', 'transformer.h.1.mlp.c_fc']
  with torch.no_grad():
    hidden = theirs(torch.from_numpy(ids)).last_hidden_state
    expected = (hidden @ trunk.wte.weight.T).numpy()  # GPT-2's head is tied to wte
  np.testing.assert_allclose(flax_logits(adapted, p, ids), expected, atol=TOL, rtol=0)


def test_llama_lora_on_an_untied_lm_head_with_peft_s_base_layer_copy(tmp_path, ids):
  # PEFT's default save_embedding_layers='auto' also writes the targeted head's base weight as
  # `lm_head.base_layer.weight`; it is the base model's own weight, loaded into the base params.
  hf = tiny_llama(tie_word_embeddings=False)
  theirs, base = make_adapter(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'lm_head']), tmp_path)
  from safetensors.numpy import load_file

  assert 'base_model.model.lm_head.base_layer.weight' in load_file(tmp_path / 'adapter_model.safetensors')
  model, params, _ = flax_base(LLAMA, hf.config, base)
  adapted, p = import_peft(tmp_path, model, params)
  assert 'lm_head' in {e.site.name for e in adapted.plan}
  np.testing.assert_allclose(flax_logits(adapted, p, ids), torch_logits(theirs, ids), atol=TOL, rtol=0)


def test_imported_rank_above_the_layer_s_dims_is_kept(tmp_path, ids):
  # PEFT allows r=64 on a 64->32 k_proj; a trained adapter keeps its rank (new ones may not exceed 32).
  hf = tiny_llama()
  theirs, base = make_adapter(hf, peft.LoraConfig(r=64, lora_alpha=64, target_modules=['k_proj']), tmp_path / 'peft')
  model, params, _ = flax_base(LLAMA, hf.config, base)
  adapted, p = import_peft(tmp_path / 'peft', model, params)
  assert {e.methods[0].rank for e in adapted.plan} == {64}
  np.testing.assert_allclose(flax_logits(adapted, p, ids), torch_logits(theirs, ids), atol=TOL, rtol=0)
  check_export(tmp_path, transformers.LlamaForCausalLM, hf, base, adapted, perturb(adapted, p), ids, merged=False)
  with pytest.raises(fa.AdapterError, match=r'`lora_rank`=64 is larger than'):
    fa.adapt(model, params, {'k_proj': fa.LoRA(rank=64)}, jax.ShapeDtypeStruct((1, 8), jnp.int32))


def test_bert_embeddings_trained_whole_export_by_their_full_names(tmp_path, rng):
  # PEFT matches modules_to_save with str.endswith, so 'embeddings' would also wrap
  # 'embeddings.word_embeddings' inside it; the export names the parameter-holding submodules.
  torch.manual_seed(0)
  hf = transformers.BertModel(
    transformers.BertConfig(
      vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
  ).eval()
  base = {k: v.detach().clone() for k, v in hf.state_dict().items()}
  family = get_family('bert')
  model, params, _ = flax_base(family, hf.config, base)
  adapted, p = fa.adapt(
    model, params, {'query': fa.LoRA(rank=4)}, jax.ShapeDtypeStruct((1, 8), jnp.int32), modules_to_save=['embeddings']
  )
  p = perturb(adapted, p)
  written = export_peft(tmp_path / 'exported', adapted, p)
  assert sorted(written['modules_to_save']) == [
    'embeddings.LayerNorm',
    'embeddings.position_embeddings',
    'embeddings.token_type_embeddings',
    'embeddings.word_embeddings',
  ]
  loaded = peft.PeftModel.from_pretrained(fresh(transformers.BertModel, hf.config, base), tmp_path / 'exported').eval()
  ids = rng.integers(0, 128, size=(2, 12)).astype(np.int64)
  with torch.no_grad():
    theirs = loaded(torch.from_numpy(ids)).last_hidden_state.numpy()
  ours = np.asarray(adapted.apply({'params': p}, jnp.asarray(ids)).last_hidden_state)
  np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
