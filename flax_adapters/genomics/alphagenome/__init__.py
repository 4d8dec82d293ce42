"""AlphaGenome in Flax linen, with the module paths of its PyTorch port (genomicsxai's `alphagenome-pytorch`).

- `config`: `AlphaGenomeConfig` (the real widths by default; `.tiny()` for tests) and the heads specs;
- `layers`: GELU, batch-RMS and layer norms, the weight-standardized conv, rotary encoding;
- `encoder`, `tower`, `decoder`, `embedders`, `heads`: the model's parts, one module per idea;
- `model`: `AlphaGenome`.

`conversion.alphagenome` (which imports torch) converts the port's checkpoints both ways. Nothing
here imports torch, and the core library imports nothing from here.
"""

from flax_adapters.genomics.alphagenome.config import AlphaGenomeConfig, default_heads, normalize_heads
from flax_adapters.genomics.alphagenome.heads import predictions_scaling, targets_scaling
from flax_adapters.genomics.alphagenome.model import AlphaGenome, calibrate_norms, random_variables

__all__ = [
  'AlphaGenome',
  'AlphaGenomeConfig',
  'calibrate_norms',
  'default_heads',
  'normalize_heads',
  'predictions_scaling',
  'random_variables',
  'targets_scaling',
]
