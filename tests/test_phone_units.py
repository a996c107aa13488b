"""The bundle's units read through the phone recogniser (`models.phone_units`): reading is defined on
windows, and the stream, the engine's batches and the bundle all give exactly that reading; a bundle
keeps the part in fp16 and runs it in fp32; tasks listed as k-means tasks keep the k-means reading."""

import pytest
import torch
from speech import espeak

from streamgen.bundle import Bundle, BundleError, load_bundle
from streamgen.models.kmeans import dedup
from streamgen.models.phone_net import PhoneNetConfig
from streamgen.models.phone_recogniser import PhoneRecogniserConfig
from streamgen.models.phone_units import PhoneUnits, PhoneUnitsConfig, windows
from streamgen.pipeline.items import Control
from streamgen.pipeline.streams import LogMelUnitStream, PhoneUnitStream, encode_phone_windows
from streamgen.io.memory import chunks_of

from test_engine import interleave, logmel_source_filter_bundle, run

VOCAB, UNITS, MELS = 12, 50, 24  # logmel_source_filter_bundle's units and bands


def tiny_reader(kmeans_tasks=(), seed=0) -> PhoneUnits:
    torch.manual_seed(seed)
    cfg = PhoneUnitsConfig(recogniser=PhoneRecogniserConfig(dim=32, layers=2, heads=2, kernel=7, vocab=VOCAB),
                           classifier=PhoneNetConfig(n_mels=VOCAB - 1 + 2 * MELS, dim=32, kernel=5, dilations=[1, 1], num_phones=UNITS),
                           left=20, lookahead=4, stride=8, kmeans_tasks=list(kmeans_tasks))
    reader = PhoneUnits(cfg)
    with torch.no_grad():  # a random recogniser with a front-end: a positive filterbank after its DFT
        reader.recogniser.mel_fb.uniform_(0, 0.1)
    return reader.eval()


def bundle_with_reader(kmeans_tasks=()) -> Bundle:
    b = logmel_source_filter_bundle()
    b.phone_units = tiny_reader(kmeans_tasks)
    return b


@pytest.mark.parametrize("n", [0, 1, 7, 12, 13, 50, 101])
def test_windows_read_every_frame_once_in_order_within_their_context(n):
    spans = windows(n, left=20, lookahead=4, stride=8)
    assert [f for _, a, k, _ in spans for f in range(a, a + k)] == list(range(n))
    for w0, a, k, w1 in spans:
        assert w0 == max(0, a - 20) and a + k <= w1 <= n and (w1 == a + k + 4 or w1 == n) and k <= 8 + 4


def test_reading_an_utterance_equals_each_window_read_alone():
    b = logmel_source_filter_bundle()
    reader = tiny_reader()
    wave = espeak("Where is the train station, please?")
    got = reader.read(wave, b.logmel_units)
    c = reader.cfg
    spans = windows(len(wave) // c.hop, c.left, c.lookahead, c.stride)
    alone = [reader.frame_units([wave[w0 * c.hop : w1 * c.hop]], b.logmel_units)[0][a - w0 : a - w0 + k] for w0, a, k, w1 in spans]
    assert torch.equal(got, torch.cat(alone)) and len(got) == len(wave) // c.hop
    assert len(set(got.tolist())) > 5  # the test speech gives varied units, not one held


def test_the_recogniser_batches_equal_length_rows_as_each_alone():
    """Equal to float rounding: the front-end rounds its log-mel to float16 (hama's exported graph does),
    so a batch's different summation order moves a value by one float16 step at times."""
    reader = tiny_reader()
    waves = torch.stack([espeak("One two three.")[:9600], espeak("Four five six.")[:9600]])
    together = reader.recogniser(waves)
    for row, w in zip(together, waves):
        torch.testing.assert_close(row, reader.recogniser(w), atol=1e-3, rtol=0)


@pytest.mark.parametrize("chunk", [333, 1600, 5120, 16000])
def test_the_stream_equals_reading_the_whole_utterance_at_any_chunking(chunk):
    b = logmel_source_filter_bundle()
    reader = tiny_reader()
    wave = espeak("Please call Stella and ask her to bring these things.")
    stream = PhoneUnitStream(reader, b.logmel_units)
    parts = [stream.push(wave[i : i + chunk]) for i in range(0, len(wave), chunk)] + [stream.flush()]
    units = torch.cat([u for u, _ in parts])
    want, durations = dedup(reader.read(wave, b.logmel_units))
    assert torch.equal(units, want)
    starts = torch.cat([i for _, i in parts])
    assert torch.equal(starts, torch.cumsum(durations, 0) - durations)  # each unit's first frame
    assert len(stream.buf) <= (reader.cfg.left + reader.cfg.stride + reader.cfg.lookahead) * reader.cfg.hop + chunk  # bounded


def test_windows_of_several_streams_in_one_call_equal_each_alone():
    b = logmel_source_filter_bundle()
    reader = tiny_reader()
    waves = [espeak(t) for t in ("The weather is nice today.", "One two three.", "I would like a cup of coffee.")]
    streams = [PhoneUnitStream(reader, b.logmel_units) for _ in waves]
    got = [[] for _ in waves]
    for start in range(0, max(len(w) for w in waves), 1600):
        plans = []  # every stream's windows of this round (several per stream at times), then one call
        for k, (s, w) in enumerate(zip(streams, waves)):
            if start < len(w):
                s.add(w[start : start + 1600])
                while (window := s.plan(final=start + 1600 >= len(w))) is not None:
                    plans.append((k, s, window))
        for (k, s, window), fu in zip(plans, encode_phone_windows(reader, b.logmel_units, [p[2] for p in plans])):
            got[k].append(s.finish(window, fu)[0])
    for k, w in enumerate(waves):
        assert torch.equal(torch.cat(got[k]), dedup(reader.read(w, b.logmel_units))[0]), k


def test_engine_sessions_read_through_the_recogniser_and_equal_the_whole_utterance():
    b = bundle_with_reader()
    texts = {"x": "The weather is nice today.", "y": "Where is the train station, please?", "z": "One two three."}
    waves = {n: espeak(t) for n, t in texts.items()}
    items = interleave([[Control(n, "start", "resynthesis", {})] + chunks_of(n, w, 1600) for n, w in waves.items()], [0, 2, 3])
    together, units, engine = run(b, items)
    for n, w in waves.items():
        whole_units, whole_durations = b.encode(w, "resynthesis")
        assert units[n] == whole_units.tolist(), n  # streamed = whole-utterance reading
        whole = b.vocode(whole_units, whole_durations)
        out = together.wave(n)
        assert len(out) == len(whole) > 0 and (out - whole).abs().max() <= 1e-5, n
        assert whole_units.tolist() != b.logmel_units.encode(w)[0].tolist()  # the recogniser's reading, not the k-means'
    assert engine.largest_batch["encoder"] > 1  # sessions in step shared a call


def test_a_kmeans_task_keeps_the_kmeans_reading():
    b = bundle_with_reader(kmeans_tasks=["resynthesis"])
    assert not b.reads_phone_units("resynthesis") and b.reads_phone_units("continuation")
    wave = espeak("One two three.")
    _, units, engine = run(b, [Control("k", "start", "resynthesis", {})] + chunks_of("k", wave, 1600))
    assert units["k"] == b.logmel_units.encode(wave)[0].tolist() == b.encode(wave, "resynthesis")[0].tolist()
    assert isinstance(engine.open("probe", "resynthesis").units, LogMelUnitStream)


def test_a_bundle_stores_the_reader_in_fp16_and_runs_it_in_fp32(tmp_path):
    from safetensors import safe_open

    b = bundle_with_reader(kmeans_tasks=["translation"])
    b.save(tmp_path / "b", dtype=torch.float16)
    with safe_open(str(tmp_path / "b" / "phone_units.safetensors"), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}
    loaded = load_bundle(tmp_path / "b", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.phone_units.parameters()} == {torch.float32}
    assert loaded.phone_units.cfg == b.phone_units.cfg and loaded.phone_units.cfg.kmeans_tasks == ["translation"]
    wave = espeak("One two three.")
    b.phone_units.half().float()  # the weights as stored
    assert torch.equal(loaded.encode(wave)[0], b.encode(wave)[0])


def test_a_reader_without_log_mel_units_is_refused(tmp_path):
    b = bundle_with_reader()
    b.save(tmp_path / "b")
    meta = (tmp_path / "b" / "bundle.json").read_text()
    import json

    m = json.loads(meta)
    del m["parts"]["logmel_units"]
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="phone_units reads the units of a logmel_units part"):
        load_bundle(tmp_path / "b")


def test_the_gate_keeps_the_kmeans_reading_where_a_window_fits_the_training_voice():
    b = logmel_source_filter_bundle()
    reader, lm = tiny_reader(), b.logmel_units
    wave = torch.cat([espeak("Please call Stella and ask her to bring these things."), 0.3 * torch.randn(16000, generator=torch.Generator().manual_seed(1))])
    c = reader.cfg
    spans = windows(len(wave) // c.hop, c.left, c.lookahead, c.stride)
    fits = torch.cat([reader.fit(lm.standardise(lm.features(wave[w0 * c.hop : w1 * c.hop])[None]), lm) for w0, _, _, w1 in spans])
    classified = reader.read(wave, lm)
    reader.cfg.gate = fits.median().item()
    got = reader.read(wave, lm)
    kmeans = lm(wave)  # whole-utterance k-means units: a window's kept frames have the same log-mel
    for (w0, a, k, w1), fit in zip(spans, fits):
        want = kmeans if fit <= reader.cfg.gate else classified
        assert torch.equal(got[a : a + k], want[a : a + k]), (a, fit)
    assert 0 < int((fits <= reader.cfg.gate).sum()) < len(spans)  # both readings were used


def test_packing_a_reader_sets_the_gate_between_the_training_voice_and_the_others(tmp_path):
    from streamgen.io.files import write_audio
    from streamgen.train.phone_units import pack
    from streamgen.train.synth import write_manifests

    from streamgen.train.units import kmeans

    b = logmel_source_filter_bundle()
    own_speech = [espeak(t) for t in ("One two three.", "Four five six.")]
    feats = torch.cat([b.logmel_units.features(w) for w in own_speech])  # a codebook fitted on the training voice, as shipped
    mean, std = feats.mean(0), feats.std(0)
    b.logmel_units.set_codebook(mean, std, kmeans((feats - mean) / std, UNITS, iters=10))
    b.save(tmp_path / "b")
    reader = tiny_reader()
    torch.save(reader.recogniser.state_dict(), tmp_path / "rec.pt")
    torch.save({"config": reader.cfg.classifier.to_dict(), "model": reader.classifier.state_dict()}, tmp_path / "clf.pt")
    rows = {"own": [], "other": []}
    for k, text in enumerate(["One two three.", "Four five six."]):
        for name, wave in (("own", own_speech[k]), ("other", espeak(text, voice="en-us+f4") * 4)):  # another voice, louder
            write_audio(tmp_path / f"{name}{k}.wav", wave, 16000)
            rows[name].append({"id": f"{name}{k}", "audio": f"{name}{k}.wav", "text": text})
    manifests = write_manifests(tmp_path, rows)
    pack(tmp_path / "b", tmp_path / "rec.pt", tmp_path / "clf.pt", ["translation"], left=20, lookahead=4, stride=8,
         own=[str(manifests["own"])], others=[str(manifests["other"])])
    loaded = load_bundle(tmp_path / "b").phone_units
    from streamgen.train.phone_units import window_fits

    own_fit = window_fits(loaded, b.logmel_units, [str(manifests["own"])], every=1)
    other_fit = window_fits(loaded, b.logmel_units, [str(manifests["other"])], every=1)
    assert own_fit.max() < loaded.cfg.gate < other_fit.min() and loaded.cfg.kmeans_tasks == ["translation"]
    with pytest.raises(ValueError, match="overlap: no gate"):
        pack(tmp_path / "b", tmp_path / "rec.pt", tmp_path / "clf.pt", [], own=[str(manifests["own"])], others=[str(manifests["own"])])
