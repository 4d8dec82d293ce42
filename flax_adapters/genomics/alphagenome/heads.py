"""AlphaGenome's heads: genome tracks, contact maps, splice sites, splice-site usage, splice junctions.

Each head's params live under `params['heads'][name]` (the heads protocol), its buffers (a track
head's `track_means`) under `buffers['heads'][name]`. Paths inside a head mirror the port's
(`convs.1`, `residual_scales.1`, `linear`, `conv`, `rope_params`); the port keeps the four
non-track heads outside its `heads` dict (`contact_maps_head`, `splice_sites_*_head`), here they
are heads named like their outputs, so head surgery treats every head alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flax_adapters.genomics.alphagenome.config import TRACK_MODALITIES, AlphaGenomeConfig
from flax_adapters.genomics.alphagenome.layers import BUFFERS, OrganismLinear, apply_rope

Array = jax.Array
SOFT_CLIP = 10.0


def predictions_scaling(x: Array, track_means: Array, resolution: int, squashed: bool) -> Array:
  """Model space -> experimental space: undo the soft clip (and the RNA-seq power), times track means."""
  x = jnp.where(x > SOFT_CLIP, (x + SOFT_CLIP) ** 2 / (4 * SOFT_CLIP), x)
  if squashed:
    x = jnp.power(x, 1.0 / 0.75)
  return x * (track_means[:, None, :] * resolution).astype(x.dtype)


def targets_scaling(x: Array, track_means: Array, resolution: int, squashed: bool) -> Array:
  """Experimental space -> model space (the inverse of `predictions_scaling`), for losses on targets."""
  x = x / (track_means[:, None, :] * resolution + 1e-8)
  if squashed:
    x = jnp.power(x, 0.75)
  return jnp.where(x > SOFT_CLIP, 2.0 * jnp.sqrt(x * SOFT_CLIP) - SOFT_CLIP, x)


def _organism_rows(table: Array, organism_index: Array, num_organisms: int) -> Array:
  return table[organism_index if num_organisms > 1 else jnp.zeros_like(organism_index)]


class GenomeTracksHead(nn.Module):
  """Tracks at each resolution: `softplus(linear[organism](embedding)) * softplus(residual_scale[organism])`.

  Returns `{resolution: (batch, length / resolution, num_tracks)}`, in experimental space (scaled by
  the track means and the resolution) unless `return_scaled`.
  """

  spec: Mapping[str, Any]
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, embeddings: Mapping[int, Array], organism_index: Array, return_scaled: bool = False):
    n_org, n_tracks = self.spec['num_organisms'], self.spec['num_tracks']
    means = track_means(self, n_org, n_tracks)
    out = {}
    for res in self.spec['resolutions']:
      if res not in embeddings:  # resolutions=(128,): the 1 bp outputs are not computed
        continue
      x = OrganismLinear(n_tracks, n_org, param_dtype=self.param_dtype, name=f'convs_{res}')(
        embeddings[res], organism_index
      )
      scales = self.param(f'residual_scales_{res}', nn.initializers.ones, (n_org, n_tracks), self.param_dtype)
      pred = jax.nn.softplus(x) * jax.nn.softplus(_organism_rows(scales, organism_index, n_org))[:, None, :]
      if not return_scaled:
        squashed = TRACK_MODALITIES[self.spec['modality']]
        pred = predictions_scaling(pred, _organism_rows(means, organism_index, n_org), res, squashed)
      out[res] = pred
    return out


def track_means(module: nn.Module, n_org: int, n_tracks: int) -> Array:
  """The head's `track_means` buffer; a clear error if the buffers lack it (e.g. a new head)."""
  if not module.is_initializing() and not module.has_variable(BUFFERS, 'track_means'):
    raise ValueError(
      f"buffers['heads'][{module.name!r}]['track_means'] is missing: the buffers do not match the model's heads "
      '(after head surgery, new heads need buffers). Fix: buffers = model.buffers_for(buffers) with the '
      'model you apply (e.g. adapted.base), which keeps the existing buffers and gives new heads track means of ones.'
    )
  return module.variable(BUFFERS, 'track_means', lambda: jnp.ones((n_org, n_tracks), module.param_dtype)).value


class ContactMapsHead(nn.Module):
  """Contact maps `(batch, P, P, num_tracks)` from the pair embeddings: one linear map per organism."""

  spec: Mapping[str, Any]
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pair_embeddings: Array, organism_index: Array) -> Array:
    return OrganismLinear(
      self.spec['num_tracks'], self.spec['num_organisms'], param_dtype=self.param_dtype, name='linear'
    )(pair_embeddings, organism_index)


class SpliceSitesHead(nn.Module):
  """Splice-site classes at 1 bp (donor/acceptor on + and - strands, or none): `{'logits', 'probs'}`."""

  spec: Mapping[str, Any]
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, embeddings_1bp: Array, organism_index: Array):
    logits = OrganismLinear(5, self.spec['num_organisms'], param_dtype=self.param_dtype, name='conv')(
      embeddings_1bp, organism_index
    )
    return {'logits': logits, 'probs': jax.nn.softmax(logits, axis=-1)}


def _track_mask(spec: Mapping[str, Any]) -> np.ndarray:
  per = np.asarray(spec['tracks_per_organism'])
  return np.arange(spec['num_tracks'])[None, :] < per[:, None]


class SpliceSiteUsageHead(nn.Module):
  """Splice-site usage at 1 bp: `{'logits', 'predictions' (sigmoid), 'track_mask'}`."""

  spec: Mapping[str, Any]
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, embeddings_1bp: Array, organism_index: Array):
    logits = OrganismLinear(
      self.spec['num_tracks'], self.spec['num_organisms'], param_dtype=self.param_dtype, name='conv'
    )(embeddings_1bp, organism_index)
    mask = jnp.asarray(_track_mask(self.spec))[organism_index][:, None, :]
    return {'logits': logits, 'predictions': jax.nn.sigmoid(logits), 'track_mask': mask}


def splice_site_positions(probs: Array, k: int, threshold: float) -> Array:
  """The `k` likeliest sites of each of the 4 kinds, sorted, `-1` below `threshold`: `(batch, 4, k)`."""
  values, positions = jax.lax.top_k(jnp.swapaxes(probs[..., :4], 1, 2), k)
  invalid = jnp.iinfo(positions.dtype).max
  positions = jnp.where(values < threshold, invalid, positions)
  positions = jnp.sort(positions, axis=-1)
  return jnp.where(positions == invalid, -1, positions)


class RopeParams(nn.Module):
  """The junction head's per-organism, per-tissue scale and offset for each site kind (`rope_params.*`)."""

  shape: tuple[int, ...]
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self) -> dict[str, Array]:
    names = ('pos_donor', 'pos_acceptor', 'neg_donor', 'neg_acceptor')
    return {n: self.param(n, nn.initializers.zeros, self.shape, self.param_dtype) for n in names}


class SpliceJunctionsHead(nn.Module):
  """Junction counts between donor and acceptor sites, per tissue: `{'pred_counts', ...}`.

  The 1 bp embeddings are projected to `splice_hidden`, gathered at the sites, scaled and shifted
  per tissue, rotary-encoded by position, and paired: `softplus(donor · acceptor)` for each strand.
  `pred_counts` is `(batch, k, k, 2 * num_tracks)` (+ strand, then - strand), zero where a site or a
  tissue is padding.
  """

  spec: Mapping[str, Any]
  config: AlphaGenomeConfig
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, embeddings_1bp: Array, organism_index: Array, positions: Array):
    c, spec = self.config, self.spec
    n_org, n_tracks = spec['num_organisms'], spec['num_tracks']
    h = OrganismLinear(c.splice_hidden, n_org, param_dtype=self.param_dtype, name='conv')(
      embeddings_1bp, organism_index
    )
    rope = RopeParams((n_org, 2, n_tracks, c.splice_hidden), self.param_dtype, name='rope_params')()
    length = h.shape[1]

    def site_embeddings(kind: str, index: Array) -> Array:
      # Padding sites (-1) read the last position, as torch's indexing does; they are masked below.
      x = jnp.take_along_axis(h, (index % length)[..., None], axis=1)  # (batch, k, hidden)
      p = _organism_rows(rope[kind], organism_index, n_org)  # (batch, 2, tissues, hidden)
      x = p[:, 0:1] * x[:, :, None, :] + p[:, 1:2]
      return apply_rope(x, index, c.junction_rope_max_position)

    pos_donor, pos_acceptor, neg_donor, neg_acceptor = (positions[:, i] for i in range(4))
    counts, masks = [], []
    tissues = jnp.asarray(_track_mask(spec))[organism_index]  # (batch, tissues)
    for donor, acceptor, prefix in ((pos_donor, pos_acceptor, 'pos'), (neg_donor, neg_acceptor, 'neg')):
      d = site_embeddings(f'{prefix}_donor', donor)
      a = site_embeddings(f'{prefix}_acceptor', acceptor)
      counts.append(jax.nn.softplus(jnp.einsum('bdth,bath->bdat', d, a)))
      valid = (donor >= 0)[:, :, None] & (acceptor >= 0)[:, None, :]
      masks.append(valid[..., None] & tissues[:, None, None, :])
    mask = jnp.concatenate(masks, axis=-1)
    pred = jnp.where(mask, jnp.concatenate(counts, axis=-1), 0.0)
    return {'pred_counts': pred, 'splice_site_positions': positions, 'splice_junction_mask': mask}
