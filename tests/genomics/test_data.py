"""Tests of the synthetic genomics task."""

import dataclasses

import jax
import numpy as np
import pytest

from flax_adapters.genomics.data import (
  ASSAYS,
  MOTIFS,
  PRETRAIN_ASSAYS,
  TRANSFER_ASSAYS,
  AssaySpec,
  GenomicsTask,
  Motif,
  Site,
  decode,
  one_hot,
  pearson_r,
  poisson_nll,
  reverse_complement,
)
from flax_adapters.genomics.seq2func import Seq2Func, Seq2FuncConfig

L = 512


def task(assays=('atac', 'dnase', 'chip_tf', 'chip_histone'), **kw):
  kw.setdefault('bin_size', 16)
  return GenomicsTask(L, list(assays), seed=kw.pop('seed', 0), **kw)


# ------------------------------------------------------------------------------ determinism


def test_same_seed_same_data_different_seed_different_data():
  a, b = task(), task()
  xa, ya = a.sample(8, rng=3)
  xb, yb = b.sample(8, rng=3)
  np.testing.assert_array_equal(xa, xb)
  for k in ya:
    np.testing.assert_array_equal(ya[k], yb[k])
  # The task's own stream: two fresh tasks with one seed draw the same batches in order.
  s1 = [a.sample(4)[0] for _ in range(2)]
  s2 = [b.sample(4)[0] for _ in range(2)]
  np.testing.assert_array_equal(s1[0], s2[0])
  np.testing.assert_array_equal(s1[1], s2[1])
  assert not np.array_equal(s1[0], s1[1])
  # Another task seed changes the per-track gains, not the genome drawn for an explicit rng.
  c = task(seed=1)
  xc, yc = c.sample(8, rng=3)
  np.testing.assert_array_equal(xc, xa)
  assert not np.allclose(c.sample(8, rng=3, noise=False)[1]['atac'], a.sample(8, rng=3, noise=False)[1]['atac'])
  assert not np.array_equal(a.sample(8, rng=4)[0], xa)


def test_shapes_dtypes_and_one_hot():
  t = task(bin_size={'atac': 16, 'dnase': 16, 'chip_tf': 32, 'chip_histone': 64})
  x, y = t.sample(5, rng=0)
  assert x.shape == (5, L, 4) and x.dtype == np.float32
  assert np.all(x.sum(-1) == 1)
  assert {k: v.shape for k, v in y.items()} == {
    'atac': (5, 32, 2),
    'dnase': (5, 32, 2),
    'chip_tf': (5, 16, 2),
    'chip_histone': (5, 8, 1),
  }
  for v in y.values():
    assert v.dtype == np.float32 and np.all(v >= 0)
  # GC content of the background is near the requested 0.42.
  gc = x[..., 1:3].sum() / x[..., :].sum()
  assert abs(gc - 0.42) < 0.03


def test_tracks_match_model_heads():
  """`for_model` gives targets of the model's output shapes, including coarser chip_histone."""
  model = Seq2Func(
    Seq2FuncConfig.tiny(),
    heads={
      'atac': {'modality': 'atac', 'num_tracks': 2},
      'chip_histone': {'modality': 'chip_histone', 'num_tracks': 1},
    },
  )
  t = GenomicsTask.for_model(model, seed=0)
  x, y = t.sample(3, rng=0)
  assert x.shape == model.dummy_input(3).shape
  assert {k: v.shape for k, v in y.items()} == model.output_shapes(3)
  assert t.heads() == {k: dict(v) for k, v in model.heads.items()}


# ------------------------------------------------------------------------------ motifs


def test_planted_sites_are_in_the_sequence():
  exact = tuple(Motif(m.name, m.consensus, fidelity=1.0) for m in MOTIFS)
  t = GenomicsTask(L, ['atac'], bin_size=16, seed=0, motifs=exact, motif_rate=4.0)
  batch = t.generate(20, rng=0)
  n_sites = 0
  for seq, sites in zip(decode(batch.onehot), batch.sites):
    for s in sites:
      motif = t.motifs[s.motif].consensus
      want = motif if s.strand > 0 else reverse_complement(motif)
      got = seq[s.start : s.start + len(motif)]
      assert all(w in 'N' or w == g for w, g in zip(want, got)), (s, want, got)
      n_sites += 1
  # 4 motifs at 4/kb on 512 bp: ~8 sites per sequence.
  assert 100 < n_sites < 220


def test_pwm_instances_follow_fidelity():
  """With fidelity 0.9, ~90% of a planted instance's letters match the consensus."""
  t = GenomicsTask(L, ['atac'], bin_size=16, seed=0)
  sites = [[('tata', 100), ('ap1', 300, -1)]] * 200
  seqs = decode(t.generate(200, rng=1, sites=sites).onehot)
  match = []
  for seq in seqs:
    match += [a == b for a, b in zip(seq[100:108], 'TATAAAAG')]
    match += [a == b for a, b in zip(seq[300:309], reverse_complement('ATGACTCAT'))]
  assert 0.87 < np.mean(match) < 0.93


def test_coverage_is_higher_near_planted_motifs():
  """atac responds to CTCF/AP-1/GATA: bins holding such a site have >3x the coverage of bins
  >= 160 bp (4 profile sds) away from any site."""
  t = task(['atac'], motif_rate=1.5)
  batch = t.generate(300, rng=0)
  cov = batch.expected['atac'].mean(-1)  # (n, 32)
  near, far = [], []
  for i, sites in enumerate(batch.sites):
    centers = np.array([s.start + len(t.motifs[s.motif]) // 2 for s in sites if s.motif in ('ctcf', 'ap1', 'gata')])
    for b in range(cov.shape[1]):
      lo, hi = 16 * b, 16 * (b + 1)
      if len(centers) and np.any((centers >= lo) & (centers < hi)):
        near.append(cov[i, b])
      elif not len(centers) or np.min(np.abs(centers - (lo + hi) / 2)) >= 160:
        far.append(cov[i, b])
  assert len(near) > 100 and len(far) > 100
  assert np.mean(near) > 3 * np.mean(far), (np.mean(near), np.mean(far))
  # Far from sites coverage is the baseline, up to the profiles' tails.
  assert abs(np.mean(far) - PRETRAIN_ASSAYS['atac'].baseline) < 0.02


def peak(t, assay, sites, n=1):
  """Max expected coverage (over bins and tracks) for sequences with exactly these sites."""
  return t.generate(n, rng=0, sites=[sites] * n).expected[assay].max()


def test_single_site_profile_and_interactions():
  t = task()
  base = {k: s.baseline for k, s in PRETRAIN_ASSAYS.items()}
  empty = t.generate(2, rng=0, sites=[[], []]).expected
  for k, v in empty.items():
    np.testing.assert_allclose(v, base[k], rtol=1e-6)  # no site: flat baseline
  # atac: one CTCF site gives a peak centred on its bin, decaying away from it.
  cov = t.generate(1, rng=0, sites=[[('ctcf', 249)]]).expected['atac'][0, :, 0]
  assert cov.argmax() == 256 // 16 and cov[16] > cov[13] > cov[10] > base['atac'] + 1e-3
  # chip_tf: GATA alone barely binds; GATA with TATA 100 bp away binds strongly; TATA 400 bp
  # away (outside the 200 bp window) does not help.
  alone = peak(t, 'chip_tf', [('gata', 100)]) - base['chip_tf']
  paired = peak(t, 'chip_tf', [('gata', 100), ('tata', 200)]) - base['chip_tf']
  distant = peak(t, 'chip_tf', [('gata', 50), ('tata', 450)]) - base['chip_tf']
  assert paired > 3 * alone and distant < 1.5 * alone, (alone, paired, distant)
  # dnase: an AP-1 peak is suppressed by a CTCF site next to it, not by one far away.
  free = peak(t, 'dnase', [('ap1', 250)])
  near = peak(t, 'dnase', [('ap1', 250), ('ctcf', 280)])
  far_ctcf = peak(t, 'dnase', [('ap1', 30), ('ctcf', 480)])
  assert near < 0.6 * free and far_ctcf > 0.9 * free, (free, near, far_ctcf)


def test_transfer_assay_uses_the_same_motifs_differently():
  t = task(['atac'])
  new = t.with_assays(['my_atac'])
  assert new.heads() == {'my_atac': {'modality': 'atac', 'num_tracks': 4}}
  # Same genome for the same rng, new tracks.
  x, y = t.sample(4, rng=7)
  x2, y2 = new.sample(4, rng=7)
  np.testing.assert_array_equal(x, x2)
  assert y2['my_atac'].shape == (4, 32, 4)
  assert TRANSFER_ASSAYS['my_atac'].motif_names() <= {m.name for m in MOTIFS}
  # GATA drives my_atac more than atac; TATA closes my_atac.
  gata_old = peak(t, 'atac', [('gata', 250)]) - PRETRAIN_ASSAYS['atac'].baseline
  gata_new = peak(new, 'my_atac', [('gata', 250)]) - TRANSFER_ASSAYS['my_atac'].baseline
  assert gata_new > 1.5 * gata_old
  assert peak(new, 'my_atac', [('gata', 250), ('tata', 270)]) < 0.7 * peak(new, 'my_atac', [('gata', 250)])
  # Tracks of one assay differ (per-track gains), but are strongly related.
  e = new.generate(64, rng=1).expected['my_atac']
  c = np.corrcoef(e.reshape(-1, 4).T)
  assert np.all(c[np.triu_indices(4, 1)] > 0.5) and np.any(c[np.triu_indices(4, 1)] < 0.999)


def test_poisson_noise_is_unbiased_and_depth_controls_it():
  spec = AssaySpec('atac', num_tracks=1, weights={'ctcf': 2.0}, depth=0.5)
  t = GenomicsTask(L, {'a': spec, 'deep': dataclasses.replace(spec, depth=50.0)}, bin_size=16, seed=0)
  b = t.generate(400, rng=0)
  for k in ('a', 'deep'):
    ratio = b.tracks[k].sum() / b.expected[k].sum()
    assert abs(ratio - 1) < 0.02, (k, ratio)
  # Poisson: var(obs - exp) = mean / (depth * bin).
  resid = (b.tracks['a'] - b.expected['a']).ravel()
  predicted = (b.expected['a'] / (0.5 * 16)).mean()
  assert abs(resid.var() / predicted - 1) < 0.1
  assert (
    float(pearson_r(b.tracks['deep'], b.expected['deep'])) > float(pearson_r(b.tracks['a'], b.expected['a'])) + 0.05
  )


# ------------------------------------------------------------------------------ helpers


def test_pearson_r():
  rng = np.random.default_rng(0)
  t = rng.standard_normal((10, 20, 3))
  assert float(pearson_r(3 * t + 2, t)) == pytest.approx(1.0, abs=1e-6)
  assert float(pearson_r(-t, t)) == pytest.approx(-1.0, abs=1e-6)
  assert abs(float(pearson_r(rng.standard_normal(t.shape), t))) < 0.1
  # Mean over tracks of per-track r: a perfect track and an anti-correlated one average to 0.
  mixed = np.concatenate([t[..., :1], -t[..., 1:2]], -1)
  assert float(pearson_r(mixed, t[..., :2])) == pytest.approx(0.0, abs=1e-6)
  assert np.isnan(float(pearson_r(np.ones((4, 2)), rng.standard_normal((4, 2)))))
  assert float(jax.jit(pearson_r)(t, t)) == pytest.approx(1.0, abs=1e-6)
  out = pearson_r({'a': t}, {'a': t})
  assert list(out) == ['a'] and float(out['a']) == pytest.approx(1.0, abs=1e-6)
  with pytest.raises(ValueError, match='one shape'):
    pearson_r(t, t[:, :5])
  with pytest.raises(ValueError, match='same keys'):
    pearson_r({'a': t}, {'b': t})


def test_poisson_nll_is_minimized_at_the_target():
  target = np.array([0.5, 2.0, 4.0])
  best = float(poisson_nll(target, target))
  for f in (0.5, 0.9, 1.1, 2.0):
    assert float(poisson_nll(f * target, target)) > best


def test_one_hot_round_trip():
  s = 'ACGTTGCAN'
  assert decode(one_hot(s)) == s
  assert one_hot([s, s]).shape == (2, 9, 4)
  assert reverse_complement('AACGTN') == 'NACGTT'
  with pytest.raises(ValueError, match='A, C, G, T, N'):
    one_hot('ACGU')


def test_errors_name_the_argument():
  with pytest.raises(ValueError, match='assays: unknown preset'):
    GenomicsTask(L, ['atacseq'])
  with pytest.raises(ValueError, match=r'bin_size\[.atac.\]'):
    GenomicsTask(L, ['atac'], bin_size=5)
  with pytest.raises(ValueError, match='bin_size: no bin size'):
    GenomicsTask(L, ['atac', 'dnase'], bin_size={'atac': 16})
  with pytest.raises(ValueError, match='unknown motifs'):
    GenomicsTask(L, {'x': AssaySpec('atac', weights={'sox2': 1.0})})
  with pytest.raises(TypeError, match='rng'):
    task().sample(2, rng='seed')
  with pytest.raises(ValueError, match='sites'):
    task().generate(1, sites=[[('ctcf', L)]])
  with pytest.raises(ValueError, match='profile'):
    AssaySpec('atac', profile='box')
  with pytest.raises(ValueError, match='fidelity'):
    Motif('x', 'ACGT', fidelity=1.5)
  assert set(ASSAYS) == set(PRETRAIN_ASSAYS) | set(TRANSFER_ASSAYS)


def test_explicit_sites_are_reported():
  b = task().generate(2, rng=0, sites=[[('ctcf', 10), ('gata', 100, -1)], []])
  assert b.sites == [[Site('ctcf', 10, 1), Site('gata', 100, -1)], []]
