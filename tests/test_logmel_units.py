"""Log-mel k-means unit encoder: streamed units equal whole-utterance units; a unit depends only on its
window of samples; k-means fitted on real features gives a codebook that separates different sounds."""

import pytest
import torch

from streamgen.models.logmel_units import LogMelUnits, LogMelUnitsConfig
from streamgen.pipeline.streams import LogMelUnitStream
from streamgen.models.kmeans import dedup
from streamgen.train.units import kmeans

CFG = LogMelUnitsConfig(num_units=32, n_mels=24)


def chirp(n=16000, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 16000
    f = 150 + 2000 * t + 300 * torch.sin(2 * torch.pi * 3 * t)
    return 0.5 * torch.sin(2 * torch.pi * torch.cumsum(f, 0) / 16000) + 0.05 * torch.randn(n, generator=g)


@pytest.fixture
def encoder():
    enc = LogMelUnits(CFG)
    feats = torch.cat([enc.features(chirp(seed=s)) for s in range(3)])
    mean, std = feats.mean(0), feats.std(0)
    enc.set_codebook(mean, std, kmeans((feats - mean) / std, CFG.num_units, iters=10))
    return enc


def test_features_are_log_mel_per_hop(encoder):
    wave = chirp(12345)
    feats = encoder.features(wave)
    assert feats.shape == (12345 // CFG.hop, CFG.n_mels)
    # a sinusoid's energy sits in the band around its frequency
    tone = 0.5 * torch.sin(2 * torch.pi * 1000 * torch.arange(6400) / 16000)
    band = encoder.features(tone)[5].argmax()
    centre = (encoder.fb[band] * torch.linspace(0, 8000, encoder.fb.shape[1])).sum() / encoder.fb[band].sum()
    assert abs(float(centre) - 1000) < 250


@pytest.mark.parametrize("chunk", [1, 77, 320, 1000, 20000])
def test_streamed_units_equal_whole(encoder, chunk):
    wave = chirp(16000 + 123, seed=5)
    whole_units, whole_durations = encoder.encode(wave)
    s = LogMelUnitStream(encoder)
    parts = [s.push(wave[i : i + chunk]) for i in range(0, len(wave), chunk)] + [s.flush()]
    units = torch.cat([u for u, _ in parts])
    starts = torch.cat([f for _, f in parts])
    assert torch.equal(units, whole_units)
    assert torch.equal(starts, torch.cumsum(whole_durations, 0) - whole_durations)


def test_units_come_as_soon_as_their_window_is_in(encoder):
    s = LogMelUnitStream(encoder)
    s.push(chirp(CFG.hop * 10 + CFG.pad))
    assert s.n_done == 10  # frame 9 ends at sample 10 * hop and its window reaches pad further


def test_a_unit_depends_only_on_its_window(encoder):
    wave = chirp(16000, seed=2)
    feats = encoder.features(wave)
    changed = wave.clone()
    changed[5000] += 1.0
    moved = torch.nonzero((encoder.features(changed) - feats).abs().amax(-1) > 0)[:, 0]
    lo, hi = (5000 - CFG.pad - CFG.hop) / CFG.hop, (5000 + CFG.pad) / CFG.hop
    assert len(moved) >= 1 and moved.min() >= lo and moved.max() <= hi


def test_codebook_separates_sounds(encoder):
    low = 0.5 * torch.sin(2 * torch.pi * 300 * torch.arange(8000) / 16000)
    high = 0.5 * torch.sin(2 * torch.pi * 3000 * torch.arange(8000) / 16000)
    u_low, u_high = dedup(encoder(low)[3:-3])[0], dedup(encoder(high)[3:-3])[0]
    assert not set(u_low.tolist()) & set(u_high.tolist())


def test_codebook_shape_is_checked(encoder):
    with pytest.raises(ValueError, match="centroids must be"):
        encoder.set_codebook(encoder.mean, encoder.std, torch.zeros(3, 3))
