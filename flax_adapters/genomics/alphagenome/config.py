"""`AlphaGenomeConfig`: the widths and depths of AlphaGenome, and its heads.

The default is the real model (450M parameters, the widths of DeepMind's checkpoint and of
genomicsxai's `alphagenome-pytorch`); `AlphaGenomeConfig.tiny()` keeps the structure at a few
thousand parameters, for fast tests.

Heads are a mapping `name -> spec` (the heads protocol of `flax_adapters.surgery`). A spec has
`modality` and `num_tracks`, and optionally:

- `resolutions`: base pairs per output bin of a track head, `(1, 128)` or `(128,)` (default: by
  modality, `(128,)` for ChIP, `(1, 128)` otherwise);
- `num_organisms`: how many organisms the head has its own weights for (default 1, as for a new
  head in AlphaGenome's transfer API; the pretrained heads have `config.num_organisms`);
- `tracks_per_organism`: for the splice usage and junction heads, how many of the `num_tracks`
  tracks each organism really has (the rest are padding and masked).

Examples:
  >>> c = AlphaGenomeConfig()
  >>> c.trunk_width, c.embed_128bp_width, c.encoder_widths[:3]
  (1536, 3072, (768, 896, 1024))
  >>> sorted(default_heads(c))[:3]
  ['atac', 'cage', 'chip_histone']
  >>> normalize_heads({'my_atac': {'modality': 'atac', 'num_tracks': 4}})['my_atac']['resolutions']
  (1, 128)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from flax.core import FrozenDict

from flax_adapters.heads import head_items

# Track heads (coverage at 1 bp and/or 128 bp) and whether their predictions are squashed
# (RNA-seq: the model predicts counts**0.75, and predictions are expanded back).
TRACK_MODALITIES: Mapping[str, bool] = FrozenDict(
  {
    'atac': False,
    'dnase': False,
    'procap': False,
    'cage': False,
    'rna_seq': True,
    'chip_tf': False,
    'chip_histone': False,
  }
)
# Heads with their own structure; one head of each, named like its output.
SPECIAL_MODALITIES = ('contact_maps', 'splice_sites', 'splice_site_usage', 'splice_junctions')
MODALITIES = tuple(TRACK_MODALITIES) + SPECIAL_MODALITIES
RESOLUTIONS = (1, 128)
_SPEC_KEYS = ('modality', 'num_tracks', 'resolutions', 'num_organisms', 'tracks_per_organism')


def _check_int(name: str, value, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise TypeError(f'`{name}` must be an int, found {type(value).__name__} {value!r}.')
  if value < minimum:
    raise ValueError(f'`{name}` must be >= {minimum}, found {value}.')
  return value


@dataclasses.dataclass(frozen=True)
class AlphaGenomeConfig:
  """Sizes of an `AlphaGenome` model; the defaults are the real model's.

  Attributes:
    num_organisms: organisms with their own embeddings (2: human, mouse).
    stem_width: channels of the 1 bp DNA embedder (15-wide stem conv and its conv block).
    stem_kernel: width of the stem conv.
    conv_kernel: width of the encoder and decoder convs.
    width_step: channels each of the six down blocks adds (the trunk is
      `stem_width + 6 * width_step` wide).
    num_blocks: transformer blocks; the even ones also update the pair stack.
    num_heads: query heads of the multi-query attention.
    qk_dim: width of each query head and of the one shared key head.
    v_dim: width of the one shared value head.
    mlp_ratio: hidden width of the transformer MLP, as a multiple of the trunk width.
    pair_width: channels of the pair stack.
    pair_heads: heads of the sequence-to-pair outer product.
    pair_head_dim: width of each of those heads.
    pair_pool: trunk positions per pair position (the attention bias is upsampled by it).
    rope_max_position: longest wavelength scale of the tower's rotary encoding; the pair stack's
      relative positions reach `rope_max_position // pair_pool`.
    logits_soft_cap: attention logits are `cap * tanh(logits / cap)`.
    contact_map_tracks: tracks of the `contact_maps` head.
    splice_hidden: width of the splice-junction head's embeddings.
    splice_top_k: splice sites of each kind the junction head pairs up.
    splice_threshold: splice-site probability below which a site is left out.
    junction_rope_max_position: rotary scale of the junction head (in base pairs).
    track_heads: `(name, num_tracks)` of the pretrained track heads.
    splice_usage_tracks: tracks of the usage head per organism (the head is as wide as the max).
    splice_junction_tracks: tissues of the junction head per organism.
  """

  num_organisms: int = 2
  stem_width: int = 768
  stem_kernel: int = 15
  conv_kernel: int = 5
  width_step: int = 128
  num_blocks: int = 9
  num_heads: int = 8
  qk_dim: int = 128
  v_dim: int = 192
  mlp_ratio: int = 2
  pair_width: int = 128
  pair_heads: int = 32
  pair_head_dim: int = 128
  pair_pool: int = 16
  rope_max_position: int = 8192
  logits_soft_cap: float = 5.0
  contact_map_tracks: int = 28
  splice_hidden: int = 768
  splice_top_k: int = 512
  splice_threshold: float = 0.1
  junction_rope_max_position: int = 2**20
  track_heads: tuple[tuple[str, int], ...] = (
    ('atac', 256),
    ('dnase', 384),
    ('procap', 128),
    ('cage', 640),
    ('rna_seq', 768),
    ('chip_tf', 1664),
    ('chip_histone', 1152),
  )
  splice_usage_tracks: tuple[int, ...] = (734, 180)
  splice_junction_tracks: tuple[int, ...] = (367, 90)

  # Fixed by the architecture: six down blocks (bins of 2 ... 64 bp), trunk at 128 bp.
  num_down_blocks = 6

  def __post_init__(self):
    for name in (
      'num_organisms',
      'stem_width',
      'stem_kernel',
      'conv_kernel',
      'width_step',
      'num_blocks',
      'num_heads',
      'qk_dim',
      'v_dim',
      'mlp_ratio',
      'pair_width',
      'pair_heads',
      'pair_head_dim',
      'pair_pool',
      'rope_max_position',
      'contact_map_tracks',
      'splice_hidden',
      'splice_top_k',
      'junction_rope_max_position',
    ):
      _check_int(f'AlphaGenomeConfig.{name}', getattr(self, name))
    for name in ('qk_dim', 'splice_hidden'):
      if getattr(self, name) % 2:
        raise ValueError(
          f'`AlphaGenomeConfig.{name}` must be even (rotary encodings rotate pairs), found {getattr(self, name)}.'
        )
    if self.stem_kernel % 2 == 0 or self.conv_kernel % 2 == 0:
      raise ValueError(
        f'`AlphaGenomeConfig.stem_kernel` and `conv_kernel` must be odd (centred SAME padding), found '
        f'{self.stem_kernel} and {self.conv_kernel}.'
      )
    if self.rope_max_position // self.pair_pool <= self.pair_heads:
      raise ValueError(
        f'`AlphaGenomeConfig.rope_max_position` // `pair_pool` ({self.rope_max_position // self.pair_pool}) must exceed '
        f'`pair_heads` ({self.pair_heads}): the relative-position features are spread over that distance.'
      )
    object.__setattr__(self, 'track_heads', tuple((str(n), int(t)) for n, t in self.track_heads))
    for field in ('splice_usage_tracks', 'splice_junction_tracks'):
      value = tuple(getattr(self, field))
      if len(value) != self.num_organisms:
        raise ValueError(
          f'`AlphaGenomeConfig.{field}` must give one track count per organism ({self.num_organisms}), found {value}.'
        )
      object.__setattr__(self, field, value)

  @property
  def encoder_widths(self) -> tuple[int, ...]:
    """Channels at 1 bp (the DNA embedder) and after each down block (2 ... 64 bp)."""
    return tuple(self.stem_width + i * self.width_step for i in range(self.num_down_blocks + 1))

  @property
  def trunk_width(self) -> int:
    """Channels of the trunk (128 bp, the transformer tower) and of the 1 bp embeddings."""
    return self.encoder_widths[-1]

  @property
  def embed_128bp_width(self) -> int:
    return 2 * self.trunk_width

  @property
  def trunk_bin(self) -> int:
    """Base pairs per trunk position (128)."""
    return 2 ** (self.num_down_blocks + 1)

  @property
  def min_length(self) -> int:
    """Inputs are a multiple of this many base pairs: one pair position (2048 bp at real width)."""
    return self.trunk_bin * self.pair_pool

  def replace(self, **changes) -> AlphaGenomeConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def tiny(cls, **changes) -> AlphaGenomeConfig:
    """Every part of the real model at a few thousand parameters: for fast tests (512 bp inputs)."""
    sizes = dict(
      stem_width=8,
      stem_kernel=5,
      conv_kernel=3,
      width_step=4,
      num_blocks=3,
      num_heads=2,
      qk_dim=8,
      v_dim=12,
      pair_width=8,
      pair_heads=4,
      pair_head_dim=4,
      pair_pool=4,
      rope_max_position=256,
      contact_map_tracks=3,
      splice_hidden=8,
      splice_top_k=16,
      track_heads=(('atac', 3), ('dnase', 2), ('rna_seq', 2), ('chip_tf', 3)),
      splice_usage_tracks=(4, 2),
      splice_junction_tracks=(3, 2),
    )
    return cls(**{**sizes, **changes})


def default_heads(config: AlphaGenomeConfig) -> FrozenDict:
  """The pretrained model's heads: the track heads, contact maps and the three splice heads."""
  org = config.num_organisms
  heads = {name: {'modality': name, 'num_tracks': n, 'num_organisms': org} for name, n in config.track_heads}
  heads['contact_maps'] = {'modality': 'contact_maps', 'num_tracks': config.contact_map_tracks, 'num_organisms': org}
  heads['splice_sites'] = {'modality': 'splice_sites', 'num_tracks': 5, 'num_organisms': org}
  heads['splice_site_usage'] = {
    'modality': 'splice_site_usage',
    'num_tracks': max(config.splice_usage_tracks),
    'num_organisms': org,
    'tracks_per_organism': config.splice_usage_tracks,
  }
  heads['splice_junctions'] = {
    'modality': 'splice_junctions',
    'num_tracks': max(config.splice_junction_tracks),
    'num_organisms': org,
    'tracks_per_organism': config.splice_junction_tracks,
  }
  return normalize_heads(heads)


def _normalize_spec(name: str, spec) -> FrozenDict:
  if not isinstance(spec, Mapping):
    raise TypeError(f"`heads[{name!r}]` must be a mapping with 'modality' and 'num_tracks', found {spec!r}.")
  unknown = sorted(set(spec) - set(_SPEC_KEYS))
  if unknown:
    raise ValueError(f'`heads[{name!r}]` has unknown keys {unknown}; a head spec has {list(_SPEC_KEYS)}.')
  missing = [k for k in ('modality', 'num_tracks') if k not in spec]
  if missing:
    raise ValueError(
      f"`heads[{name!r}]` lacks {missing}; e.g. {{'modality': 'atac', 'num_tracks': 4}}. Found {dict(spec)!r}."
    )
  modality = spec['modality']
  if modality not in MODALITIES:
    raise ValueError(f'`heads[{name!r}]["modality"]` is {modality!r}; expected one of {list(MODALITIES)}.')
  if modality in SPECIAL_MODALITIES and name != modality:
    raise ValueError(
      f'`heads[{name!r}]` has modality {modality!r}, which AlphaGenome has once, as the head named {modality!r}.'
    )
  out: dict[str, Any] = {
    'modality': modality,
    'num_tracks': _check_int(f'heads[{name!r}]["num_tracks"]', spec['num_tracks']),
    'num_organisms': _check_int(f'heads[{name!r}]["num_organisms"]', spec.get('num_organisms', 1)),
  }
  if modality in TRACK_MODALITIES:
    default = (128,) if modality.startswith('chip') else RESOLUTIONS
    resolutions = spec.get('resolutions', default)
    if not isinstance(resolutions, Sequence) or isinstance(resolutions, str):
      raise TypeError(f'`heads[{name!r}]["resolutions"]` must be a list such as [1, 128], found {resolutions!r}.')
    resolutions = tuple(sorted(set(resolutions)))
    if not resolutions or any(r not in RESOLUTIONS for r in resolutions):
      raise ValueError(
        f'`heads[{name!r}]["resolutions"]` must be a non-empty subset of {list(RESOLUTIONS)}, found {list(resolutions)}.'
      )
    out['resolutions'] = resolutions
  elif 'resolutions' in spec:
    raise ValueError(f'`heads[{name!r}]` ({modality}) has a fixed resolution; drop "resolutions".')
  if modality in ('splice_site_usage', 'splice_junctions'):
    per = tuple(spec.get('tracks_per_organism', (out['num_tracks'],) * out['num_organisms']))
    if len(per) != out['num_organisms'] or any(
      isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= out['num_tracks'] for t in per
    ):
      raise ValueError(
        f'`heads[{name!r}]["tracks_per_organism"]` must give, for each of the {out["num_organisms"]} organisms, '
        f'a track count in [0, {out["num_tracks"]}]; found {per}.'
      )
    out['tracks_per_organism'] = per
  elif 'tracks_per_organism' in spec:
    raise ValueError(f'`heads[{name!r}]` ({modality}) has no padded tracks; drop "tracks_per_organism".')
  if modality == 'splice_sites' and out['num_tracks'] != 5:
    raise ValueError(f'`heads[{name!r}]["num_tracks"]` must be 5 (donor/acceptor on each strand, or none).')
  return FrozenDict(out)


def normalize_heads(heads) -> FrozenDict:
  """Validates a heads mapping and returns it hashable and ordered (`FrozenDict` of `FrozenDict`).

  Accepts a mapping `name -> spec` or a sequence of `(name, spec)` pairs.
  """
  return FrozenDict({name: _normalize_spec(name, spec) for name, spec in head_items(heads)})
