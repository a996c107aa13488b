"""Log-mel k-means unit encoder: streamed units equal whole-utterance units; a unit depends only on its
window of samples; k-means fitted on real features gives a codebook that separates different sounds."""

import contextlib

import pytest
import torch

from streamgen.models.logmel_units import LogMelUnits, LogMelUnitsConfig
from streamgen.models.shapes import gpu_shapes
from streamgen.pipeline.streams import LogMelUnitStream, encode_logmel_windows
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


def mean_normalised_encoder(prior_frames=10, cvn=False):
    enc = LogMelUnits(LogMelUnitsConfig(num_units=32, n_mels=24, cmn_prior_frames=prior_frames, cvn=cvn))
    per_utterance = [enc.features(chirp(seed=s)) for s in range(3)]
    raw = torch.cat(per_utterance)
    prior, prior_sq = raw.mean(0), (raw * raw).mean(0) if cvn else None
    enc.prior.copy_(prior)
    if cvn:
        enc.prior_sq.copy_(prior_sq)
    feats = torch.cat([enc.normalise(f, enc.start_norm())[0] for f in per_utterance])
    mean, std = feats.mean(0), feats.std(0)
    enc.set_codebook(mean, std, kmeans((feats - mean) / std, 32, iters=10), prior=prior, prior_sq=prior_sq)
    return enc


@pytest.fixture(params=["plain", "running mean", "running mean and variance"])
def any_encoder(request, encoder):
    if request.param == "plain":
        return encoder
    return mean_normalised_encoder(cvn=request.param == "running mean and variance")


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
def test_streamed_units_equal_whole(any_encoder, chunk):
    encoder = any_encoder
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


def test_running_mean_follows_its_equation():
    """A louder copy of the input shifts every log-mel band by log(gain); less the running mean, what
    is left of that shift is log(gain) * n0 / (n0 + i + 1) at frame i: the prior's share."""
    enc = mean_normalised_encoder(prior_frames=10)
    wave = chirp(16000, seed=1)
    base, _ = enc.normalise(enc.features(wave), enc.start_norm())
    loud, _ = enc.normalise(enc.features(2 * wave), enc.start_norm())
    i = torch.arange(len(base), dtype=torch.float64)[:, None]
    want = (torch.log(torch.tensor(2.0, dtype=torch.float64)) * 10 / (10 + i + 1)).float().expand_as(base)
    torch.testing.assert_close(loud - base, want, atol=2e-4, rtol=0)
    # and frames pushed in two parts carry the state: the same numbers as in one
    feats = enc.features(wave)
    first, state = enc.normalise(feats[:17], enc.start_norm())
    rest, _ = enc.normalise(feats[17:], state)
    assert torch.equal(torch.cat([first, rest]), base)


def test_running_mean_and_variance_follow_their_equations():
    """With `cvn` each band also loses a running standard deviation whose prior is the training
    log-mel's mean square: checked against the equations in float64, and frames pushed in parts (one
    empty) carry the state exactly."""
    enc = mean_normalised_encoder(prior_frames=10, cvn=True)
    feats = enc.features(chirp(16000, seed=1))
    got, _ = enc.normalise(feats, enc.start_norm())
    x = feats.double()
    n = 10 + torch.arange(1, len(x) + 1, dtype=torch.float64)[:, None]
    mean = (10 * enc.prior.double() + torch.cumsum(x, 0)) / n
    second = (10 * enc.prior_sq.double() + torch.cumsum(x * x, 0)) / n
    want = (x - mean) / (second - mean**2).sqrt()
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)
    assert float(want[-20:].std(0).mean()) > 0.3  # the deviation is not a clamp floor
    parts, state = [], enc.start_norm()
    for a, b in [(0, 5), (5, 5), (5, 31), (31, len(feats))]:
        out, state = enc.normalise(feats[a:b], state)
        parts.append(out)
    assert torch.equal(torch.cat(parts), got) and state.count == len(feats)


def test_variance_normalisation_needs_the_running_mean():
    with pytest.raises(ValueError, match="cvn .*needs cmn_prior_frames"):
        LogMelUnitsConfig(cvn=True)


@pytest.mark.parametrize("shapes", [False, True], ids=["exact shapes", "shapes on the GPU's grid"])
def test_sessions_encoded_in_one_call_equal_each_alone(any_encoder, shapes):
    """The engine plans every session's windows (one per chunk that came in, several per session in a
    tick) and encodes them together: the frames of every window in one padded log-mel call (each frame
    reads its own samples: on the GPU's grid too, extra rows and samples), a stream with a running mean having
    its windows' frames normalised in the order they were planned; so batching changes nothing."""
    enc = any_encoder
    with gpu_shapes() if shapes else contextlib.nullcontext():
        check_sessions_encoded_together(enc)


def check_sessions_encoded_together(enc):
    waves = [chirp(12000 + 500 * k, seed=10 + k) for k in range(3)]
    streams = [LogMelUnitStream(enc) for _ in waves]
    got = [[] for _ in waves]
    for start in range(0, 16000, 1600):
        plans = []
        for half in (0, 800):  # two chunks per session before the tick's one encoding call
            for k, (s, w) in enumerate(zip(streams, waves)):
                s.add(w[start + half : start + half + 800])
                plans.append((k, s, s.plan(start + half + 800 >= 16000)))
        plans = [p for p in plans if p[2] is not None]
        for (k, s, w), fu in zip(plans, encode_logmel_windows(enc, [w for _, _, w in plans])):
            got[k].append(s.finish(w, fu)[0])
    for k, w in enumerate(waves):
        assert torch.equal(torch.cat(got[k]), enc.encode(w)[0])


def test_a_batch_that_fails_leaves_the_running_statistics_as_they_were(monkeypatch):
    """The engine retries a failed batch a row at a time: the streams' running statistics must be those from
    before the batch, so that the retried windows give what one batch that worked gives."""
    enc = mean_normalised_encoder()
    waves = [chirp(8000, seed=20 + k) for k in range(2)]

    def planned():
        streams = [LogMelUnitStream(enc) for _ in waves]
        for s, w in zip(streams, waves):
            s.add(w[:5000])
        return streams, [s.plan() for s in streams]

    streams, windows = planned()
    before = [s.norm_state for s in streams]
    quantize = enc.quantize

    def fails(feats):
        raise RuntimeError("the k-means call failed")

    monkeypatch.setattr(enc, "quantize", fails)
    with pytest.raises(RuntimeError, match="k-means"):
        encode_logmel_windows(enc, windows)
    assert all(s.norm_state is b for s, b in zip(streams, before))
    monkeypatch.setattr(enc, "quantize", quantize)
    retried = [encode_logmel_windows(enc, [w])[0] for w in windows]
    _, fresh = planned()
    for a, b in zip(retried, encode_logmel_windows(enc, fresh)):
        assert torch.equal(a, b)


def test_a_bundle_keeps_the_running_mean(tmp_path):
    from streamgen.bundle import Bundle, load_bundle

    enc = mean_normalised_encoder(prior_frames=25)
    Bundle(logmel_units=enc).save(tmp_path / "b", dtype=torch.float16)
    loaded = load_bundle(tmp_path / "b").logmel_units
    assert loaded.cfg.cmn_prior_frames == 25 and torch.equal(loaded.prior, enc.prior)  # codebook parts are never cast
    wave = chirp(9000, seed=4)
    assert torch.equal(loaded(wave), enc(wave))
    enc = mean_normalised_encoder(prior_frames=25, cvn=True)
    Bundle(logmel_units=enc).save(tmp_path / "v", dtype=torch.float16)
    loaded = load_bundle(tmp_path / "v").logmel_units
    assert loaded.cfg.cvn and torch.equal(loaded.prior_sq, enc.prior_sq) and torch.equal(loaded(wave), enc(wave))


def test_fitting_with_a_running_mean_writes_an_encoder_that_uses_it(tmp_path):
    from streamgen.io.files import write_audio
    from streamgen.train.source_filter import fit_logmel_units, load_logmel_units
    from streamgen.train.synth import write_manifests

    rows = []
    for k in range(3):
        write_audio(tmp_path / f"u{k}.wav", chirp(8000 + 1000 * k, seed=20 + k), 16000)
        rows.append({"id": f"u{k}", "audio": f"u{k}.wav", "text": ""})
    (manifest,) = write_manifests(tmp_path, {"m": rows}).values()
    enc = fit_logmel_units([str(manifest)], tmp_path / "enc", num_units=8, iters=5, progress=False, cmn_prior_frames=20)
    loaded = load_logmel_units(tmp_path / "enc")
    raw = [enc.features(chirp(8000 + 1000 * k, seed=20 + k)) for k in range(3)]
    torch.testing.assert_close(loaded.prior, torch.cat(raw).double().mean(0).float(), atol=1e-3, rtol=0)  # read back from 16-bit audio
    wave = chirp(7000, seed=30)
    assert loaded.cfg.cmn_prior_frames == 20 and torch.equal(loaded(wave), enc(wave))
    normalised, _ = enc.normalise(enc.features(wave), enc.start_norm())
    assert torch.equal(enc(wave), enc.quantize(normalised))
    enc = fit_logmel_units([str(manifest)], tmp_path / "cvn", num_units=8, iters=5, progress=False, cmn_prior_frames=20, cvn=True)
    every = torch.cat(raw).double()
    torch.testing.assert_close(enc.prior_sq, (every * every).mean(0).float(), atol=2e-2, rtol=1e-3)
    loaded = load_logmel_units(tmp_path / "cvn")
    assert loaded.cfg.cvn and torch.equal(loaded(wave), enc(wave))


def test_quiet_units_are_what_a_noise_floor_maps_to():
    """Pauses over a noise floor are several units; the encoder names the units whose energy is at or
    below white noise at -50 dBFS, so a policy can hear a pause in them."""
    enc = LogMelUnits(CFG)
    g = torch.Generator().manual_seed(3)
    noise = [torch.randn(16000, generator=g) * 10 ** (db / 20) for db in (-80, -70, -60, -55)]
    feats = torch.cat([enc.features(w) for w in [chirp(seed=s) for s in range(3)] + noise])
    mean, std = feats.mean(0), feats.std(0)
    enc.set_codebook(mean, std, kmeans((feats - mean) / std, CFG.num_units, iters=10))
    quiet = enc.quiet_units()
    hiss = torch.randn(16000, generator=g) * 10 ** (-62 / 20)
    assert quiet[enc(hiss)].all()
    assert not quiet[enc(chirp(seed=9))[2:-2]].any()
    assert mean_normalised_encoder().quiet_units() is None  # its centroids have lost the level
