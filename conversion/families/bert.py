"""BERT: HF `BertModel` <-> `flax_adapters.models.bert.BertModel`.

Checkpoints of the task classes (`BertForMaskedLM`, ...) hold the encoder under `bert.`; that prefix
is stripped, and their heads (`cls.*`, `classifier.*`) must be dropped with `ignore=`.
"""

from __future__ import annotations

from conversion.families.base import Family
from conversion.key_mapping import Layout, Row
from flax_adapters.models.bert import BertConfig, BertModel

I, T = Layout.IDENTITY, Layout.TRANSPOSE
_L = 'encoder.layer.{i}'
_F = 'encoder/layer_{i}'

ROWS = (
  # torch key                                         flax path                                          layout  when
  Row('embeddings.word_embeddings.weight', 'embeddings/word_embeddings/embedding', I),
  Row('embeddings.position_embeddings.weight', 'embeddings/position_embeddings/embedding', I),
  Row('embeddings.token_type_embeddings.weight', 'embeddings/token_type_embeddings/embedding', I),
  Row('embeddings.LayerNorm.weight', 'embeddings/LayerNorm/scale', I),
  Row('embeddings.LayerNorm.bias', 'embeddings/LayerNorm/bias', I),
  Row(f'{_L}.attention.self.query.weight', f'{_F}/attention/self/query/kernel', T),
  Row(f'{_L}.attention.self.query.bias', f'{_F}/attention/self/query/bias', I),
  Row(f'{_L}.attention.self.key.weight', f'{_F}/attention/self/key/kernel', T),
  Row(f'{_L}.attention.self.key.bias', f'{_F}/attention/self/key/bias', I),
  Row(f'{_L}.attention.self.value.weight', f'{_F}/attention/self/value/kernel', T),
  Row(f'{_L}.attention.self.value.bias', f'{_F}/attention/self/value/bias', I),
  Row(f'{_L}.attention.output.dense.weight', f'{_F}/attention/output/dense/kernel', T),
  Row(f'{_L}.attention.output.dense.bias', f'{_F}/attention/output/dense/bias', I),
  Row(f'{_L}.attention.output.LayerNorm.weight', f'{_F}/attention/output/LayerNorm/scale', I),
  Row(f'{_L}.attention.output.LayerNorm.bias', f'{_F}/attention/output/LayerNorm/bias', I),
  Row(f'{_L}.intermediate.dense.weight', f'{_F}/intermediate/dense/kernel', T),
  Row(f'{_L}.intermediate.dense.bias', f'{_F}/intermediate/dense/bias', I),
  Row(f'{_L}.output.dense.weight', f'{_F}/output/dense/kernel', T),
  Row(f'{_L}.output.dense.bias', f'{_F}/output/dense/bias', I),
  Row(f'{_L}.output.LayerNorm.weight', f'{_F}/output/LayerNorm/scale', I),
  Row(f'{_L}.output.LayerNorm.bias', f'{_F}/output/LayerNorm/bias', I),
  Row('pooler.dense.weight', 'pooler/dense/kernel', T, 'add_pooling_layer'),
  Row('pooler.dense.bias', 'pooler/dense/bias', I, 'add_pooling_layer'),
)

BUFFERS = (
  # Non-persistent since transformers 4.31; older checkpoints (all-MiniLM-L6-v2) carry them.
  (r'embeddings\.position_ids', 'arange(max_position_embeddings) buffer; the model builds it'),
  (r'embeddings\.token_type_ids', 'all-zero token-type buffer; the model builds it'),
)

FAMILY = Family(
  name='bert',
  hf_class_name='BertModel',
  config_class=BertConfig,
  model_class=BertModel,
  rows=ROWS,
  num_layers_field='num_hidden_layers',
  hint_fields=(
    'vocab_size',
    'hidden_size',
    'num_hidden_layers',
    'num_attention_heads',
    'intermediate_size',
    'max_position_embeddings',
    'type_vocab_size',
    'add_pooling_layer',
  ),
  wrapper_prefix='bert.',
  buffers=BUFFERS,
  legacy_names=((r'LayerNorm\.gamma$', 'LayerNorm.weight'), (r'LayerNorm\.beta$', 'LayerNorm.bias')),
)

torch_to_flax = FAMILY.torch_to_flax
flax_to_torch = FAMILY.flax_to_torch
