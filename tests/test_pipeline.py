"""The asyncio pipeline on real (espeak-ng) speech: every task end to end, exactness of lengths,
streaming vs offline units, bad input, back-pressure, session cleanup."""

import asyncio

import numpy as np
import pytest
import soundfile as sf
import torch
from speech import espeak

from streamgen.io.files import FileSink, FileSource
from streamgen.io.memory import MemorySink, MemorySource, chunks_of
from streamgen.pipeline.items import AudioChunk, Control, End
from streamgen.pipeline.runner import Pipeline, build_engine
from streamgen.pipeline.policies import Policy
from streamgen.pipeline.stats import Stats
from streamgen.pipeline.streams import UnitStream

SENTENCE = "The weather is nice today, and we are going to the park."


def run(bundle, source, sink, task="continuation", options=None, **kw):
    """Run the pipeline; also returns the units each session committed to speak, and the engine."""
    engine = build_engine(bundle, task, options, **kw)
    units: dict[str, list[torch.Tensor]] = {}
    engine.on_commit = lambda s, u: units.setdefault(s, []).append(u)
    stats = Stats(bundle.sample_rate)
    asyncio.run(Pipeline(source, engine, sink, stats).run())
    return stats, units, engine


def expected_samples(bundle, units: list[torch.Tensor]) -> int:
    u = torch.cat(units)
    return int(bundle.vocoder.durations(u).sum()) * bundle.vocoder.hop


@pytest.mark.parametrize("task, options", [
    ("continuation", {"max_units": 60, "min_units": 30}),
    ("translation", {"policy": "wait-k", "k": 5, "chunk_ms": 320}),
    ("translation", {"policy": "local-agreement", "chunk_ms": 320}),
    ("inpainting", {"mask_start": 0.8, "mask_end": 1.6, "durations": "predicted"}),  # the talker's timing: below
])
def test_file_to_file_every_task(test_bundle, tmp_path, task, options):
    wav = tmp_path / "in.wav"
    sf.write(wav, espeak(SENTENCE, rate=22050).numpy(), 22050)  # any rate in: resampled to 16 kHz
    sink = FileSink(tmp_path / "out.wav", test_bundle.sample_rate)
    stats, rec, _ = run(test_bundle, FileSource(wav, test_bundle.sample_rate), sink, task, options)
    out, rate = sf.read(tmp_path / "out.wav", dtype="float32")
    assert rate == 16000 and len(out) > 0 and np.isfinite(out).all()
    assert len(out) == expected_samples(test_bundle, rec["file"])  # sum of durations x hop
    summary = stats.sessions["file"].summary()
    assert summary["output_s"] == pytest.approx(len(out) / 16000, abs=1e-3) and "error" not in summary
    if options.get("policy") == "wait-k":  # simultaneous: speaks before the input is over
        assert summary["start_offset_ms"] < summary["input_s"] * 1000 / 2


def test_continuation_output_streams_in_chunks(test_bundle):
    """A decode of one step per tick (a decode budget nothing fits in), so the pieces do not depend on
    how fast the machine is: with the default budget a loaded machine catches up in fewer, larger ticks."""
    sink = MemorySink()
    stats, rec, _ = run(test_bundle, MemorySource(chunks_of("a", espeak(SENTENCE), 320)), sink,
                        options={"max_units": 60, "min_units": 60, "emit_every": 10}, decode_budget_ms=1e-6)
    assert [len(u) for u in rec["a"]] == [10] * 6
    assert len(sink.audio["a"]) >= 3  # audio left the pipeline in pieces, not once at the end


def test_streaming_units_agree_with_offline(test_bundle):
    wave = espeak(SENTENCE)
    hub, km = test_bundle.hubert, test_bundle.quantizer
    with torch.no_grad():
        offline = km(hub(wave[None])[0])

    def streamed(left, la):
        s = UnitStream(hub, km, left, la)
        parts = [s.push(wave[i : i + 1600]) for i in range(0, len(wave), 1600)] + [s.flush()]
        units = torch.cat([u for u, _ in parts])
        starts = torch.cat([f for _, f in parts])
        lengths = torch.diff(torch.cat([starts, torch.tensor([len(offline)])]))
        return torch.repeat_interleave(units, lengths)  # back to one unit per frame

    full = streamed(None, None)
    assert torch.equal(full, offline)  # unbounded context: 100 %
    bounded = streamed(100, 5)  # the default: 2 s left, 100 ms look-ahead
    agreement = (bounded == offline).float().mean().item()
    print(f"streaming vs offline unit agreement, 2 s left context / 100 ms look-ahead: {agreement:.1%}")
    assert len(bounded) == len(offline) and agreement >= 0.6
    short = (streamed(5, 0) == offline).float().mean().item()
    assert short < agreement  # less context, less agreement: the measure is sensitive


@pytest.mark.parametrize("chunk", [320, 1600, 5120, 16000])
def test_resynthesis_in_the_talkers_timing_equals_the_whole_utterance(test_bundle, chunk):
    """durations=source: each unit held for the frames the encoder gave it, streamed chunk by chunk,
    is the vocoder over the whole utterance's frames (unbounded encoder context: the same units)."""
    wave = espeak(SENTENCE)
    sink = MemorySink()
    _, rec, _ = run(test_bundle, MemorySource(chunks_of("a", wave, chunk)), sink, "resynthesis", {},
                    left_context_ms=None, lookahead_ms=None)
    units, durations = test_bundle.encode(wave)
    assert torch.equal(torch.cat(rec["a"]), units)
    whole = test_bundle.vocode(units, durations)
    out = sink.wave("a")
    assert len(out) == int(durations.sum()) * test_bundle.vocoder.hop == len(whole)
    assert (out - whole).abs().max() <= 1e-5
    predicted = MemorySink()
    run(test_bundle, MemorySource(chunks_of("a", wave, chunk)), predicted, "resynthesis", {"durations": "predicted"},
        left_context_ms=None, lookahead_ms=None)
    assert len(predicted.wave("a")) == expected_samples(test_bundle, [units])  # the vocoder's own timing


def test_resynthesis_in_the_talkers_timing_needs_one_frame_rate(test_bundle):
    from dataclasses import replace

    from streamgen.bundle import Bundle
    from streamgen.models.hubert import HubertEncoder
    from streamgen.testing import TINY_HUBERT

    cfg = replace(TINY_HUBERT, conv_layers=TINY_HUBERT.conv_layers[:-1])  # 10 ms frames, a 20 ms vocoder
    b = Bundle(hubert=HubertEncoder(cfg), quantizer=test_bundle.quantizer, mbart=test_bundle.mbart, vocoder=test_bundle.vocoder)
    with pytest.raises(ValueError, match="durations=source needs the unit encoder's frame .160 samples. to equal the vocoder's .320.; use durations=predicted"):
        build_engine(b, "resynthesis")
    build_engine(b, "resynthesis", {"durations": "predicted"})
    gap = {"mask_start": 0.5, "mask_end": 1.0}
    with pytest.raises(ValueError, match="task 'inpainting': durations=source needs"):
        build_engine(b, "inpainting", gap)
    build_engine(b, "inpainting", {**gap, "durations": "predicted"})
    build_engine(b, "inpainting", {**gap, "context": "regenerate"})  # nothing of the input is spoken as it was


def test_sessions_are_isolated_and_cleaned_up(test_bundle):
    good, bad = espeak(SENTENCE), espeak("Hello there.").clone()
    bad_items = chunks_of("bad", bad, 1600)
    bad_items[2].samples = bad_items[2].samples.clone()
    bad_items[2].samples[10] = float("nan")
    items = [x for pair in zip(chunks_of("good", good, 1600), bad_items + [None] * 100) for x in pair if x is not None]
    sink = MemorySink()
    stats, rec, stages = run(test_bundle, MemorySource(items), sink, options={"max_units": 30, "min_units": 30})
    assert "NaN" in sink.errors["bad"] and "bad" not in sink.audio
    assert "good" not in sink.errors and len(sink.wave("good")) > 0 and "good" in sink.ended
    engine = stages  # every session's state is freed after its end
    assert not engine.sessions and all(not d.running and not d.waiting for d in engine.decoders.values())


@pytest.mark.parametrize("make, message", [
    (lambda w: [End("s", 0, 0.0)], "without any audio"),
    (lambda w: [AudioChunk("s", 0, torch.zeros(16000 * 600), 0, 0.0), End("s")], "exceeds the 10 s limit"),
    (lambda w: [AudioChunk("s", 0, torch.zeros(0), 0, 0.0), End("s")], "empty"),
    (lambda w: [AudioChunk("s", 0, torch.zeros(2, 100), 0, 0.0), End("s")], "mono"),
    (lambda w: [Control("s", "start", "no-such-task"), *chunks_of("s", w, 1600)], "unknown task 'no-such-task'"),
    (lambda w: [Control("s", "start", "translation", {"policy": "wait-k", "bogus": 1}), *chunks_of("s", w, 1600)], "no option bogus"),
    (lambda w: [Control("s", "start", "inpainting", {"mask_start": 2.0, "mask_end": 1.0}), *chunks_of("s", w, 1600)], "S < E"),
])
def test_bad_input_gets_a_clear_error_and_others_continue(test_bundle, make, message):
    wave = espeak("One two three.")
    items = make(wave) + chunks_of("other", wave, 1600)
    sink = MemorySink()
    run(test_bundle, MemorySource(items), sink, options={"max_units": 20, "min_units": 20})
    assert message in sink.errors["s"], sink.errors
    assert "other" not in sink.errors and len(sink.wave("other")) > 0


class StuckSink(MemorySink):
    """A consumer that never reads past its first item."""

    def __init__(self):
        super().__init__()
        self.blocked = asyncio.Event()

    async def write(self, item):
        await self.blocked.wait()


@pytest.mark.parametrize("overflow", ["block", "drop-oldest"])
def test_a_sink_that_never_reads_keeps_memory_bounded(test_bundle, overflow):
    """An endless talker, a stuck consumer: every queue stays within its bound."""

    def endless():
        i = 0
        while True:
            yield AudioChunk("talker", i, torch.randn(1600) * 0.1, i * 1600, 0.0)
            i += 1

    async def scenario():
        engine = build_engine(test_bundle, "translation", {"policy": "wait-k", "k": 2, "chunk_ms": 100}, chunk_ms=100,
                              queue_size=4, overflow=overflow)
        p = Pipeline(MemorySource(endless(), interval=0.001), engine, StuckSink(), Stats(16000))
        task = asyncio.create_task(p.run())
        peak = [0, 0]
        for _ in range(60):
            await asyncio.sleep(0.05)
            inbox = max((sum(isinstance(i, AudioChunk) for i in s.inbox) for s in engine.sessions.values()), default=0)
            peak = [max(peak[0], inbox), max(peak[1], engine.out.qsize())]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return peak, p.stats.sessions["talker"].dropped_chunks

    peak, dropped = asyncio.run(scenario())
    assert peak[0] == 4 and peak[1] <= 64  # the session's inbox filled up and stayed bounded, so did the output
    if overflow == "drop-oldest":
        assert dropped > 0
    else:
        assert dropped == 0


def test_realtime_file_input_is_paced(test_bundle, tmp_path):
    wav = tmp_path / "in.wav"
    wave = espeak("Yes.")
    sf.write(wav, wave.numpy(), 16000)

    async def first_and_last():
        times = [item.captured_at async for item in FileSource(wav, 16000, realtime=True)]
        return times[-1] - times[0]

    span = asyncio.run(first_and_last())
    assert span >= 0.8 * len(wave) / 16000  # took about as long as the speech lasts


def test_stats_offsets_follow_simuleval_conventions():
    from streamgen.pipeline.stats import SessionStats

    s = SessionStats("x", 1000, started_at=10.0, input_samples=2000)  # 2 s of input
    for chunk in [(500.0, 10.7, 300), (1000.0, 10.9, 300), (2000.0, 12.5, 1000)]:
        s.add_output(*chunk)  # 0.3 s, 0.3 s, 1 s of output
    out = s.summary()
    # ideal: start 500; playback ends 800, then max(1000, 800)+300=1300, then max(2000,1300)+1000=3000
    assert out["start_offset_ms"] == 500.0 and out["end_offset_ms"] == 1000.0
    # compute-aware delays 700, 900, 2500: ends 1000, 1300, 3500
    assert out["start_offset_ca_ms"] == 700.0 and out["end_offset_ca_ms"] == 1500.0
    assert out["first_audio_ms"] == 700.0


def decide(mbart, policy, decision):
    """Carry out a policy's decision the way the engine does: run its decode, hand the units back.
    Returns the units committed."""
    from streamgen.models.generation import Decoder

    spoken = []
    while decision is not None:
        if decision.commit is not None:
            spoken += decision.commit.tolist()
        if decision.decode is None:
            break
        dec, units = Decoder(mbart), []
        dec.submit(0, decision.decode)
        while dec.busy:
            for _, u, _ in dec.step():
                units += u
        decision = policy.on_decoded(units, True)
    return spoken


def test_local_agreement_commits_what_two_hypotheses_share(test_bundle):
    from streamgen.pipeline.policies import LocalAgreement, UnitDecoder, WaitK

    mbart = test_bundle.mbart
    with torch.no_grad():  # make the decoder ignore the source: every hypothesis is the same
        for layer in mbart.decoder.layers:
            layer.encoder_attn.out_proj.weight.zero_()
            layer.encoder_attn.out_proj.bias.zero_()
    src = torch.randint(0, 100, (40,))
    la = LocalAgreement(UnitDecoder(mbart.cfg), chunk_ms=320)
    first = decide(mbart, la, la.on_source(src[:10], torch.arange(10), 5120))  # 1st decision: nothing to agree with yet
    second = decide(mbart, la, la.on_source(src[10:20], torch.arange(10, 20), 10240))
    assert first == [] and len(second) >= 10
    ref = Policy(UnitDecoder(mbart.cfg))  # one decode of the whole source, committed at once
    ref.source = src
    reference = decide(mbart, ref, ref.decode(100))
    assert second == reference[: len(second)]
    rest = decide(mbart, la, la.on_end())
    assert second + rest == reference[: len(second) + len(rest)]

    wk = WaitK(UnitDecoder(mbart.cfg), k=4, chunk_ms=320)
    got = decide(mbart, wk, wk.on_source(src[:10], torch.arange(10), 5120))
    assert len(got) == 10 - 4  # wait-k: ratio * (source - k) units committed

    # lookahead: each decision decodes at most 4 units past the committed ones (greedy units are the
    # same as the whole hypothesis's first ones), so at most 4 are agreed and committed per decision;
    # the end of input decodes the rest in full
    la = LocalAgreement(UnitDecoder(mbart.cfg), chunk_ms=320, lookahead=4)
    spoken = []
    for i in range(4):
        d = la.on_source(src[10 * i : 10 * i + 10], torch.arange(10 * i, 10 * i + 10), 5120 * (i + 1))
        assert d.decode.max_new == 4
        got = decide(mbart, la, d)
        assert len(got) <= 4
        spoken += got
    rest = decide(mbart, la, la.on_end())
    assert len(spoken) >= 4 and len(rest) > 4 and spoken + rest == reference[: len(spoken) + len(rest)]
    with pytest.raises(ValueError, match="lookahead >= 0"):
        LocalAgreement(UnitDecoder(mbart.cfg), lookahead=-1)


def test_local_agreement_speaks_the_agreed_units_when_the_hypothesis_parts_not_when_it_ends(test_bundle):
    """Units come to the policy one step at a time: the prefix shared with the previous hypothesis is
    spoken at the first unit that differs (or once the previous one is covered); the rest of the
    decode only becomes the hypothesis the next decision compares with. A segment's closing decode
    and wait-k's decodes are spoken `emit_every` units at a time as they come."""
    from streamgen.pipeline.policies import LocalAgreement, UnitDecoder, WaitK

    cfg = test_bundle.mbart.cfg
    la = LocalAgreement(UnitDecoder(cfg), chunk_ms=320)
    la.on_source(torch.arange(10), torch.arange(10), 5120)
    for u in [1, 2, 3, 4, 5]:
        assert la.on_decoded([u], False) is None  # nothing to agree with yet
    assert la.on_decoded([], True) is None and la.previous == [1, 2, 3, 4, 5]
    la.on_source(torch.arange(10, 20), torch.arange(10, 20), 10240)
    assert la.on_decoded([1], False) is None and la.on_decoded([2], False) is None  # agrees so far
    d = la.on_decoded([9], False)  # parts: [1, 2] are final now
    assert d.commit.tolist() == [1, 2] and la.committed.tolist() == [1, 2]
    assert la.on_decoded([8], False) is None and la.on_decoded([7], True) is None
    assert la.previous == [9, 8, 7]
    la.on_source(torch.arange(20, 30), torch.arange(20, 30), 15360)
    assert [la.on_decoded([u], False) for u in (9, 8)] == [None, None]
    d = la.on_decoded([7], False)  # covers the previous hypothesis: all of it agrees
    assert d.commit.tolist() == [9, 8, 7] and la.on_decoded([6], True) is None and la.previous == [6]
    assert la.on_end().decode is not None  # the closing decode: every unit is spoken, 10 at a time
    got = [la.on_decoded([u], u == 111) for u in range(100, 112)]
    assert [d is not None for d in got] == [u in (109, 111) for u in range(100, 112)]
    assert la.committed.tolist() == [1, 2, 9, 8, 7, *range(100, 112)]

    wk = WaitK(UnitDecoder(cfg), k=0, chunk_ms=320)
    wk.on_source(torch.arange(30), torch.arange(30), 5120)
    got = [wk.on_decoded([u], u == 24) for u in range(25)]
    assert [d is not None for d in got] == [i in (9, 19, 24) for i in range(25)]
    assert torch.cat([d.commit for d in got if d is not None]).tolist() == list(range(25))


@pytest.mark.parametrize("knows_quiet", [False, True])
def test_a_segment_closes_at_a_pause_made_of_several_quiet_units(test_bundle, knows_quiet):
    """Silence over a noise floor maps to a few log-mel units in short runs, not one unit held: with
    the encoder's quiet units the segment closes there; without, only one unit held 400 ms would do."""
    from streamgen.pipeline.policies import UnitDecoder, WaitK

    quiet = torch.zeros(test_bundle.mbart.cfg.num_units, dtype=torch.bool)
    quiet[[7, 8, 9]] = True
    speech = torch.arange(20, 50)  # 30 units, 2 frames each
    pause = torch.tensor([7, 8, 9, 8, 7, 9, 8, 7, 9, 7])  # 10 quiet units, 3 frames each: 600 ms
    more = torch.arange(60, 70)
    units = torch.cat([speech, pause, more])
    runs = torch.cat([torch.full((30,), 2), torch.full((10,), 3), torch.full((10,), 2)])
    frames = torch.cumsum(runs, 0) - runs
    wk = WaitK(UnitDecoder(test_bundle.mbart.cfg, quiet=quiet if knows_quiet else None), k=4, chunk_ms=320)
    wk.on_source(units, frames, 16000 * 2)
    if knows_quiet:  # cut after the unit where the quiet stretch reached 400 ms (the 7th: 21 frames)
        assert wk.closing and len(wk.source) == 37 and torch.equal(wk.carry[0], units[37:])
    else:
        assert not wk.closing and len(wk.source) == 50


@pytest.mark.parametrize("held", [10, 2])
def test_wait_k_on_a_streaming_backbone_translates_the_next_sentence_when_the_model_ends_one(test_bundle, held):
    """A streaming backbone reads the source without </s>: a decode that ends at </s> before its schedule's
    end says the sentence is over while the talker goes on (here the pauses between sentences, 200-240 ms,
    are too short to close a segment). The segment closes at the first pause of 200 ms from 2k units
    before the </s>'s schedule position on, and the next sentence is decoded from the units after it at
    once, as a fresh stream; with no such pause yet (held=2: the model may have ended early, inside its
    sentence) nothing is said until one comes. Before, the rest of the segment was never said."""
    from dataclasses import replace

    from streamgen.models.unit_mbart import UNIT_OFFSET
    from streamgen.pipeline.policies import UnitDecoder, WaitK

    cfg = replace(test_bundle.mbart.cfg, wait_k=4, wait_ratio=1.0)
    # sentence, pause (unit 5 held `held` frames), sentence, pause (unit 6 held 12 frames), sentence
    units = torch.cat([torch.arange(20, 40), torch.tensor([5]), torch.arange(50, 65), torch.tensor([6]), torch.arange(70, 80)])
    runs = torch.tensor([2] * 20 + [held] + [2] * 15 + [12] + [2] * 10)
    frames = torch.cumsum(runs, 0) - runs
    wk = WaitK(UnitDecoder(cfg), k=4, chunk_ms=320)
    d = wk.on_source(units[:30], frames[:30], 16000)
    assert not wk.closing and d.decode is not None and d.decode.max_new == 26 and not d.decode.complete
    spoken = [wk.on_decoded([u], False) for u in range(12)]  # 12 units, then </s>
    d = wk.on_decoded([], True)
    assert torch.cat([x.commit for x in [*spoken, d] if x is not None and x.commit is not None]).tolist() == list(range(12))
    # the model chose </s> at decoder position 12, having read 4 + 12 + 1 = 17 units: pauses count from unit 8
    if held == 2:
        assert d.decode is None and wk.segments == 1 and wk.ended == 8  # no pause yet: wait for one
        assert wk.on_source(units[30:34], frames[30:34], 20000) is None
        d = wk.on_source(units[34:46], frames[34:46], 24000)  # the 240 ms pause (unit 36) has come
        cut, end = 37, 46
    else:
        cut, end = 21, 30
    assert wk.segments == 2 and not wk.closing and len(wk.committed) == 0 and wk.ended is None
    assert torch.equal(wk.source, units[cut:end]) and torch.equal(wk.frames, frames[cut:end])
    assert d.decode is not None and torch.equal(d.decode.source, units[cut:end] + UNIT_OFFSET)
    assert d.decode.prefix.tolist() == [2] and d.decode.max_new == end - cut - 4  # a fresh stream from </s>
    # a decode that ends at its budget is not the end of a sentence
    wk.on_decoded(list(range(d.decode.max_new - 1)), False)
    assert wk.on_decoded([99], True).decode is None and wk.segments == 2 and wk.ended is None


def test_inpainting_keeps_the_context_and_fills_only_the_gap(test_bundle):
    """context=keep: the units before the span are spoken as soon as they are final (in the talker's
    timing) and forced as the decoder's prefix; the decoder fills as many units as the span held; the
    units after it follow. context=regenerate: one decode of the whole utterance from the masked source."""
    from streamgen.models.generation import Decoder
    from streamgen.models.unit_mbart import UNIT_OFFSET
    from streamgen.pipeline.policies import Inpainting, UnitDecoder

    mbart = test_bundle.mbart
    units = torch.randint(0, 100, (40,), generator=torch.Generator().manual_seed(3))
    units[1:] += (units[1:] == units[:-1]).long()  # de-duplicated: no unit repeats its neighbour
    units %= 100
    frames = torch.arange(40) * 5  # 100 ms per unit: the span 1.0-2.0 s holds units 10-19
    inp = Inpainting(UnitDecoder(mbart.cfg), mask_start=1.0, mask_end=2.0)
    early = inp.on_source(units[:12], frames[:12], 0)
    assert early.decode is None and early.commit.tolist() == units[:10].tolist()  # final context, said at once
    assert torch.equal(early.frames, units[:10].repeat_interleave(5))  # ... as long as it was said
    assert inp.on_source(units[12:], frames[12:], 0) is None
    inp.source_frames = 200  # what the engine sets before on_end: the encoder's frames
    end = inp.on_end()
    assert end.commit is None and end.decode.max_new == end.decode.min_new == 10
    assert end.decode.prefix[1:].tolist() == (units[:10] + UNIT_OFFSET).tolist()  # the context, forced
    assert (end.decode.source == mbart.cfg.mask_token).sum() == 1
    dec, gap = Decoder(mbart), []
    dec.submit(0, end.decode)
    while dec.busy:
        gap += [u for _, us, _ in dec.step() for u in us]
    final = inp.on_decoded(gap, True)
    assert len(gap) == 10 and final.commit.tolist() == gap + units[20:].tolist()
    assert final.timed_from == 10 and torch.equal(final.frames, units[20:].repeat_interleave(5))  # the gap: predicted

    predicted = Inpainting(UnitDecoder(mbart.cfg), mask_start=1.0, mask_end=2.0, durations="predicted")
    assert predicted.on_source(units[:12], frames[:12], 0).frames is None  # the vocoder times the context
    whole = Inpainting(UnitDecoder(mbart.cfg), mask_start=1.0, mask_end=2.0, context="regenerate")
    assert whole.on_source(units, frames, 0) is None
    again = whole.on_end()
    assert again.commit is None and again.decode.prefix.tolist() == end.decode.prefix[:1].tolist()
    assert torch.equal(again.decode.source, end.decode.source)  # the same masked input either way


def test_inpainting_in_the_talkers_timing_equals_the_whole_utterance(test_bundle):
    """Through the engine: the context's frames as the encoder gave them, the gap timed by the
    vocoder's predictor as a sequence of its own, streamed = the vocoder over those frames at once."""
    wave = espeak(SENTENCE)
    sink = MemorySink()
    _, rec, _ = run(test_bundle, MemorySource(chunks_of("a", wave, 1600)), sink, "inpainting",
                    {"mask_start": 0.8, "mask_end": 1.6}, left_context_ms=None, lookahead_ms=None)
    units, durations = test_bundle.encode(wave)
    starts = torch.cumsum(durations, 0) - durations
    left, right = int((starts + durations <= 40).sum()), int((starts >= 80).sum())
    spoken = torch.cat(rec["a"])
    gap = spoken[left : len(spoken) - right]
    assert torch.equal(spoken[:left], units[:left]) and torch.equal(spoken[len(spoken) - right :], units[len(units) - right :])
    voc = test_bundle.vocoder
    frames = torch.cat([units[:left].repeat_interleave(durations[:left]), gap.repeat_interleave(voc.durations(gap)),
                        units[len(units) - right :].repeat_interleave(durations[len(units) - right :])])
    with torch.no_grad():
        whole = voc.generate(frames)
    out = sink.wave("a")
    assert len(gap) > 0 and len(out) == len(whole) and (out - whole).abs().max() <= 1e-5


def test_joining_decisions_keeps_each_units_timing():
    from streamgen.pipeline.policies import Decision, Request, run_frames, then

    t = lambda *xs: torch.tensor(xs, dtype=torch.long)
    assert torch.equal(run_frames(t(7, 8), t(2, 5), 6), t(7, 7, 7, 8))  # 7 from frame 2 to 5, 8 from 5 to 6
    with pytest.raises(ValueError, match="out of order"):
        run_frames(t(7, 8), t(5, 2), 6)
    with pytest.raises(ValueError, match="end after frame 4"):  # the last run would end before it starts
        run_frames(t(7, 8), t(2, 5), 4)
    assert run_frames(t(), t(), 3).shape == (0,)
    from streamgen.models.vocoder import check_units

    with pytest.raises(ValueError, match=r"units must lie in 0\.\.99, got -1\.\.120"):
        check_units(t(5, -1, 120), 100)
    check_units(t(0, 99), 100)
    timed = Decision(commit=t(1, 2), frames=t(1, 1, 2))
    untimed = Decision(commit=t(3))
    d = then(untimed, timed)  # untimed units, then timed ones: the frames start at the timed ones
    assert torch.equal(d.commit, t(3, 1, 2)) and torch.equal(d.frames, t(1, 1, 2)) and d.timed_from == 1
    d = then(timed, Decision(commit=t(4), frames=t(4, 4)))
    assert torch.equal(d.commit, t(1, 2, 4)) and torch.equal(d.frames, t(1, 1, 2, 4, 4)) and d.timed_from == 0
    request = Request(source=t(5, 2), prefix=t(2), max_new=3)
    d = then(timed, Decision(decode=request))  # a decode after timed units: they stay timed, it runs after
    assert d.decode is request and torch.equal(d.frames, t(1, 1, 2)) and torch.equal(d.commit, t(1, 2))
    with pytest.raises(ValueError, match="decode would run before"):
        then(Decision(decode=request), untimed)
    with pytest.raises(ValueError, match="untimed units cannot follow timed ones"):
        then(timed, untimed)
    assert then(None, untimed) is untimed and then(timed, None) is timed


def test_raw_pcm_from_a_pipe_that_gives_short_reads_is_read_to_its_end():
    """A pipe may hand over fewer bytes than asked (here first one byte, half a sample): only an empty
    read is the end of the input (a short one ended it after 320 of 16000 samples)."""
    import os
    import threading
    import time

    from streamgen.io.files import StdinSource

    pcm = (np.sin(np.arange(16000) * 0.05) * 8000).astype("<i2").tobytes()
    r, w = os.pipe()

    def writer():
        os.write(w, pcm[:1])
        time.sleep(0.2)
        os.write(w, pcm[1:])
        os.close(w)

    threading.Thread(target=writer, daemon=True).start()

    async def read():
        got = []
        async for item in StdinSource(16000, stream=os.fdopen(r, "rb")):
            got.append(item)
        return got

    items = asyncio.run(read())
    assert sum(i.samples.numel() for i in items if isinstance(i, AudioChunk)) == 16000 and isinstance(items[-1], End)
