"""Source-filter vocoder: chunked synthesis equals whole-utterance synthesis; the synthesis equations
give the energy and pitch they promise; the F0 tracker finds a known pitch; a training step learns."""

import math

import numpy as np
import pytest
import torch

from streamgen.models.source_filter_vocoder import SourceFilterConfig, SourceFilterVocoder, harmonic_sums, hash_noise
from streamgen.pipeline.streams import SourceFilterStream
from streamgen.models.vocoder import DurationConfig
from streamgen.train.source_filter import f0_track, stft_loss

TINY = SourceFilterConfig(num_units=50, dim=32, layers=2, harmonics=24, bands=16, dur_predictor_params=DurationConfig(32, 32))


@pytest.fixture
def vocoder():
    torch.manual_seed(0)
    return SourceFilterVocoder(TINY).eval()


def units(n, seed=0):
    return torch.randint(0, TINY.num_units, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunk", [1, 3, 16, 200])
def test_chunked_equals_whole(vocoder, chunk):
    u = units(80)
    with torch.no_grad():
        whole = vocoder(u)
    s = SourceFilterStream(vocoder)
    chunked = torch.cat([s.push(u[i : i + chunk]) for i in range(0, len(u), chunk)] + [s.flush()])
    assert whole.shape == chunked.shape == (int(vocoder.durations(u).sum()) * TINY.hop,)
    assert (whole - chunked).abs().max() <= 1e-5


@pytest.mark.parametrize("length", [5, 6, 23])
def test_conv_as_one_matrix_product_equals_conv1d(length):
    """The parameter network's streaming convs run as one product over the unfolded taps."""
    from streamgen.models.streaming_conv import ConvOp

    torch.manual_seed(1)
    conv = torch.nn.Conv1d(12, 7, 5, padding=2).double()
    x = torch.randn(3, 12, length, dtype=torch.float64)
    op = ConvOp.same(conv, matmul=True)
    assert op.flat is not None
    want = torch.nn.functional.conv1d(x, conv.weight, conv.bias)
    assert torch.allclose(op.conv(x), want, rtol=0, atol=1e-12)
    assert op.conv(x[..., :4]).shape == (3, 7, 0)


def test_stream_gives_audio_before_the_end(vocoder):
    s = SourceFilterStream(vocoder)
    early = sum(len(s.push(u)) for u in units(60, seed=1).split(4))
    assert early > 0


def test_frame_context_bounds_the_parameters(vocoder):
    frames = units(60)
    changed = frames.clone()
    changed[30] = (changed[30] + 1) % TINY.num_units
    with torch.no_grad():
        d = (vocoder.params(frames[None]) - vocoder.params(changed[None]))[0].abs().amax(-1).view(-1, TINY.sub).amax(-1)
    moved = torch.nonzero(d > 0)[:, 0]
    ctx = vocoder.frame_context()
    assert moved.min() >= 30 - ctx and moved.max() <= 30 + ctx and moved.max() - moved.min() >= 2


@pytest.mark.parametrize("grad", [False, True])
def test_harmonic_sums_equal_the_sines_they_replace(grad):
    """The recurrence gives sum_k a_k sin(k phi) as float64 sines do, at 80 harmonics and phases up to
    the 10 ms segment's reach (no phase here is above 2 pi * 400 Hz * 10 ms plus a turn), with or
    without autograd."""
    g = torch.Generator().manual_seed(0)
    phi = torch.rand(2, 3, 160, generator=g, dtype=torch.float64) * 2 * math.pi * 5
    a, b = torch.rand(2, 3, 80, generator=g) * 0.1, torch.rand(2, 3, 80, generator=g) * 0.1
    k = torch.arange(1, 81, dtype=torch.float64)
    sines = torch.sin(phi[..., None] * k)
    with torch.set_grad_enabled(grad):
        got = harmonic_sums(phi.float(), a.requires_grad_(grad), b)
    for x, amp in zip(got, (a, b)):
        want = (sines * amp.detach().double()[:, :, None, :]).sum(-1)
        assert (x.double() - want).abs().max() < 1e-3 * amp.sum(-1).max()
    if grad:
        got[0].sum().backward()
        assert torch.allclose(a.grad.double(), sines.sum(2), atol=1e-2)  # d/da_k sum = sum over samples of sin(k phi)


def test_hash_noise_is_white_and_deterministic():
    z = hash_noise(torch.arange(200_000))
    assert torch.equal(z, hash_noise(torch.arange(200_000)))
    assert abs(float(z.mean())) < 0.01 and abs(float(z.var()) - 1) < 0.02
    assert abs(float((z[1:] * z[:-1]).mean())) < 0.01  # no correlation between neighbours


def flat_params(vocoder, n, periodic: bool):
    """Flat envelope E = 1; all energy periodic (aperiodicity 0, voiced) or all noise."""
    p = torch.zeros(1, n, TINY.n_params)
    p[..., 2 + TINY.bands :] = -30.0 if periodic else 30.0
    return p


@pytest.mark.parametrize("periodic", [False, True])
def test_flat_envelope_has_unit_power(vocoder, periodic):
    # E is relative to unit-variance white noise, so a flat E = 1 gives unit power either way
    # (periodic: harmonics of f0 up to the highest one below Nyquist)
    n, f0 = 400, 250.0
    wave = vocoder.synthesize(flat_params(vocoder, n, periodic), f0=torch.full((1, n), f0), voiced=torch.full((1, n), float(periodic)))[0]
    power = float(wave[2000:-2000].pow(2).mean())
    expected = min(TINY.harmonics, math.ceil(8000 / f0) - 1) * f0 / 8000 if periodic else 1.0
    assert abs(power - expected) / expected < 0.1


def test_periodic_synthesis_has_the_pitch_it_was_given(vocoder):
    n, f0 = 200, 200.0
    wave = vocoder.synthesize(flat_params(vocoder, n, True), f0=torch.full((1, n), f0), voiced=torch.ones(1, n))[0].numpy()
    est, voiced = f0_track(wave)
    assert voiced[5:-5].all() and np.allclose(est[5:-5], f0, rtol=0.02)


def test_f0_track_finds_a_glide_and_silence():
    t = np.arange(16000) / 16000
    f = np.linspace(110, 180, len(t))
    x = sum(np.sin(2 * np.pi * k * np.cumsum(f) / 16000) / k for k in range(1, 6)) * 0.3
    x[8000:] = 0.0
    est, voiced = f0_track(x)
    centres = (np.arange(len(est)) * 160 + 80)
    v = (centres > 400) & (centres < 7600)
    assert voiced[v].all() and not voiced[(centres > 8400) & (centres < 15000)].any()
    assert np.allclose(est[v], f[centres[v]], rtol=0.03)


def test_training_steps_lower_the_spectral_loss():
    torch.manual_seed(0)
    model = SourceFilterVocoder(TINY)
    frames = units(16)[None].repeat(2, 1)
    f0 = torch.full((2, 16 * TINY.sub), 150.0)
    target = model.synthesize(torch.randn(2, 16 * TINY.sub, TINY.n_params), f0=f0, voiced=torch.ones_like(f0)).detach()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = stft_loss(model.synthesize(model.params(frames), f0=f0, voiced=torch.ones_like(f0)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]  # gradients reach the network through the synthesis


def test_bundle_holds_the_new_parts(tmp_path, vocoder):
    from streamgen.bundle import Bundle, load_bundle
    from streamgen.models.logmel_units import LogMelUnits, LogMelUnitsConfig

    enc = LogMelUnits(LogMelUnitsConfig(num_units=TINY.num_units, n_mels=24))
    g = torch.Generator().manual_seed(0)
    enc.set_codebook(torch.full((24,), -3.0), torch.full((24,), 2.0), torch.randn(TINY.num_units, 24, generator=g))
    b = Bundle(logmel_units=enc.eval(), source_filter=vocoder)
    b.save(tmp_path / "b", dtype=torch.float16)
    loaded = load_bundle(tmp_path / "b")
    wave = torch.sin(torch.arange(8000) * 0.05) * 0.3
    units, durations = loaded.encode(wave)
    assert torch.equal(units, b.encode(wave)[0]) and int(durations.sum()) == 8000 // 320
    assert loaded.logmel_units.quantizer.centroids.dtype == torch.float32  # the codebook is never cast
    out = loaded.vocode(units)
    assert out.dtype == torch.float32 and len(out) == int(loaded.source_filter.durations(units).sum()) * TINY.hop


def test_stream_memory_stays_bounded(vocoder):
    # after each push the stream holds only the context windows: the units a duration still needs,
    # the frames whose parameters wait for (or serve as) context, and one parameter frame
    s = SourceFilterStream(vocoder)
    for part in units(600, seed=3).split(5):
        s.push(part)
        assert len(s.units) <= 5 + 2 * s.unit_radius
        assert len(s.frames) <= 2 * s.context
        assert s.pending is None or len(s.pending) == 1


def test_prepare_takes_any_frame_function_and_keeps_frames_inside_the_audio(tmp_path):
    """Vocoder data from any unit type: a frame function that gives one frame more than the audio's whole
    hops (as the phone recogniser does) is cut to them, and every record's frames, F0 and audio agree."""
    import soundfile as sf

    from streamgen.train.source_filter import prepare

    t = np.arange(16000 + 100) / 16000
    sf.write(tmp_path / "a.flac", 0.3 * np.sin(2 * np.pi * 150 * t), 16000, subtype="PCM_16")
    (tmp_path / "m.tsv").write_text("id\taudio\tn_frames\ttext\nu0\ta.flac\t16100\thi\n")
    seen = []

    def frames(wave):
        seen.append(len(wave))
        return torch.arange(len(wave) // 320 + 1) % 7

    data = torch.load(prepare([str(tmp_path / "m.tsv")], frames, tmp_path / "d.pt", hop=320, progress=False))
    (r,) = data
    assert seen == [16100] and len(r["frames"]) == 50 and r["frames"].tolist() == [i % 7 for i in range(50)]
    assert len(r["audio"]) == 50 * 320 and len(r["f0"]) == len(r["voiced"]) == 100
    voiced_f0 = r["f0"][r["voiced"].bool()]
    assert len(voiced_f0) > 80 and (voiced_f0 - 150).abs().max() < 3
