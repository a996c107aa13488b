"""The engine: every session in a batch gets exactly what it gets alone (ragged lengths, mixed
tasks, joining and leaving mid-decode), the one-at-a-time baseline agrees, and sessions of any
length run with bounded state."""

import asyncio
import collections
import contextlib
import time

import pytest
import torch
from speech import espeak

from streamgen.io.memory import MemorySink, MemorySource, chunks_of
from streamgen.models.generation import Decoder, Request, Sampling, decoder_prefix, generate
from streamgen.models.prompt import DeepPrompt, PromptConfig
from streamgen.models.shapes import gpu_shapes, grid
from streamgen.models.unit_mbart import units_to_source
from streamgen.pipeline.items import AudioOut, Control, End, SessionError
from streamgen.pipeline.engine import finish_in_tick
from streamgen.pipeline.runner import Pipeline, build_engine
from streamgen.pipeline.stats import Stats

SESSIONS = {  # name: (task, options, sentence)
    "a": ("translation", {"policy": "wait-k", "k": 3, "chunk_ms": 320}, "The weather is nice today."),
    "b": ("resynthesis", {}, "Please call Stella and ask her to bring these things."),
    "c": ("continuation", {"max_units": 40, "min_units": 20}, "One two three four."),
    "d": ("translation", {"policy": "local-agreement", "chunk_ms": 320}, "Where is the train station, please?"),
    "e": ("inpainting", {"mask_start": 0.4, "mask_end": 0.9}, "I would like a cup of coffee."),
}


def run(bundle, items, **kw):
    engine = build_engine(bundle, "resynthesis", chunk_ms=100, **kw)
    units: dict[str, list[int]] = {}
    engine.on_commit = lambda s, u: units.setdefault(s, []).extend(u.tolist())
    sink = MemorySink()
    asyncio.run(Pipeline(MemorySource(items), engine, sink, Stats(bundle.sample_rate)).run())
    return sink, units, engine


def session_items(name):
    task, options, text = SESSIONS[name]
    return [Control(name, "start", task, options)] + chunks_of(name, espeak(text), 1600)


def interleave(streams, offsets):
    """Round-robin the sessions' items, session i starting after offsets[i] rounds (joins mid-decode)."""
    out, rounds = [], max(len(s) + o for s, o in zip(streams, offsets))
    for r in range(rounds):
        for s, o in zip(streams, offsets):
            if 0 <= r - o < len(s):
                out.append(s[r - o])
    return out


def test_sessions_batched_together_equal_each_alone(test_bundle):
    alone = {n: run(test_bundle, session_items(n)) for n in SESSIONS}
    together, units, engine = run(test_bundle, interleave([session_items(n) for n in SESSIONS], [0, 3, 5, 6, 9]))
    for n in SESSIONS:
        sink, solo_units, _ = alone[n]
        assert n not in together.errors and n not in sink.errors, (together.errors, sink.errors)
        assert units[n] == solo_units[n], n  # identical units (greedy, and sampled: counter-based noise)
        a, b = together.wave(n), sink.wave(n)
        assert len(a) == len(b) > 0 and (a - b).abs().max() <= 1e-5, n
    assert not engine.sessions and all(not d.running for d in engine.decoders.values())  # everyone left; their slots are free
    # every batched call's time charged to the sessions in it (the decoder's steps once a tick, as the sum of their shares)
    for stage in ("encoder", "generator", "vocoder"):
        charged = {st.session: st.compute.get(stage, 0.0) for st in engine.stats.sessions.values()}
        assert sum(charged.values()) == pytest.approx(engine.compute[stage], rel=1e-9), stage
        assert all(charged[n] > 0 for n in ("acde" if stage == "generator" else SESSIONS)), stage
    assert engine.stats.sessions["b"].compute.get("generator", 0.0) == 0  # (resynthesis needs no LM)


def test_an_idle_engine_gives_back_its_pools_and_serves_the_next_sessions_as_a_fresh_one(test_bundle):
    """The decoders' K/V pools and the vocoder's slot tensors keep the size of the most sessions served at once
    (after a burst, hundreds of megabytes): with no session left they go, and the sessions after that get what
    they get on a fresh engine."""
    engine = build_engine(test_bundle, "resynthesis", chunk_ms=100)
    units: dict[str, list[int]] = {}
    engine.on_commit = lambda s, u: units.setdefault(s, []).extend(u.tolist())

    def serve(items) -> MemorySink:
        sink = MemorySink()
        asyncio.run(Pipeline(MemorySource(items), engine, sink, Stats(test_bundle.sample_rate)).run())
        return sink

    serve(interleave([session_items(n) for n in "abd"], [0, 1, 2]))
    slots = engine.new_vocoder_stream.slots
    assert engine.decoders and all(d.pool is None for d in engine.decoders.values()) and slots.size == 0
    units.clear()
    after = serve(session_items("a"))
    fresh, fresh_units, _ = run(test_bundle, session_items("a"))
    assert units["a"] == fresh_units["a"] and len(after.wave("a")) > 0
    assert (after.wave("a") - fresh.wave("a")).abs().max() <= 1e-5
    assert all(d.pool is None for d in engine.decoders.values()) and slots.size == 0


def logmel_source_filter_bundle():
    """A small random bundle of the other kind of parts: log-mel units and the source-filter vocoder."""
    from streamgen.bundle import Bundle
    from streamgen.models.logmel_units import LogMelUnits, LogMelUnitsConfig
    from streamgen.models.source_filter_vocoder import SourceFilterConfig, SourceFilterVocoder
    from streamgen.models.vocoder import DurationConfig

    torch.manual_seed(0)
    enc = LogMelUnits(LogMelUnitsConfig(num_units=50, n_mels=24))
    enc.set_codebook(torch.full((24,), -3.0), torch.full((24,), 2.0), torch.randn(50, 24))
    voc = SourceFilterVocoder(SourceFilterConfig(num_units=50, dim=32, layers=2, harmonics=24, bands=16,
                                                 dur_predictor_params=DurationConfig(32, 32)))
    return Bundle(logmel_units=enc.eval(), source_filter=voc.eval())


@pytest.mark.parametrize("durations", ["source", "predicted"])
def test_logmel_units_and_source_filter_vocoder_batched_equal_whole_utterance(durations):
    b = logmel_source_filter_bundle()
    texts = {"x": "The weather is nice today.", "y": "Where is the train station, please?", "z": "One two three."}
    waves = {n: espeak(t) for n, t in texts.items()}
    items = interleave([[Control(n, "start", "resynthesis", {"durations": durations})] + chunks_of(n, w, 1600)
                        for n, w in waves.items()], [0, 2, 3])
    together, units, engine = run(b, items)
    for n, w in waves.items():
        whole_units, whole_durations = b.encode(w)
        whole = b.vocode(whole_units, whole_durations if durations == "source" else None)
        assert units[n] == whole_units.tolist(), n  # streamed units = whole-utterance units
        out = together.wave(n)
        assert len(out) == len(whole) > 0 and (out - whole).abs().max() <= 1e-5, n
    assert engine.largest_batch["vocoder"] > 1 and engine.largest_batch["encoder"] > 1  # sessions shared calls
    assert engine.new_vocoder_stream().graph is engine.new_vocoder_stream().graph  # one copy of the float64 weights


@pytest.mark.parametrize("kind", ["source-filter", "CodeHiFiGAN"])
def test_timed_frames_after_predicted_units_equal_the_whole(test_bundle, kind):
    """A vocoder stream given units (timed by its predictor), then frames (timed already), then
    frames again: the units are timed as a sequence that ends where the frames begin, and the audio,
    streamed in pieces, is the vocoder over all those frames at once. Units cannot follow frames
    that still wait for them."""
    from streamgen.pipeline.streams import vocoder_streams

    voc = logmel_source_filter_bundle().source_filter if kind == "source-filter" else test_bundle.vocoder
    g = torch.Generator().manual_seed(1)
    units, timed, more = (torch.randint(0, 50, (n,), generator=g) for n in (30, 40, 12))
    stream = vocoder_streams(voc)()
    out = [stream.push(units[:17]), stream.push(units[17:])]
    stream.add_frames(timed)
    with pytest.raises(ValueError, match="cannot follow timed frames"):
        stream.add(units[:1])
    out += [stream.push(torch.zeros(0, dtype=torch.long))]
    stream.add_frames(more)
    out.append(stream.flush())
    with torch.no_grad():
        whole = voc.generate(torch.cat([units.repeat_interleave(voc.durations(units)), timed, more])).reshape(-1)
    got = torch.cat([o.reshape(-1) for o in out])
    assert len(got) == len(whole) and (got - whole).abs().max() <= 1e-5


@pytest.mark.parametrize("windows", [False, True])
def test_shape_buckets_of_the_gpu_path_change_no_result(test_bundle, windows):
    """On CUDA every batched call is rounded up to a few shapes (rows and widths; the streaming vocoder's steps
    and the decoder's admissions too); the rows' lengths make that exact: the whole engine run on the GPU's
    shapes gives what it gives without them."""
    lookahead = test_bundle.vocoder.frame_context() if windows else None
    items = interleave([session_items(n) for n in "bd"], [0, 2])
    plain, units, _ = run(test_bundle, items, vocoder_lookahead=lookahead)
    with gpu_shapes():
        padded, padded_units, _ = run(test_bundle, items, vocoder_lookahead=lookahead)
    assert padded_units == units
    for n in "bd":
        assert len(plain.wave(n)) > 0 and (plain.wave(n) - padded.wave(n)).abs().max() <= 1e-5


def test_one_at_a_time_baseline_gives_the_same_output(test_bundle):
    items = interleave([session_items(n) for n in "abc"], [0, 2, 4])
    batched, u1, _ = run(test_bundle, items)
    single, u2, _ = run(test_bundle, items, max_batch=1)
    assert u1 == u2
    for n in "abc":
        assert (batched.wave(n) - single.wave(n)).abs().max() <= 1e-5


@pytest.mark.parametrize("graphs, mixed, gpu_eager", [(False, True, False), (True, True, False), (True, False, False), (False, True, True)])
def test_decoder_requests_join_and_leave_mid_decode_with_mixed_prompts(test_bundle, graphs, mixed, gpu_eager, monkeypatch):
    """graphs: the static bucketed steps of the GPU path (captured on CUDA, run eagerly here). gpu_eager: a GPU's
    eager step (one masked step of a block of rows, its cache and source widths on the grid) instead of a CPU's."""
    m = test_bundle.mbart
    g = torch.Generator().manual_seed(0)
    prompts = []
    for length in (4, 3):
        p = DeepPrompt(m.cfg, PromptConfig(length))
        for t in p.parameters():
            t.data.normal_(generator=g)
        prompts.append(p.shared_kv(m))
    srcs = [torch.randint(0, 100, (n,), generator=g) for n in (5, 17, 9, 30)]
    which = [prompts[0], None, prompts[1], prompts[0]] if mixed else [prompts[0]] * 4
    sampling = [Sampling(), Sampling(greedy=False, temperature=0.9, top_k=10), Sampling(), Sampling(greedy=False)]
    alone = [generate(m, [s], prompt=p, max_units=25, min_units=10, sampling=sp, seed=i)[0].tolist()
             for i, (s, p, sp) in enumerate(zip(srcs, which, sampling))]
    dec, out = Decoder(m, slots=2, graphs=graphs), {i: [] for i in range(4)}
    if gpu_eager:
        dec.masked_steps = True
        model_step, widths = m.step, []

        def watched(state, tokens, *a, **kw):
            if kw.get("grow") is False:  # a masked step of running rows (not an admission's prefill)
                widths.append((state.capacity, state.source_capacity, dec.pool.capacity, dec.pool.source_capacity))
            return model_step(state, tokens, *a, **kw)

        monkeypatch.setattr(m, "step", watched)
    joins = {0: [0], 3: [1], 5: [2, 3]}  # step -> requests that join then (the pool grows past 2 slots)
    with gpu_shapes() if gpu_eager else contextlib.nullcontext():
        for step in range(200):
            for i in joins.get(step, []):
                dec.submit(i, Request(units_to_source(srcs[i]), decoder_prefix(), 25, 10, sampling[i], which[i], seed=i))
            for key, units, _ in dec.step():
                out[key] += units
            # (the running rows counted by prompt, which tells whether a step may be the static one)
            assert sorted(dec.prompt_rows.values()) == sorted(collections.Counter(id(dec.pool.prompts[s]) for s in dec.running).values())
            if step > 5 and not dec.busy:
                break
    assert [out[i] for i in range(4)] == alone
    if graphs and not mixed:
        assert dec.captured  # the static steps ran
    if gpu_eager:  # the masked steps ran, on the grid's widths (the prefills' are the admissions')
        assert len(widths) > 20 and any(c > 8 for c, _, _, _ in widths) and any(s > 8 for _, s, _, _ in widths)
        assert all(c in (grid(c), cap) and s in (grid(s), src_cap) for c, s, cap, src_cap in widths)
    assert not dec.running and sorted(dec.free) == list(range(dec.pool.batch_size))


def test_a_tick_finishes_a_decode_past_its_budget_only_when_that_is_short_and_nothing_waits():
    budget = 0.030  # 30 ms, 12 steps taken in it (2.5 ms each)
    assert finish_in_tick(0.030, 12, 4, budget, waiting=False)  # 4 more steps end it within a second budget
    assert finish_in_tick(0.030, 12, 12, budget, waiting=False)  # ... 12 as well, just
    assert not finish_in_tick(0.030, 12, 13, budget, waiting=False)  # a longer decode speaks budget by budget
    assert not finish_in_tick(0.030, 12, 60, budget, waiting=False)  # (a continuation)
    assert not finish_in_tick(0.030, 12, 1, budget, waiting=True)  # another session's input waits: vocode and encode it
    assert not finish_in_tick(0.061, 24, 0, budget, waiting=False)  # never past a second budget


def test_a_new_session_is_refused_when_the_engine_is_full(test_bundle):
    items = interleave([session_items("b"), session_items("a")], [0, 1])
    sink, _, _ = run(test_bundle, items, max_sessions=1)
    assert "busy" in sink.errors["a"] and "maximum of 1 live sessions" in sink.errors["a"]
    assert "b" not in sink.errors and len(sink.wave("b")) > 0


def long_talk(minutes: float) -> torch.Tensor:
    """Speech with pauses, repeated for `minutes`."""
    parts = [espeak(t) for t in ("The weather is nice today.", "Where is the train station?", "I would like two tickets.")]
    unit = torch.cat([torch.cat([p, torch.zeros(8000)]) for p in parts])
    n = int(minutes * 60 * 16000)
    return unit.repeat(n // len(unit) + 1)[:n]


@pytest.mark.parametrize("task, options", [
    ("translation", {"policy": "wait-k", "k": 3, "chunk_ms": 960}),  # local agreement shares the segmenter
    ("continuation", {"max_units": 30, "min_units": 30}),
    ("resynthesis", {}),
])
def test_ten_minute_sessions_run_with_bounded_state(test_bundle, task, options):
    """A talker who goes on for ten minutes: no error, output all along (translation), state bounded
    by the model's context, not the session's length."""
    wave = long_talk(10)
    engine = build_engine(test_bundle, task, options, chunk_ms=320)
    peaks: list[tuple[float, int, int, int]] = []  # (input s, source units held, encoder buffer, decoder cache)
    tick = engine.tick

    def probed_tick():  # read in the engine's own thread after every tick, while the session lives
        tick()
        s = engine.sessions.get("talk")
        if s is not None:
            cache = s.decoder.pool.capacity if s.decoder is not None and s.decoder.pool is not None else 0
            peaks.append((s.pos / 16000, len(s.policy.source), len(s.units.buf), cache))

    engine.tick = probed_tick
    sink, stats = MemorySink(), Stats(16000)
    asyncio.run(Pipeline(MemorySource(chunks_of("talk", wave, 5120)), engine, sink, stats).run())
    assert "talk" not in sink.errors, sink.errors
    summary = stats.sessions["talk"].summary()
    assert summary["input_s"] == pytest.approx(600, abs=0.5)
    if task != "continuation":  # spoke all along: output in every minute of the input
        delays = [d for d, _, _ in stats.sessions["talk"].outputs]
        assert {int(d // 60000) for d in delays} >= set(range(10)), sorted({int(d // 60000) for d in delays})
        # latency stays in input time across segments: each chunk's ideal delay is the input read when
        # it was committed, never decreasing, never past the input
        assert delays == sorted(delays) and delays[-1] <= 600_000 + 1
    else:
        assert summary["output_s"] > 0
    # what a session holds is bounded by the model and the stream settings, not by its length:
    # source units (a translation segment / the continuation's window), the encoder's audio buffer
    # (2 s left context + the chunks a tick takes at once, at most 16, + look-ahead), the decoder's K/V cache
    limit = 400 + 32 if task == "translation" else test_bundle.mbart.cfg.max_positions - 1  # a segment (+ a chunk's units)
    assert max(p[1] for p in peaks) <= limit
    assert max(p[2] for p in peaks) <= 16000 * 2 + 16 * 5120 + 16000
    assert max(p[3] for p in peaks) <= 2 * test_bundle.mbart.cfg.max_positions
    assert any(p[0] >= 590 for p in peaks)  # the bounds held to the end of the ten minutes


def test_inpainting_refuses_an_input_it_cannot_hold_as_soon_as_it_is_too_long(test_bundle):
    wave = long_talk(2)
    engine = build_engine(test_bundle, "inpainting", {"mask_start": 1.0, "mask_end": 2.0}, chunk_ms=320)
    sink, stats = MemorySink(), Stats(16000)
    asyncio.run(Pipeline(MemorySource(chunks_of("long", wave, 5120)), engine, sink, stats).run())
    assert "inpainting holds at most" in sink.errors["long"]


def test_silence_is_not_answered_with_invented_speech(test_bundle):
    """No speech in a session: the task is never consulted and the client is told; a session whose
    speech starts late loses nothing of its onset."""
    quiet = [Control("q", "start", "continuation", {"max_units": 30, "min_units": 30})] + chunks_of("q", torch.zeros(16000 * 5), 1600)
    speech = espeak("One two three four.")
    late = torch.cat([torch.zeros(16000 * 3), speech])
    sink, units, _ = run(test_bundle, quiet + chunks_of("late", late, 1600))
    assert "no speech heard" in sink.errors["q"] and "q" not in units and len(sink.wave("q")) == 0
    gated = units["late"]
    _, ungated, _ = run(test_bundle, chunks_of("late", late, 1600), speech_gate=False)
    assert gated == ungated["late"]  # everything, the silence before the speech included, reached the task


def test_a_long_running_service_keeps_bounded_records(test_bundle):
    """Per-session records are pruned when sessions end (a recent window is kept for --stats)."""
    items = []
    for i in range(6):
        items += chunks_of(f"s{i}", espeak("Yes."), 1600)
    stats = Stats(16000, keep_closed=2)
    engine = build_engine(test_bundle, "resynthesis", chunk_ms=100)
    asyncio.run(Pipeline(MemorySource(items), engine, MemorySink(), stats).run())
    assert list(stats.sessions) == ["s4", "s5"]
    assert not engine.sessions and len(engine.closed) == 0 and len(engine.plugins) == 1  # entry points read once


def test_a_live_service_refuses_newcomers_while_it_is_behind(test_bundle):
    """With admission by backlog, a session that has seconds of input waiting makes the engine
    refuse the next one as busy instead of letting both fall behind."""
    talk = chunks_of("first", espeak("The weather is nice today, and we are going to the park."), 16000 * 3, end=False)
    engine = build_engine(test_bundle, "resynthesis", chunk_ms=100, admit_lag_s=0.5, queue_size=64)
    said = []
    engine.emit = said.append  # the worker is not started, so the first talker's input stays waiting

    async def arrive(items):
        for item in items:
            await engine.put(item)

    asyncio.run(arrive(talk + session_items("b")))
    errors = {i.session: i.message for i in said if isinstance(i, SessionError)}
    assert "busy" in errors["b"] and "behind real time" in errors["b"]
    assert "first" not in errors and "first" in engine.sessions and "b" not in engine.sessions


@pytest.mark.parametrize("admit_lag_s", [5.0, 60.0])
def test_a_live_service_refuses_newcomers_while_its_answers_are_late(test_bundle, admit_lag_s):
    """Admission by how late the answers leave: the encoder keeps up (no input waiting), but every output
    chunk answers input captured ten seconds before, so a newcomer is refused as busy where 5 s is the
    bound (and admitted where it is 60 s); a second after the last late answer, the next one is admitted."""
    engine = build_engine(test_bundle, "resynthesis", chunk_ms=100, admit_lag_s=admit_lag_s, queue_size=64)
    talk = chunks_of("first", espeak("The weather is nice today."), 1600, at=time.monotonic() - 10.0, end=False)

    async def scenario():
        out: asyncio.Queue = asyncio.Queue()
        engine.start(asyncio.get_running_loop(), out)
        said = []

        async def until(done):
            while not done():
                try:
                    said.append(await asyncio.wait_for(out.get(), 0.05))
                except asyncio.TimeoutError:
                    pass

        for item in talk:
            await engine.put(item)
        # answered, and no input waiting beyond the part of a chunk that only the next input completes
        def answered_and_caught_up():
            with engine.lock:  # the worker takes from the inbox the backlog counts
                return any(isinstance(i, AudioOut) for i in said) and engine.sessions["first"].backlog < 1600

        await until(answered_and_caught_up)
        await engine.put(Control("late", "start", "resynthesis", {}))
        await until(lambda: any(i.session == "late" for i in said) or "late" in engine.sessions)
        refused = [i.message for i in said if isinstance(i, SessionError) and i.session == "late"]
        await until(lambda: engine.answer_lag(time.monotonic()) == 0.0)  # the late answers are over a second old
        await engine.put(Control("next", "start", "resynthesis", {}))
        admitted = "next" in engine.sessions
        engine.close()
        await until(lambda: said and said[-1] is None)
        return refused, admitted, said

    refused, admitted, said = asyncio.run(scenario())
    if admit_lag_s < 10:
        assert len(refused) == 1 and "busy" in refused[0] and "behind real time" in refused[0], refused
    else:
        assert not refused
    assert admitted and not any(isinstance(i, SessionError) and "busy" in i.message for i in said if i and i.session != "late")


def test_a_reply_said_after_the_input_ended_does_not_make_the_service_busy(test_bundle):
    """A continuation speaks its reply after the input ends, seconds of audio in a fraction of one: every
    chunk of it answers the same last input, so its delay after that input's capture grows with the reply's
    length, not with how far behind the engine is. Only the answers of sessions whose input goes on count:
    here the reply answers input captured 30 s before (over the 20 s bound, which the other session's answers
    stay far below however busy the machine), and a newcomer is admitted."""
    engine = build_engine(test_bundle, "continuation", chunk_ms=100, admit_lag_s=20.0, queue_size=64)
    now = time.monotonic()
    keep = [Control("keep", "start", "resynthesis", {})] + chunks_of("keep", espeak("Hello there."), 1600, at=now, end=False)
    reply = [Control("a", "start", "continuation", {"max_units": 60, "min_units": 40})]
    reply += chunks_of("a", espeak("The weather is nice today."), 1600, at=now, end=False) + [End("a", 0, now - 30.0)]

    async def scenario():
        out: asyncio.Queue = asyncio.Queue()
        engine.start(asyncio.get_running_loop(), out)
        said = []
        for item in keep + reply:
            await engine.put(item)
        while not any(isinstance(i, End) and i.session == "a" for i in said):
            said.append(await out.get())
        await engine.put(Control("next", "start", "resynthesis", {}))
        admitted = "next" in engine.sessions
        engine.close()
        while said[-1] is not None:
            said.append(await out.get())
        return admitted, said

    admitted, said = asyncio.run(scenario())
    assert sum(isinstance(i, AudioOut) and i.session == "a" for i in said) > 1  # it replied
    assert admitted and not any(isinstance(i, SessionError) and "busy" in i.message for i in said if i), said


def test_a_second_start_ends_only_that_session(test_bundle):
    items = interleave([session_items("a"), session_items("b")], [0, 1])
    items.insert(4, Control("a", "start", "translation", {}))
    sink, _, engine = run(test_bundle, items)
    assert "already started" in sink.errors["a"] and "b" not in sink.errors and len(sink.wave("b")) > 0
    assert all(not d.running and not d.waiting for d in engine.decoders.values())


def test_a_task_with_its_own_backbone_runs_on_it_beside_the_shared_one(test_bundle):
    """Translation on its own (fine-tuned) backbone and continuation on the shared one, in one engine:
    one decoder per backbone, and each session gets what it gets alone on a bundle of just its model."""
    import copy

    from streamgen.models.unit_mbart import EOS, UnitMBart

    torch.manual_seed(3)
    own = UnitMBart(test_bundle.mbart.cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for p in own.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
        own.embed_tokens.weight[EOS].zero_()
    mixed = copy.copy(test_bundle)
    mixed.backbones = {"translation": own}
    only_own = copy.copy(test_bundle)
    only_own.mbart = own
    together, units, engine = run(mixed, interleave([session_items("a"), session_items("c")], [0, 2]))
    assert set(engine.decoders) == {"", "translation"} and engine.decoders["translation"].model is own
    for name, bundle in (("a", only_own), ("c", test_bundle)):
        sink, solo, _ = run(bundle, session_items(name))
        assert units[name] == solo[name] and len(units[name]) > 0, name
        a, b = together.wave(name), sink.wave(name)
        assert len(a) == len(b) > 0 and (a - b).abs().max() <= 1e-5, name
    _, shared, _ = run(test_bundle, session_items("a"))
    assert shared["a"] != units["a"]  # the shared backbone says something else: the task's own was used


@pytest.mark.parametrize("name", ["a", "d"])  # wait-k, local agreement
def test_a_decision_waiting_on_a_decode_follows_it_in_the_same_tick(test_bundle, name):
    """When a session's decode ends and its next units are already encoded (or its input has ended),
    its policy decides at once and the next decode runs in the same tick's steps: a tick later, every
    other session's encoder and vocoder work would come first (at the end of a talk, the closing decode
    waited behind the last decision's that way)."""
    from streamgen.pipeline.items import End

    task, options, text = SESSIONS[name]
    engine = build_engine(test_bundle, task, options, chunk_ms=320, decode_budget_ms=1e6)  # all its input in one tick
    out: list = []
    engine.emit = out.append
    s = engine.open(name, task, options)
    wave = espeak(text)
    s.inbox.extend(chunks_of(name, wave, 1600) + [End(name, len(wave), 0.0)])
    s.end_queued = True
    tick, calls, policy = [0], [], s.policy
    for hook in ("on_source", "on_end", "on_decoded"):
        def wrapped(*a, hook=hook, f=getattr(policy, hook)):
            if hook == "on_decoded" and a[1]:  # a decode ended: was the session's next input there already?
                calls.append((tick[0], "done", bool(s.events) or (s.encoder_done and not s.policy_ended)))
            elif hook != "on_decoded":
                calls.append((tick[0], hook, None))
            return f(*a)
        setattr(policy, hook, wrapped)
    while name in engine.sessions and tick[0] < 500:
        engine.tick()
        tick[0] += 1
    assert name not in engine.sessions and any(getattr(o, "samples", None) is not None for o in out)
    follow = [(done, nxt) for done, nxt in zip(calls, calls[1:]) if done[1] == "done" and done[2]]
    assert len(follow) >= 3  # decisions that waited on a decode
    assert all(nxt[0] == done[0] for done, nxt in follow), calls
