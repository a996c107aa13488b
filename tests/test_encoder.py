"""HuBERT frame geometry, k-means assignment, de-duplication, and input validation."""

import numpy as np
import pytest
import torch

from streamgen.testing import TINY_HUBERT, random_bundle
from streamgen.audio import check_wave
from streamgen.models.hubert import HubertConfig, HubertEncoder
from streamgen.models.kmeans import KMeansQuantizer, dedup


def test_frame_geometry_of_the_base_extractor():
    c = HubertConfig()
    assert (c.hop, c.receptive_field) == (320, 400)
    assert [c.num_frames(n) for n in (399, 400, 720, 16000)] == [0, 1, 2, 49]
    m = HubertEncoder(TINY_HUBERT).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 16000)).shape == (2, 49, TINY_HUBERT.dim)


def test_output_layer_is_the_nth_layer_output():
    m = HubertEncoder(TINY_HUBERT).eval()
    wave = torch.randn(1, 4000)
    with torch.no_grad():
        one, two = m(wave, layer=1), m(wave, layer=2)
        assert torch.allclose(m.layers[1](one), two, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        m(wave, layer=3)


def test_kmeans_is_nearest_centroid_in_fp32():
    c = torch.randn(50, 16)
    q = KMeansQuantizer(c)
    x = torch.randn(4, 30, 16)
    assert torch.equal(q(x), torch.cdist(x.reshape(-1, 16), c).argmin(-1).view(4, 30))
    assert torch.equal(q(x.bfloat16()), torch.cdist(x.bfloat16().float().reshape(-1, 16), c).argmin(-1).view(4, 30))
    with pytest.raises(ValueError, match="size"):
        q(torch.randn(3, 8))
    with pytest.raises(ValueError, match="NaN"):
        KMeansQuantizer(torch.tensor([[float("nan")]]))


def test_dedup_returns_runs_and_durations():
    u, d = dedup(torch.tensor([5, 5, 7, 7, 7, 5, 9]))
    assert u.tolist() == [5, 7, 5, 9] and d.tolist() == [2, 3, 1, 1]
    assert torch.equal(torch.repeat_interleave(u, d), torch.tensor([5, 5, 7, 7, 7, 5, 9]))


@pytest.mark.parametrize(
    "wave, message",
    [
        (torch.zeros(0), "empty"),
        (torch.tensor([0.0, float("nan")] * 400), "NaN or inf"),
        (torch.tensor([0.0, float("inf")] * 400), "NaN or inf"),
        (torch.zeros(2, 800), "mono"),
        (torch.zeros(800, dtype=torch.int16), "float"),
        (torch.zeros(100), "shorter than"),
        ([0.0] * 800, "tensor or numpy"),
    ],
)
def test_bad_audio_is_named(wave, message):
    with pytest.raises((ValueError, TypeError), match=message):
        check_wave(wave, 16000, min_samples=400)


def test_encode_validates_and_limits_length():
    b = random_bundle()
    units, dur = b.encode(np.random.default_rng(0).normal(scale=0.1, size=16000).astype(np.float32))
    assert int(dur.sum()) == 49 and len(units) == len(dur)
    with pytest.raises(ValueError, match="NaN"):
        b.encode(torch.full((16000,), float("nan")))
    with pytest.raises(ValueError, match="one-pass"):
        b.encode(torch.zeros(16000 * 61))


@pytest.mark.parametrize("normalize_wave", [False, True])
def test_padded_batch_equals_each_row_alone(normalize_wave):
    """GroupNorm statistics, the positional conv and attention see only each row's valid part."""
    import dataclasses

    torch.manual_seed(0)
    enc = HubertEncoder(dataclasses.replace(TINY_HUBERT, normalize_wave=normalize_wave)).eval()
    waves = [torch.randn(n) * 0.3 for n in (16000, 9137, 4001)]
    lengths = torch.tensor([len(w) for w in waves])
    batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    batch[1, 9137:] = float("nan")  # whatever the padding holds
    with torch.no_grad():
        out = enc(batch, lengths=lengths)
        frames = enc.cfg.num_frames(lengths).tolist()
        for w, f, row in zip(waves, frames, out):
            alone = enc(w[None])[0]
            assert alone.shape[0] == f
            torch.testing.assert_close(row[:f], alone, atol=1e-5, rtol=1e-5)
