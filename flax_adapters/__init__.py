"""flax_adapters: adapter-based transfer learning for JAX/Flax, as pure functions over params pytrees."""

from flax_adapters.checkpoint import load_adapters, read_meta, restore_transfer, save_adapters
from flax_adapters.config import TransferConfig
from flax_adapters.forward import AdaptedModel, SitePlan, Trainable
from flax_adapters.merge import materialize, merge_adapters
from flax_adapters.methods import (
  IA3,
  IA3FF,
  AdapterError,
  Houlsby,
  Locon,
  LoRA,
  Method,
  register_method,
  unregister_method,
)
from flax_adapters.placement import adapt
from flax_adapters.rules import Rule
from flax_adapters.sharding import named_shardings, optimizer_shardings, partition_specs, shard_params
from flax_adapters.summary import ParamSummary, param_summary
from flax_adapters.tracing import Site, trace_model, trace_params
from flax_adapters.training import combine, make_train_step, partition, trainable_mask, transfer_optimizer
from flax_adapters.transfer import prepare_for_transfer, prepare_params

__version__ = '0.1.0'

__all__ = [
  'IA3',
  'IA3FF',
  'AdaptedModel',
  'AdapterError',
  'Houlsby',
  'LoRA',
  'Locon',
  'Method',
  'ParamSummary',
  'Rule',
  'Site',
  'SitePlan',
  'Trainable',
  'TransferConfig',
  'adapt',
  'combine',
  'load_adapters',
  'make_train_step',
  'materialize',
  'merge_adapters',
  'named_shardings',
  'optimizer_shardings',
  'param_summary',
  'partition',
  'partition_specs',
  'prepare_for_transfer',
  'prepare_params',
  'read_meta',
  'register_method',
  'restore_transfer',
  'save_adapters',
  'shard_params',
  'trace_model',
  'trace_params',
  'trainable_mask',
  'transfer_optimizer',
  'unregister_method',
]
