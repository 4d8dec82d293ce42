"""A synthetic but structured genomics task: DNA with planted motifs -> per-assay coverage tracks.

Sequences are i.i.d. background DNA (GC content `gc`) with motif instances planted at random,
non-overlapping positions on either strand. Each instance is drawn from the motif's position
weight matrix (`Motif.pwm`: `fidelity` of the mass on the consensus letters), so instances vary
the way real binding sites do. Four motifs are built in (`MOTIFS`): a CTCF-like, a TATA-like, a
GATA-like and an AP-1-like consensus.

Each assay (`AssaySpec`) turns the planted sites into an expected coverage per base pair:

    rate(t, x) = (baseline + sum_m w_m g_tm s_m(x) + sum_pairs w_p g_tp s_p(x))
                 * exp(-sum_c r_c g_tc s'_c(x))

where `s_m` is the sites of motif m smoothed with the assay's profile (a Gaussian or a two-sided
exponential peaking at 1), `s_p` the same for cooperative pairs (a site of motif A counts only
when a site of motif B lies within `window` bp), `s'_c` the sites of a repressor smoothed with a
wider Gaussian (`repress_width`), and `g` per-track gains (log-normal around 1, fixed by the task
seed and the assay name), so one assay's tracks are related but not identical, like one assay
in several cell types. Coverage is averaged over bins of the head's resolution, and observed
coverage is Poisson: `counts ~ Poisson(depth * bin_size * mean_rate)`, reported as
`counts / (depth * bin_size)` (mean: the expected coverage).

`PRETRAIN_ASSAYS` ('atac', 'dnase', 'chip_tf', 'chip_histone') use the motifs in different ways
(AP-1 and CTCF open chromatin; CTCF represses dnase; chip_tf needs GATA AND TATA within 200 bp;
chip_histone is broad around TATA). `TRANSFER_ASSAYS` ('my_atac') is a new assay over the same
motifs, combined differently, so features learned on the pretraining assays help.

Examples:
  >>> task = GenomicsTask(seq_len=256, assays=['atac', 'chip_tf'], bin_size=16, seed=0)
  >>> x, y = task.sample(3, rng=0)
  >>> x.shape, {k: v.shape for k, v in y.items()}
  ((3, 256, 4), {'atac': (3, 16, 2), 'chip_tf': (3, 16, 2)})
  >>> bool((x.sum(-1) == 1).all())
  True
  >>> new = task.with_assays(['my_atac'])
  >>> new.heads()
  {'my_atac': {'modality': 'atac', 'num_tracks': 4}}
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

ALPHABET = 'ACGT'
IUPAC = {
  'A': 'A',
  'C': 'C',
  'G': 'G',
  'T': 'T',
  'R': 'AG',
  'Y': 'CT',
  'S': 'CG',
  'W': 'AT',
  'K': 'GT',
  'M': 'AC',
  'B': 'CGT',
  'D': 'AGT',
  'H': 'ACT',
  'V': 'ACG',
  'N': 'ACGT',
}


# --------------------------------------------------------------------------------------------
# Encoding helpers


def one_hot(seq: str | Sequence[str]) -> np.ndarray:
  """One-hot DNA, `(length, 4)` for a string or `(n, length, 4)` for equal-length strings.

  Letters are A, C, G, T in that order (case-insensitive); N gives an all-zero row.

  Examples:
    >>> one_hot('ACGTN').astype(int).tolist()
    [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
  """
  if isinstance(seq, str):
    codes = np.frombuffer(seq.upper().encode('ascii'), np.uint8)
    bad = set(seq.upper()) - set('ACGTN')
    if bad:
      raise ValueError(
        f'seq: expected only the letters A, C, G, T, N, found {sorted(bad)}. Fix: replace other IUPAC codes by N.'
      )
    table = np.full(256, 4, np.int64)
    for i, c in enumerate(ALPHABET):
      table[ord(c)] = i
    return np.eye(5, 4, dtype=np.float32)[table[codes]]
  seqs = list(seq)
  lengths = {len(s) for s in seqs}
  if len(lengths) > 1:
    raise ValueError(
      f'seq: expected sequences of one length, found lengths {sorted(lengths)}. Fix: crop or pad them to one length.'
    )
  return np.stack([one_hot(s) for s in seqs]) if seqs else np.zeros((0, 0, 4), np.float32)


def decode(onehot) -> str | list[str]:
  """Inverse of `one_hot` (all-zero rows decode to N)."""
  x = np.asarray(onehot)
  if x.ndim == 3:
    return [decode(row) for row in x]
  letters = np.array(list(ALPHABET + 'N'))
  idx = np.where(x.max(-1) > 0, x.argmax(-1), 4)
  return ''.join(letters[idx])


def reverse_complement(seq: str) -> str:
  """Reverse complement of an IUPAC string."""
  comp = str.maketrans('ACGTRYSWKMBDHVN', 'TGCAYRSWMKVHDBN')
  return seq.upper().translate(comp)[::-1]


# --------------------------------------------------------------------------------------------
# Motifs and assays


@dataclasses.dataclass(frozen=True)
class Motif:
  """A motif as an IUPAC consensus; instances are drawn from `pwm()`.

  Examples:
    >>> Motif('tata', 'TATAAAAG').pwm()[0].round(3).tolist()
    [0.033, 0.033, 0.033, 0.9]
  """

  name: str
  consensus: str
  fidelity: float = 0.9

  def __post_init__(self):
    if not isinstance(self.consensus, str) or not self.consensus or (set(self.consensus.upper()) - set(IUPAC)):
      raise ValueError(f'Motif({self.name!r}).consensus: expected a non-empty IUPAC string, found {self.consensus!r}.')
    if not 0.25 <= self.fidelity <= 1.0:
      raise ValueError(f'Motif({self.name!r}).fidelity: expected a probability in [0.25, 1], found {self.fidelity}.')

  def __len__(self) -> int:
    return len(self.consensus)

  def pwm(self) -> np.ndarray:
    """`(len, 4)` letter probabilities (A, C, G, T) per position; rows sum to 1."""
    rows = []
    for c in self.consensus.upper():
      allowed = IUPAC[c]
      if len(allowed) == 4:
        rows.append(np.full(4, 0.25))
        continue
      row = np.full(4, (1 - self.fidelity) / (4 - len(allowed)))
      for a in allowed:
        row[ALPHABET.index(a)] = self.fidelity / len(allowed)
      rows.append(row)
    return np.array(rows)


MOTIFS: tuple[Motif, ...] = (
  Motif('ctcf', 'CCGCGNGGNGGCAG'),
  Motif('tata', 'TATAAAAG'),
  Motif('gata', 'AGATAAGA'),
  Motif('ap1', 'ATGACTCAT'),
)


@dataclasses.dataclass(frozen=True)
class AssaySpec:
  """How one assay's coverage depends on motif sites (see the module docstring).

  Attributes:
    modality: the assay type, recorded for the model's head (`'atac'`, `'chip_tf'`, ...).
    num_tracks: tracks (e.g. cell types) of this assay.
    weights: motif name -> additive peak height of one site.
    cooperative: `(motif_a, motif_b, window_bp, weight)`: a peak at each site of motif_a that
      has a site of motif_b within window_bp (centre to centre).
    repressors: motif name -> strength; coverage is multiplied by `exp(-strength * s)` where s
      is that motif's sites smoothed with a Gaussian of `repress_width` bp (peak 1).
    profile: 'gaussian' (sd `width` bp) or 'exponential' (decay length `width` bp).
    width: profile width in bp.
    repress_width: repressor Gaussian sd in bp.
    baseline: background coverage.
    depth: sequencing depth: Poisson counts per bp per unit of coverage (lower = noisier).
    track_variability: sd of the log per-track gains (0: all tracks identical before noise).
  """

  modality: str
  num_tracks: int = 1
  weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
  cooperative: tuple[tuple[str, str, float, float], ...] = ()
  repressors: Mapping[str, float] = dataclasses.field(default_factory=dict)
  profile: str = 'gaussian'
  width: float = 40.0
  repress_width: float = 150.0
  baseline: float = 0.1
  depth: float = 0.5
  track_variability: float = 0.5

  def __post_init__(self):
    if not isinstance(self.modality, str) or not self.modality:
      raise TypeError(f'AssaySpec.modality: expected a non-empty str, found {self.modality!r}.')
    if isinstance(self.num_tracks, bool) or not isinstance(self.num_tracks, (int, np.integer)) or self.num_tracks < 1:
      raise ValueError(f'AssaySpec.num_tracks: expected an int >= 1, found {self.num_tracks!r}.')
    if self.profile not in ('gaussian', 'exponential'):
      raise ValueError(f"AssaySpec.profile: expected 'gaussian' or 'exponential', found {self.profile!r}.")
    for name in ('width', 'repress_width', 'depth'):
      if not getattr(self, name) > 0:
        raise ValueError(f'AssaySpec.{name}: expected a positive number, found {getattr(self, name)!r}.')
    if self.baseline < 0:
      raise ValueError(f'AssaySpec.baseline: expected >= 0, found {self.baseline!r}.')
    object.__setattr__(self, 'cooperative', tuple(tuple(p) for p in self.cooperative))
    for p in self.cooperative:
      if len(p) != 4:
        raise ValueError(f'AssaySpec.cooperative: expected (motif_a, motif_b, window_bp, weight) tuples, found {p!r}.')

  def motif_names(self) -> set[str]:
    names = set(self.weights) | set(self.repressors)
    for a, b, _, _ in self.cooperative:
      names |= {a, b}
    return names

  def head(self) -> dict[str, Any]:
    """This assay as a model head spec."""
    return {'modality': self.modality, 'num_tracks': int(self.num_tracks)}


PRETRAIN_ASSAYS: Mapping[str, AssaySpec] = {
  # Accessibility at CTCF and AP-1 sites, weaker at GATA.
  'atac': AssaySpec('atac', num_tracks=2, weights={'ctcf': 1.5, 'ap1': 1.2, 'gata': 0.6}, width=40.0),
  # Broader accessibility at AP-1 / TATA / GATA, insulated (repressed) around CTCF.
  'dnase': AssaySpec(
    'dnase', num_tracks=2, weights={'ap1': 1.5, 'tata': 1.0, 'gata': 0.6}, repressors={'ctcf': 1.5}, width=60.0
  ),
  # A factor that binds GATA only with a TATA site within 200 bp.
  'chip_tf': AssaySpec(
    'chip_tf',
    num_tracks=2,
    weights={'gata': 0.3},
    cooperative=(('gata', 'tata', 200.0, 2.5),),
    profile='exponential',
    width=30.0,
  ),
  # A broad histone mark around TATA, repressed by CTCF.
  'chip_histone': AssaySpec(
    'chip_histone', num_tracks=1, weights={'tata': 1.5}, repressors={'ctcf': 1.0}, width=200.0, repress_width=300.0
  ),
}

TRANSFER_ASSAYS: Mapping[str, AssaySpec] = {
  # A new accessibility assay over the same motifs, combined differently: strong at GATA,
  # at AP-1 only next to CTCF, and closed around TATA.
  'my_atac': AssaySpec(
    'atac',
    num_tracks=4,
    weights={'gata': 1.5, 'ap1': 0.3},
    cooperative=(('ap1', 'ctcf', 150.0, 2.0),),
    repressors={'tata': 1.0},
    width=40.0,
  ),
}

ASSAYS: Mapping[str, AssaySpec] = {**PRETRAIN_ASSAYS, **TRANSFER_ASSAYS}


class Site(NamedTuple):
  """A planted motif instance: `start` is its first bp; strand is +1 or -1."""

  motif: str
  start: int
  strand: int


@dataclasses.dataclass(frozen=True)
class GenomicsBatch:
  """Everything `GenomicsTask.generate` drew.

  Attributes:
    onehot: `(n, seq_len, 4)` float32 one-hot DNA.
    tracks: assay -> `(n, seq_len // bin_size, num_tracks)` float32 observed (noisy) coverage.
    expected: the same without noise (the Poisson means).
    sites: per sequence, the planted motif instances.
  """

  onehot: np.ndarray
  tracks: dict[str, np.ndarray]
  expected: dict[str, np.ndarray]
  sites: list[list[Site]]


# --------------------------------------------------------------------------------------------
# The task


def _smooth(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """'Same' convolution of `x` (..., L) with an odd-length centred `kernel`, via FFT."""
  length, k = x.shape[-1], kernel.shape[0]
  size = length + k - 1
  nfft = 1 << (size - 1).bit_length()
  # float32 FFTs (complex64) are twice as fast as float64 and ample for coverage values.
  y = np.fft.irfft(np.fft.rfft(x.astype(np.float32), nfft) * np.fft.rfft(kernel.astype(np.float32), nfft), nfft)
  half = k // 2
  return y[..., half : half + length]


def _profile(kind: str, width: float, max_len: int) -> np.ndarray:
  reach = int(min(np.ceil(4 * width if kind == 'gaussian' else 6 * width), max_len))
  d = np.arange(-reach, reach + 1, dtype=np.float64)
  if kind == 'gaussian':
    return np.exp(-0.5 * (d / width) ** 2)
  return np.exp(-np.abs(d) / width)


def _as_rng(rng, default: np.random.Generator) -> np.random.Generator:
  if rng is None:
    return default
  if isinstance(rng, np.random.Generator):
    return rng
  if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
    return np.random.default_rng(int(rng))
  raise TypeError(
    f'rng: expected None, an int seed or a numpy Generator, found '
    f'{type(rng).__name__}. Fix: rng=0 or rng=np.random.default_rng(0).'
  )


class GenomicsTask:
  """Draws DNA with planted motifs and the coverage tracks of some assays.

  Args:
    seq_len: sequence length in bp.
    assays: assay name -> `AssaySpec`, or names from `ASSAYS` (default: the model's default
      heads, 'atac', 'dnase', 'chip_tf').
    bin_size: bp per output bin, one int for all assays or a mapping assay -> int (e.g.
      `Seq2Func.bin_sizes()`); must divide `seq_len`.
    seed: fixes the per-track gains and the stream `sample(n)` draws from when no `rng` is given.
    motifs: the motifs that can be planted (default `MOTIFS`).
    motif_rate: expected planted sites per kb, per motif (a float or a mapping motif -> float).
    gc: GC content of the background.

  The same seed gives the same data: `sample(n, rng=k)` depends only on the task's settings and
  k; `sample(n)` continues the task's own stream.
  """

  def __init__(
    self,
    seq_len: int,
    assays=None,
    *,
    bin_size: int | Mapping[str, int] = 1,
    seed: int = 0,
    motifs: Sequence[Motif] = MOTIFS,
    motif_rate: float | Mapping[str, float] = 2.0,
    gc: float = 0.42,
  ):
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
      raise ValueError(f'seq_len: expected a positive int, found {seq_len!r}.')
    self.seq_len = int(seq_len)
    self.motifs = {m.name: m for m in motifs}
    if len(self.motifs) != len(motifs):
      raise ValueError(f'motifs: expected distinct motif names, found {[m.name for m in motifs]}.')
    self.assays = self._resolve_assays(assays)
    self.bin_sizes = self._resolve_bins(bin_size)
    if isinstance(motif_rate, Mapping):
      unknown = set(motif_rate) - set(self.motifs)
      if unknown:
        raise ValueError(f'motif_rate: unknown motifs {sorted(unknown)}; expected names from {sorted(self.motifs)}.')
      self.motif_rate = {m: float(motif_rate.get(m, 0.0)) for m in self.motifs}
    else:
      self.motif_rate = {m: float(motif_rate) for m in self.motifs}
    if any(r < 0 for r in self.motif_rate.values()):
      raise ValueError(f'motif_rate: expected rates >= 0, found {self.motif_rate}.')
    if not 0 < gc < 1:
      raise ValueError(f'gc: expected a fraction in (0, 1), found {gc!r}.')
    self.gc = float(gc)
    self.seed = int(seed)
    self._rng = np.random.default_rng(self.seed)
    self._gains = {name: self._track_gains(name, spec) for name, spec in self.assays.items()}

  # -- construction helpers

  def _resolve_assays(self, assays) -> dict[str, AssaySpec]:
    if assays is None:
      assays = ['atac', 'dnase', 'chip_tf']
    if isinstance(assays, str):
      assays = [assays]
    if not isinstance(assays, Mapping):
      names = list(assays)
      unknown = [a for a in names if a not in ASSAYS]
      if unknown:
        raise ValueError(
          f'assays: unknown preset names {unknown}; expected names from '
          f'{sorted(ASSAYS)} or a mapping name -> AssaySpec.'
        )
      assays = {a: ASSAYS[a] for a in names}
    out = {}
    for name, spec in assays.items():
      if not isinstance(spec, AssaySpec):
        raise TypeError(
          f'assays[{name!r}]: expected an AssaySpec, found '
          f'{type(spec).__name__}. Fix: AssaySpec("atac", num_tracks=2, '
          'weights={"ctcf": 1.0}).'
        )
      unknown = spec.motif_names() - set(self.motifs)
      if unknown:
        raise ValueError(
          f'assays[{name!r}]: refers to unknown motifs {sorted(unknown)}; the task has {sorted(self.motifs)}.'
        )
      out[name] = spec
    if not out:
      raise ValueError('assays: expected at least one assay, found none.')
    return out

  def _resolve_bins(self, bin_size) -> dict[str, int]:
    if isinstance(bin_size, Mapping):
      missing = set(self.assays) - set(bin_size)
      if missing:
        raise ValueError(
          f'bin_size: no bin size for assays {sorted(missing)}. Fix: give one for every assay, or one int for all.'
        )
      bins = {a: bin_size[a] for a in self.assays}
    else:
      bins = {a: bin_size for a in self.assays}
    for a, b in bins.items():
      if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1 or self.seq_len % b:
        raise ValueError(f'bin_size[{a!r}]: expected a positive int dividing seq_len={self.seq_len}, found {b!r}.')
    return {a: int(b) for a, b in bins.items()}

  def _track_gains(self, name: str, spec: AssaySpec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
    sd = spec.track_variability
    draw = lambda: np.exp(sd * rng.standard_normal(spec.num_tracks))
    return {
      'weights': {m: draw() for m in sorted(spec.weights)},
      'cooperative': [draw() for _ in spec.cooperative],
      'repressors': {m: draw() for m in sorted(spec.repressors)},
    }

  @classmethod
  def for_model(cls, model, assays=None, **kwargs) -> GenomicsTask:
    """A task whose assays are `model`'s heads, at the model's sequence length and resolutions.

    Without `assays`, the heads' names must be preset names from `ASSAYS`.
    """
    heads = dict(model.heads)
    if assays is None:
      unknown = [h for h in heads if h not in ASSAYS]
      if unknown:
        raise ValueError(
          f'assays: model heads {unknown} are not preset assays '
          f'{sorted(ASSAYS)}. Fix: pass assays={{name: AssaySpec(...)}}.'
        )
      assays = {h: ASSAYS[h] for h in heads}
    kwargs.setdefault('bin_size', model.bin_sizes())
    return cls(model.config.seq_len, assays, **kwargs)

  def with_assays(self, assays, *, bin_size=None) -> GenomicsTask:
    """The same motifs, rates, background and seed with other assays (e.g. for transfer)."""
    if bin_size is None:
      bins = set(self.bin_sizes.values())
      if len(bins) != 1:
        raise ValueError("bin_size: this task has several bin sizes; pass the new assays' bin sizes explicitly.")
      bin_size = bins.pop()
    return GenomicsTask(
      self.seq_len,
      assays,
      bin_size=bin_size,
      seed=self.seed,
      motifs=tuple(self.motifs.values()),
      motif_rate=self.motif_rate,
      gc=self.gc,
    )

  def heads(self) -> dict[str, dict[str, Any]]:
    """The assays as a model heads mapping `name -> {'modality', 'num_tracks'}`."""
    return {name: spec.head() for name, spec in self.assays.items()}

  # -- sampling

  def sample(self, n: int, rng=None, *, noise: bool = True):
    """`(onehot (n, seq_len, 4), {assay: (n, seq_len // bin_size, num_tracks)})`, float32.

    `rng`: None (the task's own stream), an int seed, or a numpy Generator. `noise=False`
    returns the expected coverage instead of Poisson draws.
    """
    batch = self.generate(n, rng)
    return batch.onehot, (batch.tracks if noise else batch.expected)

  def generate(self, n: int, rng=None, *, sites: Sequence[Iterable] | None = None) -> GenomicsBatch:
    """Draws `n` sequences; with `sites`, plants exactly those (one list per sequence) instead.

    `sites[i]` holds `(motif, start)` or `(motif, start, strand)` entries (strand +1 default).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
      raise ValueError(f'n: expected an int >= 0, found {n!r}.')
    rng = _as_rng(rng, self._rng)
    L = self.seq_len
    probs = np.array([(1 - self.gc) / 2, self.gc / 2, self.gc / 2, (1 - self.gc) / 2])
    tokens = rng.choice(4, size=(n, L), p=probs)
    if sites is None:
      all_sites = [self._draw_sites(rng) for _ in range(n)]
    else:
      if len(sites) != n:
        raise ValueError(f'sites: expected one list per sequence (n={n}), found {len(sites)}.')
      all_sites = [self._check_sites(i, s) for i, s in enumerate(sites)]
    names = list(self.motifs)
    impulses = np.zeros((n, len(names), L), np.float32)
    pwms = {m: motif.pwm() for m, motif in self.motifs.items()}
    for i, seq_sites in enumerate(all_sites):
      for site in seq_sites:
        pwm = pwms[site.motif]
        if site.strand < 0:
          pwm = pwm[::-1, ::-1]
        letters = (rng.random((len(pwm), 1)) > np.cumsum(pwm, axis=1)).sum(axis=1)
        tokens[i, site.start : site.start + len(pwm)] = np.minimum(letters, 3)
        impulses[i, names.index(site.motif), site.start + len(pwm) // 2] = 1.0
    onehot = np.eye(4, dtype=np.float32)[tokens]
    expected, tracks = {}, {}
    for name, spec in self.assays.items():
      rate = self._rate(name, spec, impulses, names)
      b = self.bin_sizes[name]
      mean = rate.reshape(n, L // b, b, spec.num_tracks).mean(axis=2)
      expected[name] = mean.astype(np.float32)
      lam = spec.depth * b * mean
      tracks[name] = (rng.poisson(lam) / (spec.depth * b)).astype(np.float32)
    return GenomicsBatch(onehot, tracks, expected, all_sites)

  def _draw_sites(self, rng: np.random.Generator) -> list[Site]:
    L = self.seq_len
    taken = np.zeros(L, bool)
    out = []
    for name, motif in self.motifs.items():
      k = len(motif)
      if k > L:
        continue
      for _ in range(rng.poisson(self.motif_rate[name] * L / 1000.0)):
        for _try in range(20):
          start = int(rng.integers(0, L - k + 1))
          if not taken[start : start + k].any():
            taken[start : start + k] = True
            out.append(Site(name, start, int(rng.choice((-1, 1)))))
            break
    return sorted(out, key=lambda s: s.start)

  def _check_sites(self, i: int, seq_sites: Iterable) -> list[Site]:
    out = []
    for entry in seq_sites:
      entry = tuple(entry)
      if len(entry) == 2:
        entry = entry + (1,)
      if len(entry) != 3 or entry[0] not in self.motifs:
        raise ValueError(
          f'sites[{i}]: expected (motif, start[, strand]) with motif in {sorted(self.motifs)}, found {entry!r}.'
        )
      motif, start, strand = entry
      if not 0 <= start <= self.seq_len - len(self.motifs[motif]) or strand not in (-1, 1):
        raise ValueError(
          f'sites[{i}]: {entry!r} does not fit: expected 0 <= start <= '
          f'{self.seq_len - len(self.motifs[motif])} and strand +1 or -1.'
        )
      out.append(Site(motif, int(start), int(strand)))
    return out

  def _rate(self, name, spec: AssaySpec, impulses, names) -> np.ndarray:
    """Expected coverage per bp, `(n, L, num_tracks)`."""
    n, _, L = impulses.shape
    T = spec.num_tracks
    gains = self._gains[name]
    imp = lambda m: impulses[:, names.index(m)]
    drive = np.zeros((n, T, L), np.float32)
    for m, w in spec.weights.items():
      drive += (w * gains['weights'][m]).astype(np.float32)[None, :, None] * imp(m)[:, None]
    for (a, b, window, w), g in zip(spec.cooperative, gains['cooperative']):
      near_b = _smooth(imp(b), np.ones(2 * int(window) + 1)) > 0.5
      drive += (w * g).astype(np.float32)[None, :, None] * (imp(a) * near_b)[:, None]
    rate = spec.baseline + _smooth(drive, _profile(spec.profile, spec.width, L))
    if spec.repressors:
      repress = np.zeros((n, T, L), np.float32)
      for m, s in spec.repressors.items():
        repress += (s * gains['repressors'][m]).astype(np.float32)[None, :, None] * imp(m)[:, None]
      rate = rate * np.exp(-_smooth(repress, _profile('gaussian', spec.repress_width, L)))
    return np.maximum(rate, 0.0).transpose(0, 2, 1)


# --------------------------------------------------------------------------------------------
# Metrics


def pearson_r(pred, target):
  """Pearson correlation per track over all batch and position entries, averaged over tracks.

  `pred`, `target`: arrays `(..., length, num_tracks)` of one shape, or mappings of such arrays
  (then a dict of correlations). A track with zero variance gives nan. Works under `jax.jit`.

  Examples:
    >>> t = np.arange(12.0).reshape(2, 3, 2)
    >>> float(pearson_r(2 * t + 1, t))
    1.0
  """
  if isinstance(pred, Mapping) or isinstance(target, Mapping):
    if not (isinstance(pred, Mapping) and isinstance(target, Mapping)) or set(pred) != set(target):
      raise ValueError(f'pearson_r: expected two mappings with the same keys, found {_keys(pred)} and {_keys(target)}.')
    return {k: pearson_r(pred[k], target[k]) for k in target}
  p, t = jnp.asarray(pred), jnp.asarray(target)
  if p.shape != t.shape or p.ndim < 1:
    raise ValueError(
      f'pearson_r: expected pred and target of one shape (..., num_tracks), found {p.shape} and {t.shape}.'
    )
  dtype = jnp.promote_types(jnp.promote_types(p.dtype, t.dtype), jnp.float32)
  p = p.reshape(-1, p.shape[-1]).astype(dtype)
  t = t.reshape(-1, t.shape[-1]).astype(dtype)
  p = p - p.mean(0)
  t = t - t.mean(0)
  denom = jnp.sqrt((p * p).sum(0) * (t * t).sum(0))
  r = jnp.where(denom > 0, (p * t).sum(0) / jnp.where(denom > 0, denom, 1), jnp.nan)
  return r.mean()


def poisson_nll(pred, target, eps: float = 1e-6):
  """Mean Poisson negative log-likelihood of coverage `target` under rate `pred` (no constant).

  Examples:
    >>> float(poisson_nll(np.ones(3), np.ones(3)))
    1.0
  """
  pred = jnp.asarray(pred)
  return jnp.mean(pred - target * jnp.log(pred + eps))


def _keys(x):
  return sorted(x) if isinstance(x, Mapping) else type(x).__name__
