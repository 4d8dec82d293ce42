"""The genomics example built on flax_adapters: models, a synthetic task and the demo.

- `seq2func`: a compact AlphaGenome-style sequence-to-function model (conv tower, transformer tower,
  assay heads) with the AlphaGenome module paths, so the seed document's targets apply verbatim;
- `alphagenome`: the real AlphaGenome (450M parameters, every head) with the module paths of its
  PyTorch port; `conversion.alphagenome` reads and writes the port's checkpoints;
- `data`: a synthetic genomics task (motifs planted in random DNA drive coverage tracks);
- `demo`: pretrain, then transfer to a new assay once per mode (`python -m flax_adapters.genomics.demo`).

The core library imports nothing from here.
"""
