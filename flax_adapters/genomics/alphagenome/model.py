"""`AlphaGenome`: DeepMind's DNA sequence-to-function model in linen, with the PyTorch port's module paths.

Module paths follow genomicsxai's `alphagenome-pytorch` (the port that AlphaGenome's adapter guide
is written for), so the guide's targets select the same layers: `encoder.down_blocks.4.block1.conv`
(a weight-standardized conv), `tower.blocks.0.mha.q_proj`, `tower.blocks.0.mlp.fc1`,
`tower.blocks.0.pair_update.row_attn`, `decoder.up_blocks.0.conv_in`, `heads.atac.convs.1`.
`conversion.alphagenome` converts the port's checkpoints both ways.

Variables: `'params'` (everything that can train) and `'buffers'` (the norms' running variances and
the track heads' `track_means`, never trained). Apply with both:
`model.apply({'params': params, 'buffers': buffers}, dna, organism_index)`.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> model = AlphaGenome(AlphaGenomeConfig.tiny())
  >>> dna = model.dummy_input()  # (1, 512, 4): one pair position at tiny width
  >>> variables = random_variables(model)  # as model.init(key, dna) gives, drawn faster
  >>> sorted(variables)
  ['buffers', 'params']
  >>> out = jax.jit(model.apply)(variables, dna, jnp.array([1]))  # one compile (eager works too)
  >>> out['atac'][1].shape, out['atac'][128].shape, out['contact_maps'].shape
  ((1, 512, 3), (1, 4, 3), (1, 1, 1, 3))
  >>> out['splice_junctions']['pred_counts'].shape  # top 16 donors x 16 acceptors x (3 tissues x 2 strands)
  (1, 16, 16, 6)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from flax_adapters.genomics.alphagenome.config import (
  TRACK_MODALITIES,
  AlphaGenomeConfig,
  default_heads,
  normalize_heads,
)
from flax_adapters.genomics.alphagenome.decoder import SequenceDecoder
from flax_adapters.genomics.alphagenome.embedders import OutputEmbedder, OutputPair
from flax_adapters.genomics.alphagenome.encoder import SequenceEncoder
from flax_adapters.genomics.alphagenome.heads import (
  ContactMapsHead,
  GenomeTracksHead,
  SpliceJunctionsHead,
  SpliceSitesHead,
  SpliceSiteUsageHead,
  splice_site_positions,
)
from flax_adapters.genomics.alphagenome.layers import BUFFERS, RMSBatchNorm
from flax_adapters.genomics.alphagenome.tower import TransformerTower

Array = jax.Array
_ONE_BP = ('splice_sites', 'splice_site_usage', 'splice_junctions')


def _needs_1bp(spec) -> bool:
  return spec['modality'] in _ONE_BP or 1 in spec.get('resolutions', ())


class Heads(nn.Module):
  """One submodule per head, named like the head (the heads protocol's `params['heads'][name]`)."""

  specs: Any
  config: AlphaGenomeConfig
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, embeddings, organism_index, names, splice_positions, return_scaled):
    out = {}
    kw = dict(param_dtype=self.param_dtype)
    for name in names:
      spec = self.specs[name]
      modality = spec['modality']
      if modality in TRACK_MODALITIES:
        out[name] = GenomeTracksHead(spec, name=name, **kw)(embeddings, organism_index, return_scaled)
      elif modality == 'contact_maps':
        out[name] = ContactMapsHead(spec, name=name, **kw)(embeddings['pair'], organism_index)
      elif modality == 'splice_sites':
        out[name] = SpliceSitesHead(spec, name=name, **kw)(embeddings[1], organism_index)
      elif modality == 'splice_site_usage':
        out[name] = SpliceSiteUsageHead(spec, name=name, **kw)(embeddings[1], organism_index)
    for name in names:
      if self.specs[name]['modality'] != 'splice_junctions':
        continue
      positions = splice_positions
      if positions is None:
        sites = out.get('splice_sites')
        if sites is None and 'splice_sites' in self.specs:  # as the port: run it for the sites, return it only if asked
          sites = SpliceSitesHead(self.specs['splice_sites'], name='splice_sites', **kw)(embeddings[1], organism_index)
        if sites is not None:
          positions = splice_site_positions(sites['probs'], self.config.splice_top_k, self.config.splice_threshold)
        elif self.is_initializing():  # placeholder sites, to create the head's params
          positions = -jnp.ones((embeddings[1].shape[0], 4, self.config.splice_top_k), jnp.int32)
        else:
          raise ValueError(
            'the splice_junctions head pairs the sites that the splice_sites head finds, but the model has no '
            'splice_sites head. Fix: pass splice_site_positions=(batch, 4, k) positions, or keep the splice_sites head.'
          )
      out[name] = SpliceJunctionsHead(self.specs[name], self.config, name=name, **kw)(
        embeddings[1], organism_index, positions
      )
    return out


class AlphaGenome(nn.Module):
  """AlphaGenome: one-hot DNA `(batch, length, 4)` and organism -> tracks, contact maps, splicing.

  Attributes:
    config: widths and depths (`AlphaGenomeConfig()` is the real 450M model, `.tiny()` a test size).
    heads: `name -> spec` (see `flax_adapters.genomics.alphagenome.config`); default: the
      pretrained heads of `config`. `model.clone(heads=...)` swaps them (the heads protocol).
    dtype: computation dtype of the convs and dense layers (None: float32 from the params).
    param_dtype: parameter dtype.
    fresh_heads: names of heads that head surgery initialised (set by `prepare_for_transfer`):
      `buffers_for` gives them fresh buffers even where the given buffers hold a head of that name
      (one a new head replaces).

  `__call__(dna, organism_index=None, *, splice_site_positions=None, return_scaled_predictions=False,
  output_heads=None)`: `length` is a multiple of `config.min_length` (2048 bp at real width);
  `organism_index` `(batch,)` is 0 (human) by default. Returns `{head: output}`: track heads give
  `{resolution: (batch, length / resolution, tracks)}` (experimental space unless
  `return_scaled_predictions`, the space the losses use), `contact_maps` `(batch, P, P, tracks)`,
  the splice heads dicts as in the port. `output_heads` runs only the named heads, and
  `resolutions=(128,)` only the 128 bp outputs; the decoder is skipped when nothing needs 1 bp.
  """

  config: AlphaGenomeConfig = dataclasses.field(default_factory=AlphaGenomeConfig)
  heads: Any = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  fresh_heads: tuple[str, ...] = ()

  def __post_init__(self):
    if not isinstance(self.config, AlphaGenomeConfig):
      raise TypeError(
        f'`AlphaGenome.config` must be an AlphaGenomeConfig, found {type(self.config).__name__}. '
        'Fix: AlphaGenome(AlphaGenomeConfig()) for the real model, AlphaGenomeConfig.tiny() for tests.'
      )
    heads = default_heads(self.config) if self.heads is None else normalize_heads(self.heads)
    object.__setattr__(self, 'heads', heads)
    super().__post_init__()

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = SequenceEncoder(c, **kw)
    self.organism_embed = nn.Embed(c.num_organisms, c.trunk_width, **kw)
    self.tower = TransformerTower(c, **kw)
    self.decoder = SequenceDecoder(c, **kw)
    self.embedder_128bp = OutputEmbedder(c.embed_128bp_width, c.num_organisms, **kw)
    self.embedder_1bp = OutputEmbedder(c.trunk_width, c.num_organisms, with_skip=True, **kw)
    self.embedder_pair = OutputPair(c.num_organisms, **kw)
    self.heads_module = Heads(self.heads, c, param_dtype=self.param_dtype, name='heads')

  # -- inputs ----------------------------------------------------------------------------------

  def _inputs(self, dna, organism_index):
    if not hasattr(dna, 'shape') or not hasattr(dna, 'dtype'):
      raise TypeError(f'`dna` must be an array (batch, length, 4), found {type(dna).__name__}.')
    if dna.ndim != 3 or dna.shape[-1] != 4:
      raise ValueError(f'`dna` must be one-hot DNA of shape (batch, length, 4), found shape {tuple(dna.shape)}.')
    if not jnp.issubdtype(dna.dtype, jnp.floating):
      raise TypeError(
        f'`dna` must be a floating one-hot array, found dtype {dna.dtype}. Fix: jax.nn.one_hot(tokens, 4).'
      )
    m = self.config.min_length
    if dna.shape[1] % m:
      raise ValueError(
        f'`dna` length must be a multiple of {m} bp (one pair position: 128 bp trunk bins x pair_pool '
        f'{self.config.pair_pool}), found {dna.shape[1]}. Fix: crop or pad to {dna.shape[1] // m * m or m} or '
        f'{-(-dna.shape[1] // m) * m}.'
      )
    if organism_index is None:
      return dna, jnp.zeros((dna.shape[0],), jnp.int32)
    organism_index = jnp.asarray(organism_index)
    if organism_index.shape != (dna.shape[0],) or not jnp.issubdtype(organism_index.dtype, jnp.integer):
      raise ValueError(
        f'`organism_index` must be integers of shape (batch,) = ({dna.shape[0]},), found '
        f'{organism_index.dtype} {tuple(organism_index.shape)}. 0 is human, 1 mouse.'
      )
    return dna, organism_index

  def _run_names(self, output_heads) -> tuple[str, ...]:
    if self.is_initializing() or output_heads is None:
      return tuple(self.heads)
    names = (output_heads,) if isinstance(output_heads, str) else tuple(output_heads)
    unknown = [n for n in names if n not in self.heads]
    if unknown:
      raise ValueError(f'`output_heads` names {unknown}, which the model does not have; its heads: {list(self.heads)}.')
    return names

  # -- forward ---------------------------------------------------------------------------------

  def embed(self, dna: Array, organism_index: Array | None = None, *, with_1bp: bool = True) -> dict[str, Array]:
    """`{'embeddings_128bp', 'embeddings_pair'[, 'embeddings_1bp']}`, channels last."""
    dna, organism_index = self._inputs(dna, organism_index)
    trunk, skips = self.encoder(dna)
    trunk = trunk + self.organism_embed(organism_index)[:, None, :]
    trunk, pair = self.tower(trunk)
    out = {'embeddings_128bp': self.embedder_128bp(trunk, organism_index)}
    if with_1bp:
      decoded = self.decoder(trunk, skips)
      out['embeddings_1bp'] = self.embedder_1bp(decoded, organism_index, out['embeddings_128bp'])
    out['embeddings_pair'] = self.embedder_pair(pair, organism_index)
    return out

  def __call__(
    self,
    dna: Array,
    organism_index: Array | None = None,
    *,
    splice_site_positions: Array | None = None,
    return_scaled_predictions: bool = False,
    output_heads: Sequence[str] | None = None,
    resolutions: Sequence[int] | None = None,
  ) -> dict[str, Any]:
    names = self._run_names(output_heads)
    with_1bp = self.is_initializing() or (
      (resolutions is None or 1 in resolutions) and any(_needs_1bp(self.heads[n]) for n in names)
    )
    if not with_1bp and output_heads is not None:
      only_1bp = [n for n in names if self.heads[n]['modality'] in _ONE_BP]
      if only_1bp:
        raise ValueError(f'`output_heads` {only_1bp} predict at 1 bp, but `resolutions` is {tuple(resolutions)}.')
    if not with_1bp:  # as the port: without 1 bp embeddings the splice heads do not run
      names = tuple(n for n in names if self.heads[n]['modality'] not in _ONE_BP)
    dna, organism_index = self._inputs(dna, organism_index)
    e = self.embed(dna, organism_index, with_1bp=with_1bp)
    embeddings = {128: e['embeddings_128bp'], 'pair': e['embeddings_pair']}
    if with_1bp:
      embeddings[1] = e['embeddings_1bp']
    return self.heads_module(embeddings, organism_index, names, splice_site_positions, return_scaled_predictions)

  # -- helpers ---------------------------------------------------------------------------------

  @nn.nowrap
  def dummy_input(self, batch: int = 1, length: int | None = None, dtype=jnp.float32) -> Array:
    """Zeros `(batch, length, 4)`, by default one `config.min_length`: enough to init or trace."""
    return jnp.zeros((batch, length or self.config.min_length, 4), dtype)

  @nn.nowrap
  def buffers_for(self, buffers) -> dict:
    """`buffers` fitted to this model's heads: kept heads keep theirs, new heads get track means of ones.

    A new head that replaces a removed head of the same name (`fresh_heads`) gets ones too, never the
    removed head's track means.

    After head surgery (`prepare_for_transfer` with `new_heads`/`remove_heads`), pass the pretrained
    buffers through the adapted model's base: `adapted.base.buffers_for(buffers)`.
    """
    shapes = jax.eval_shape(lambda: self.init(jax.random.key(0), self.dummy_input()))[BUFFERS]
    given = traverse_util.flatten_dict(buffers.get(BUFFERS, buffers) if BUFFERS in buffers else buffers)
    out = {}
    for path, want in traverse_util.flatten_dict(shapes).items():
      have = None if path[0] == 'heads' and path[1] in self.fresh_heads else given.get(path)
      if have is None:
        if path[0] != 'heads':
          raise ValueError(
            f"`buffers` lack {'/'.join(path)} {tuple(want.shape)}: they are not this model's buffers. Pass the "
            'buffers converted or initialised with the same AlphaGenomeConfig.'
          )
        have = jnp.ones(want.shape, want.dtype)
      elif tuple(have.shape) != tuple(want.shape):
        raise ValueError(
          f"`buffers` {'/'.join(path)} has shape {tuple(have.shape)}, but this model's is {tuple(want.shape)} "
          '(a head with the same name but other tracks or organisms?).'
        )
      out[path] = have
    return traverse_util.unflatten_dict(out)


def calibrate_norms(model: AlphaGenome, variables, dna: Array, organism_index: Array | None = None) -> dict:
  """`variables` with every batch-RMS norm's `running_var` set to the mean square of its input on `dna`.

  Each norm normalises with the statistics it measures, in order, as a trained model's running
  statistics would: activations then keep realistic magnitudes through the whole stack (random
  weights with arbitrary statistics let them grow by orders of magnitude). One compiled forward.
  """

  def measure(params, buffers, dna, organism_index):
    stats = {}

    def interceptor(next_fun, args, kwargs, context):
      norm = context.module
      if not isinstance(norm, RMSBatchNorm) or context.method_name != '__call__':
        return next_fun(*args, **kwargs)
      x = args[0]
      mean_square = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=tuple(range(x.ndim - 1)))
      stats[tuple(norm.scope.path)] = mean_square
      scale, bias = norm.get_variable('params', 'scale'), norm.get_variable('params', 'bias')
      return x * (scale * jax.lax.rsqrt(mean_square + norm.eps)).astype(x.dtype) + bias.astype(x.dtype)

    with nn.intercept_methods(interceptor):
      model.apply({'params': params, 'buffers': buffers}, dna, organism_index)
    return stats

  stats = jax.jit(measure)(variables['params'], variables['buffers'], dna, organism_index)
  flat = traverse_util.flatten_dict(variables['buffers'])
  for path, value in stats.items():
    flat[(*path, 'running_var')] = value.astype(flat[(*path, 'running_var')].dtype)
  return {**variables, 'buffers': traverse_util.unflatten_dict(flat)}


def random_variables(model: AlphaGenome, seed: int = 0, *, calibrate: bool = True) -> dict:
  """Random `{'params', 'buffers'}` for `model`, drawn on the host: for tests, examples and benchmarks.

  `model.init` compiles one random-number program per parameter (hundreds of them, slow on CPU);
  this draws every leaf with numpy instead. Kernels are normal with std `1/sqrt(fan_in)`, biases and
  the other params small and non-zero, scales near one, track means in [0.5, 2], so no part of the
  model is the identity. With `calibrate`, the norms' running variances are then measured on
  random DNA (`calibrate_norms`), as in a trained model; otherwise they are drawn from [0.5, 2].

  Examples:
    >>> v = random_variables(AlphaGenome(AlphaGenomeConfig.tiny()), calibrate=False)
    >>> v['buffers']['heads']['atac']['track_means'].shape
    (2, 3)
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), model.dummy_input()))

  def draw(path, leaf):
    keys, shape = [p.key for p in path], leaf.shape
    name = keys[-1]
    if name == 'kernel':
      # Heads' kernels are (organisms, in, out); dense and conv kernels (..., in, out).
      fan_in = shape[-2] if keys[1] == 'heads' else int(np.prod(shape[:-1]))
      value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
    elif name in ('scale', 'residual_scale') or name.startswith('residual_scales'):
      value = 1.0 + 0.1 * rng.normal(size=shape)
    elif name in ('running_var', 'track_means'):
      value = rng.uniform(0.5, 2.0, shape)
    elif name == 'embedding':
      value = rng.normal(size=shape)
    else:  # biases, relative-position biases, the junction head's per-tissue scales and offsets
      value = 0.1 * rng.normal(size=shape)
    return jnp.asarray(value.astype(leaf.dtype))

  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  if not calibrate:
    return variables
  dna = jax.nn.one_hot(rng.integers(0, 4, (1, model.config.min_length)), 4, dtype=jnp.float32)
  return calibrate_norms(model, variables, dna)
