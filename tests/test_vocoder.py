"""CodeHiFiGAN: chunked synthesis equals whole-utterance synthesis, with bounded work and memory."""

import pytest
import torch

from streamgen.testing import TINY_VOCODER
from streamgen.models.vocoder import CodeHiFiGAN
from streamgen.pipeline.streams import VocoderStream


@pytest.fixture
def vocoder():
    torch.manual_seed(0)
    return CodeHiFiGAN(TINY_VOCODER).eval()


def units(n, seed=0):
    return torch.randint(0, TINY_VOCODER.num_embeddings, (n,), generator=torch.Generator().manual_seed(seed))


def stream(vocoder, u, chunk, **kw):
    s = VocoderStream(vocoder, **kw)
    out = [s.push(u[i : i + chunk]) for i in range(0, len(u), chunk)]
    return torch.cat(out + [s.flush()]), s


@pytest.mark.parametrize("chunk", [1, 3, 16, 200])
def test_chunked_equals_whole(vocoder, chunk):
    u = units(120)
    with torch.no_grad():
        whole = vocoder(u)
    chunked, _ = stream(vocoder, u, chunk)
    assert whole.shape == chunked.shape == (int(vocoder.durations(u).sum()) * vocoder.hop,)
    assert (whole - chunked).abs().max() <= 1e-5


def test_too_little_lookahead_is_not_exact(vocoder):
    u = units(60)
    with torch.no_grad():
        whole = vocoder(u)
    approx, _ = stream(vocoder, u, 4, lookahead=1)
    assert approx.shape == whole.shape and (whole - approx).abs().max() > 1e-4


def test_frame_context_bounds_the_receptive_field(vocoder):
    frames = units(100)
    ctx = vocoder.frame_context()
    changed = frames.clone()
    changed[50] = (changed[50] + 1) % TINY_VOCODER.num_embeddings
    with torch.no_grad():
        d = (vocoder.generate(frames) - vocoder.generate(changed)).abs().view(-1, vocoder.hop).amax(-1)
    moved = torch.nonzero(d > 0)[:, 0]
    assert moved.min() >= 50 - ctx and moved.max() <= 50 + ctx
    assert moved.max() - moved.min() >= 4  # the probe did reach some neighbours


def test_work_and_memory_stay_bounded(vocoder):
    seen = []
    original = vocoder.generate
    vocoder.generate = lambda f: (seen.append(len(f)), original(f))[1]
    u = units(600, seed=2)
    out, s = stream(vocoder, u, 10)
    total = int(vocoder.durations(u).sum())
    ctx = vocoder.frame_context()
    # each window is its new frames plus at most ctx on each side: linear in the input, not quadratic
    assert sum(seen) <= total + len(seen) * 2 * ctx
    assert max(seen) <= 10 * 2 * 60 + 2 * ctx  # no window grows with the utterance (durations <= ~60 frames)
    assert len(s.units) <= 2 * s.unit_radius + 10 and len(s.frames) <= ctx + s.lookahead + 1
    assert out.numel() == total * vocoder.hop
