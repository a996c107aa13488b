"""The engine when something goes wrong: a model call that fails (out of memory, say), a task's policy
with a bug, a sink that falls behind while a session fails, a task switch the input cannot follow.
Each ends the sessions it concerns, with their error, and the engine serves on; nothing hangs and no
record of an ended session stays behind."""

import asyncio
import functools
import threading

import torch
from speech import espeak

import streamgen
from streamgen.io.memory import MemorySink, MemorySource, chunks_of
from streamgen.models.unit_mbart import UnitMBart
from streamgen.pipeline.items import AudioChunk, Control, End, SessionError
from streamgen.pipeline.runner import Pipeline, build_engine
from streamgen.pipeline.stats import Stats

WAIT_S = 120  # a guard against a hang, far beyond what any of these runs takes


def finish(engine, items, sink=None, interval: float = 0.0, stats: Stats | None = None) -> MemorySink:
    """Run a pipeline over `items` in a thread of its own; a run that does not end within WAIT_S (a
    deadlock blocks the event loop itself, so asyncio cannot time it out) fails the test."""
    sink = sink or MemorySink()
    error = []

    def main():
        try:
            asyncio.run(Pipeline(MemorySource(items, interval=interval), engine, sink, stats or Stats(engine.bundle.sample_rate)).run())
        except BaseException as e:  # noqa: BLE001 (reported below)
            error.append(e)

    t = threading.Thread(target=main, daemon=True)
    t.start()
    t.join(WAIT_S)
    assert not t.is_alive(), "the pipeline hung"
    if error:
        raise error[0]
    return sink


def talk(name: str, text: str, task: str = "resynthesis", options: dict | None = None, block: int = 1600) -> list:
    return [Control(name, "start", task, options or {})] + chunks_of(name, espeak(text), block)


def interleave(*streams):
    out = []
    for i in range(max(map(len, streams))):
        out += [s[i] for s in streams if i < len(s)]
    return out


class SlowSink(MemorySink):
    async def write(self, item):
        await super().write(item)
        await asyncio.sleep(0.02)


def test_a_session_failing_while_the_sink_is_behind_does_not_stall_the_engine(test_bundle):
    """The worker used to emit a failed session's error holding the engine's lock and wait there for
    the sink, while the event loop (the only one draining toward the sink) waited for that lock."""
    engine = build_engine(test_bundle, "resynthesis", chunk_ms=100, speech_gate=False)
    engine.start = functools.partial(engine.start, out_limit=1)  # the sink is always behind
    texts = ["The weather is nice today.", "Where is the train station?", "I would like two tickets."]
    items = interleave(*(talk(f"s{i}", t, block=800) for i, t in enumerate(texts)))
    items.insert(len(items) // 2, SessionError("s1", "the client vanished"))
    sink = finish(engine, items, SlowSink(), interval=0.002)
    assert sink.errors == {"s1": "the client vanished"}
    assert all(len(sink.wave(n)) > 0 for n in ("s0", "s2"))


def test_the_backlog_admission_reads_is_kept_as_chunks_come_and_go(test_bundle):
    """Admission (on the event loop) reads a session's backlog while the worker takes its chunks: it is
    a count kept where chunks are queued and taken, never a walk over the worker's queue."""
    engine = build_engine(test_bundle, "resynthesis", chunk_ms=100, queue_size=64)
    engine.emit = lambda item: None
    wave = espeak("The weather is nice today.")

    async def arrive():
        for item in chunks_of("a", wave, 1000, end=False):
            await engine.put(item)

    asyncio.run(arrive())
    s = engine.sessions["a"]
    assert s.backlog == len(wave)
    with engine.lock:
        engine._intake()
    assert s.chunked == sum(len(c[0]) for c in s.chunks) > 0 and s.backlog == len(wave)
    engine._encode()
    waiting = sum(i.samples.numel() for i in s.inbox)  # what this tick's intake left for the next
    assert not s.chunks and s.chunked == 0 and s.backlog == len(s.buf) + waiting < len(wave)


def test_a_decoder_that_fails_to_admit_ends_those_sessions_and_serves_the_next(test_bundle, monkeypatch):
    """A failure while a decode is admitted (its source encoded, its prefix filled) used to drop the
    request unanswered: the session waited for ever and the engine never went idle."""
    start, calls = UnitMBart.start, []

    def failing_once(self, *a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (injected)")
        return start(self, *a, **kw)

    monkeypatch.setattr(UnitMBart, "start", failing_once)
    engine = build_engine(test_bundle, "resynthesis", chunk_ms=100)
    first = talk("first", "One two three four.", "continuation", {"max_units": 20, "min_units": 10})
    then = talk("then", "One two three four.", "continuation", {"max_units": 20, "min_units": 10})
    failed = threading.Event()

    class Sink(MemorySink):
        async def write(self, item):
            await super().write(item)
            if isinstance(item, SessionError):
                failed.set()

    class Source:  # the second session only once the first has failed (its decode is never batched with the first's)
        async def __aiter__(self):
            for item in first:
                yield item
            while not failed.is_set():
                await asyncio.sleep(0.01)
            for item in then:
                yield item

    sink = Sink()
    t = threading.Thread(target=lambda: asyncio.run(Pipeline(Source(), engine, sink, Stats(16000)).run()), daemon=True)
    t.start()
    t.join(WAIT_S)
    assert not t.is_alive(), "the pipeline hung"
    assert sink.errors.get("first", "").startswith("generator: RuntimeError: out of memory (injected)"), sink.errors
    assert "then" not in sink.errors and len(sink.wave("then")) > 0
    d = engine.decoders[""]
    assert not (d.running or d.waiting or d.resuming or d.parked)
    assert d.pool is None or sorted(d.free) == list(range(d.pool.batch_size))  # every slot free again


def test_a_failed_vocoder_call_fails_its_sessions_instead_of_retrying_on_advanced_state(test_bundle):
    """The vocoder's batched call advances each stream's convolution state; running its rows again
    alone after a failure would synthesise from state that has already moved on (wrong audio, no error)."""
    engine = build_engine(test_bundle, "resynthesis", chunk_ms=100)
    audio, failed = engine.audio_batch, []

    def failing_once(streams, windows):
        if len(streams) > 1 and not failed:
            failed.append(len(streams))
            audio(streams, windows)  # the state moves on, then the call fails
            raise RuntimeError("out of memory (injected)")
        return audio(streams, windows)

    engine.audio_batch = failing_once
    sink = finish(engine, interleave(talk("a", "The weather is nice today."), talk("b", "Where is the train station?")))
    assert failed == [2]
    assert set(sink.errors) == {"a", "b"} and all(e.startswith("vocoder: RuntimeError") for e in sink.errors.values())


def test_a_task_whose_policy_raises_ends_that_session_only(test_bundle):
    """A bug in a task plugin's policy (anything but the ValueError that names bad input) used to stop
    the engine for every session."""
    engine = build_engine(test_bundle, "resynthesis", chunk_ms=100)
    open_session = engine.open

    def open_with_a_bug(name, *a, **kw):
        s = open_session(name, *a, **kw)
        if name == "buggy":
            def on_source(*_):
                raise KeyError("oops")
            s.policy.on_source = on_source
        return s

    engine.open = open_with_a_bug
    sink = finish(engine, interleave(talk("buggy", "The weather is nice today."), talk("fine", "Where is the train station?")))
    assert sink.errors["buggy"] == "task 'resynthesis' failed: KeyError: 'oops' (a bug in the task; see the server log)"
    assert "fine" not in sink.errors and len(sink.wave("fine")) > 0
    assert not engine.sessions


def test_option_values_no_task_can_use_end_only_their_session(test_bundle):
    """A client's option values that convert but mean nothing: "inf", "nan" or 1e307 seconds passed every
    range check, and building the inpainting policy (int(mask_end * frame rate)) raised an OverflowError
    out of the engine's admission, which stopped the whole service; mid-session, as a task switch, it
    stopped the engine's worker. Each is now refused with one line naming the option, and the other
    session is served."""
    engine = build_engine(test_bundle, "resynthesis", chunk_ms=100)
    inf = talk("inf", "Hello there.", "inpainting", {"mask_start": 0, "mask_end": "inf", "context": "regenerate"})
    huge = talk("huge", "Hello there.", "inpainting", {"mask_start": 0, "mask_end": 1e307})
    nan = talk("nan", "Hello there.", "translation", {"ratio": "nan"})
    switch = talk("switch", "The weather is nice today.")
    switch.insert(3, Control("switch", "task", "inpainting", {"mask_start": 0.5, "mask_end": "Infinity"}))
    sink = finish(engine, interleave(inf, huge, nan, switch, talk("fine", "Where is the train station?")))
    assert sink.errors["inf"] == "task 'inpainting': option mask_end='inf' is not a finite number; give one like 0.0"
    assert sink.errors["huge"] == "task 'inpainting': option mask_end=1e+307: must be from 0.0 to 86400.0"
    assert sink.errors["nan"] == "task 'translation': option ratio='nan' is not a finite number; give one like 1.0"
    assert sink.errors["switch"] == "task 'inpainting': option mask_end='Infinity' is not a finite number; give one like 0.0"
    assert "fine" not in sink.errors and len(sink.wave("fine")) > 0 and not engine.sessions


def test_a_task_that_raises_while_its_session_starts_or_switches_ends_that_session_only(test_bundle):
    """Anything but a ValueError from building a task's policy (a plugin's bug) escaped the engine's
    admission and its intake: the first stopped the service, the second failed every session."""
    import dataclasses

    engine = build_engine(test_bundle, "resynthesis", chunk_ms=100)
    plugin = engine.plugin("continuation")

    def policy_with_a_bug(decoder, **options):
        if options["emit_every"] == 13:
            raise KeyError("oops")
        return plugin.policy(decoder, **options)

    engine.plugins["continuation"] = dataclasses.replace(plugin, policy=policy_with_a_bug)  # this engine's copy only
    buggy = talk("buggy", "Hello there.", "continuation", {"emit_every": 13})
    switch = talk("switch", "The weather is nice today.")
    switch.insert(3, Control("switch", "task", "continuation", {"emit_every": 13}))
    sink = finish(engine, interleave(buggy, switch, talk("fine", "Where is the train station?")))
    assert sink.errors["buggy"] == "task 'continuation' could not start: KeyError: 'oops' (a bug in the task; see the server log)"
    assert sink.errors["switch"] == "task 'continuation' could not start: KeyError: 'oops' (a bug in the task; see the server log)"
    assert "fine" not in sink.errors and len(sink.wave("fine")) > 0 and not engine.sessions


def test_a_failed_session_leaves_no_voice_activity_state(test_bundle):
    """With --vad, a session that failed mid-speech kept its detector state: a later session of that
    id began as if it had already spoken and paused."""
    engine = build_engine(test_bundle, "resynthesis", chunk_ms=100, vad=True)
    items = talk("a", "The weather is nice today, and we are going to the park.", block=800)
    items.insert(len(items) // 2, SessionError("a", "the client vanished"))
    sink = finish(engine, items)
    assert sink.errors == {"a": "the client vanished"} and not engine.vad.state
    sink = finish(engine := build_engine(test_bundle, "resynthesis", chunk_ms=100, vad=True), talk("b", "Where is the train station?"))
    assert not sink.errors and not engine.vad.state  # and none left by a session that ended well


def test_inpainting_takes_a_mask_inside_the_inputs_last_run(test_bundle):
    """The last unit run lasts to the end of the input (here 2 s, 100 frames, whose last unit is held
    from frame 60: trailing silence): a mask inside it is inside the input, not after its end, and the
    decode is asked for that run's place."""
    from streamgen.pipeline.policies import Inpainting, UnitDecoder

    p = Inpainting(UnitDecoder(test_bundle.mbart.cfg), mask_start=1.5, mask_end=1.8, context="regenerate")
    p.source_frames = 100
    p.on_source(torch.tensor([7, 8, 9, 3]), torch.tensor([0, 20, 40, 60]), 32000)
    d = p.on_end()
    assert d is not None and d.decode is not None
    mask = test_bundle.mbart.cfg.mask_token
    assert d.decode.source.tolist() == [7 + 4, 8 + 4, 9 + 4, mask, 2]  # the run held from frame 60 is masked, then </s>


def test_a_task_switch_the_input_cannot_follow_ends_the_session_with_the_reason():
    """On the shipped bundle continuation reads input through the phone recogniser and translation as
    k-means units: switching after audio would hand the new task units of the other reading, so the
    session ends saying why; before any audio the switch takes the new task's reading, and the session
    gets what a translation session gets."""
    bundle = streamgen.load_bundle()
    wave = espeak("Where is the train station, please?")
    engine = build_engine(bundle, "continuation", chunk_ms=320)
    late = [Control("late", "start", "continuation", {})] + chunks_of("late", wave, 5120)
    late.insert(3, Control("late", "task", "translation", {}))
    sink = finish(engine, late)
    assert sink.errors["late"] == ("task 'translation' reads its input as k-means units and this session's input has been read "
                                   "through the phone recogniser: start a new session for 'translation'")
    units: dict[str, list[int]] = {}
    engine = build_engine(bundle, "continuation", chunk_ms=320)
    engine.on_commit = lambda s, u: units.setdefault(s, []).extend(u.tolist())
    early = [Control("early", "start", "continuation", {}), Control("early", "task", "translation", {})] + chunks_of("early", wave, 5120)
    fresh = [Control("fresh", "start", "translation", {})] + chunks_of("fresh", wave, 5120)
    sink = finish(engine, early + fresh)
    assert not sink.errors and units["early"] == units["fresh"] and len(units["fresh"]) > 0
    assert isinstance(early[2], AudioChunk)


def test_a_session_id_used_again_while_its_last_session_finishes_loses_nothing(test_bundle, tmp_path):
    """A live source may use a session id again once that session's input has ended (MQTT clients do):
    its new session's input used to land in the old session, which had stopped taking input, and was
    dropped without a word; the file sink then wrote the old session's closed file and the service hung.
    Now the new session starts when the old one ends, and each gets its own file."""
    import soundfile as sf

    from streamgen.io.files import FileSink

    one, two = espeak("The weather is nice today."), espeak("Where is the train station?")
    items = chunks_of("alice", one, 1600) + chunks_of("alice", two, 1600) + chunks_of("bob", one, 1600)
    engine = build_engine(test_bundle, "resynthesis", chunk_ms=100)
    finish(engine, items, FileSink(tmp_path / "{session}.wav", 16000))
    alone = finish(build_engine(test_bundle, "resynthesis", chunk_ms=100), chunks_of("x", one, 1600) + chunks_of("y", two, 1600))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alice-2.wav", "alice.wav", "bob.wav"]
    for name, want in (("alice", "x"), ("alice-2", "y"), ("bob", "x")):
        got, ref = sf.read(tmp_path / f"{name}.wav", dtype="float32")[0], alone.wave(want).numpy()
        assert len(got) == len(ref) > 0 and abs(got - ref).max() <= 2 / 32768, name  # PCM16 of the same audio


def test_each_session_of_an_id_used_again_has_its_own_figures(test_bundle):
    """The new session's input used to be counted into the finishing session's record (one JSON line, one
    table for both; and the second session's own line was never written). Each now has its record: the id's
    first under the id, the next as ID#2, both closed with their own input and output."""
    import io
    import json

    one, two = espeak("The weather is nice today."), espeak("Where is the train station?")
    log = io.StringIO()
    stats = Stats(16000, log)
    sink = finish(build_engine(test_bundle, "resynthesis", chunk_ms=100),
                  chunks_of("alice", one, 1600) + chunks_of("alice", two, 1600) + chunks_of("bob", one, 1600), stats=stats)
    alone = finish(build_engine(test_bundle, "resynthesis", chunk_ms=100), chunks_of("x", one, 1600) + chunks_of("y", two, 1600))
    lines = {e.get("key", e["session"]): e for e in map(json.loads, log.getvalue().splitlines()) if e["event"] == "session"}
    assert sorted(lines) == ["alice", "alice#2", "bob"] and lines["alice#2"]["session"] == "alice"
    for key, wave in (("alice", one), ("alice#2", two), ("bob", one)):
        assert lines[key]["input_s"] == round(len(wave) / 16000, 3), key
    assert lines["alice"]["output_s"] == lines["bob"]["output_s"] == round(len(alone.wave("x")) / 16000, 3)
    assert lines["alice#2"]["output_s"] == round(len(alone.wave("y")) / 16000, 3)
    assert len(sink.wave("alice")) == len(alone.wave("x")) + len(alone.wave("y"))
    assert all(st.closed for st in stats.sessions.values()) and not stats._open
    assert stats.report("alice#2").startswith("session alice#2\n")


def test_an_id_whose_first_session_was_refused_at_its_first_chunk_keeps_the_next_sessions_figures_apart():
    """Refused at its very first chunk (not audio), the session had no record when its End came, so nothing
    marked its input ended; the next session of the id then counted its input into the record the refusal's
    error and End (still on their way through the engine) would close. The input side is what decides: it
    runs here against an engine that only takes items (its output, late, is what a busy server shows)."""
    from streamgen.pipeline.runner import Pipeline

    class Taking:  # the engine's input side; nothing comes out yet
        algorithmic_s: dict = {}

        def __init__(self):
            self.items = []

        async def put(self, item):
            self.items.append(item)

    one = espeak("Where is the train station?")
    bad = chunks_of("carol", one, 1600)[:1]
    bad[0].samples = torch.full_like(bad[0].samples, float("nan"))
    good = chunks_of("carol", one, 1600)
    stats = Stats(16000)
    pipeline = Pipeline(MemorySource(bad + [End("carol", 1600, 0.0)] + good), Taking(), MemorySink(), stats)
    asyncio.run(pipeline._feed())
    first, second = stats.session("carol"), stats.sessions["carol#2"]
    assert first.input_ended and first.input_samples == 0  # the refused one: its error and End will close it
    assert second.input_samples == len(one) and second.input_ended


def test_a_sink_that_fails_stops_the_run_with_its_error_instead_of_hanging(test_bundle):
    class Broken(MemorySink):
        async def write(self, item):
            if len(self.errors) == 0 and getattr(self, "n", 0) > 3:
                raise OSError(28, "No space left on device")
            self.n = getattr(self, "n", 0) + 1
            await super().write(item)

    engine = build_engine(test_bundle, "resynthesis", chunk_ms=100)
    engine.start = functools.partial(engine.start, out_limit=2)
    live = [c for i in range(20) for c in chunks_of(f"s{i}", espeak("The weather is nice today."), 800)]
    try:
        finish(engine, live, Broken(), interval=0.001)
    except OSError as e:
        assert "No space left on device" in str(e)
    else:
        raise AssertionError("the sink's error was lost")


def test_a_session_id_used_again_with_its_start_right_after_the_end_gets_its_own_task(test_bundle):
    """An MQTT client's stop then its next start, back to back: the start arrived before the worker had
    taken the End, was refused as 'already started', and the audio then opened a default-task session."""
    one = espeak("The weather is nice today.")
    engine = build_engine(test_bundle, "resynthesis", chunk_ms=100)
    first = [Control("a", "start", "resynthesis", {})] + chunks_of("a", one, 1600)
    again = [Control("a", "start", "continuation", {"max_units": 12, "min_units": 12})] + chunks_of("a", one, 1600)
    sink = finish(engine, first + again)
    assert not sink.errors
    alone = finish(build_engine(test_bundle, "resynthesis", chunk_ms=100),
                   [Control("x", "start", "resynthesis", {})] + chunks_of("x", one, 1600)
                   + [Control("y", "start", "continuation", {"max_units": 12, "min_units": 12})] + chunks_of("y", one, 1600))
    assert len(sink.wave("a")) == len(alone.wave("x")) + len(alone.wave("y"))  # both sessions, each with its own task


def test_a_session_id_used_again_after_its_source_failed_it_loses_nothing(test_bundle):
    """The source failed the first session (an error item) while its End and the next session were
    queued: the next session's input was dropped with the first's, or taken for the first's and
    ended as 'no speech heard'."""
    one, two = espeak("The weather is nice today."), espeak("Where is the train station?")
    items = chunks_of("a", one, 1600)
    items.insert(3, SessionError("a", "the client broke the protocol"))
    items += chunks_of("a", two, 1600)
    sink = finish(build_engine(test_bundle, "resynthesis", chunk_ms=100), items)
    alone = finish(build_engine(test_bundle, "resynthesis", chunk_ms=100), chunks_of("y", two, 1600))
    assert sink.errors == {"a": "the client broke the protocol"}
    assert len(sink.wave("a")) == len(alone.wave("y")) > 0  # the second session whole (the first said nothing)


def test_a_next_session_held_without_its_end_ends_when_the_input_does(test_bundle):
    """A live source that stops (the run's last session) while a reused id's next session is held: that
    session is ended with the input, not left open for ever."""
    one = espeak("The weather is nice today.")
    items = chunks_of("a", one, 1600) + chunks_of("a", one, 1600, end=False)
    sink = finish(build_engine(test_bundle, "resynthesis", chunk_ms=100), items)
    assert not sink.errors and len(sink.wave("a")) > 0


def test_more_of_a_next_session_than_can_be_held_ends_it_saying_so(test_bundle):
    """The next session's input is held without making the source wait (one feed serves every session),
    up to its own bound; past it that session ends with an error naming why."""
    from streamgen.pipeline.engine import MAX_HELD

    one = espeak("The weather is nice today, and we are going to the park.")
    engine = build_engine(test_bundle, "continuation", {"max_units": 60, "min_units": 60}, chunk_ms=100, queue_size=2)
    items = chunks_of("a", one[:16000], 1600) + chunks_of("a", one, 160)  # 0.01 s chunks: far more than 16 held
    assert len(chunks_of("a", one, 160)) > MAX_HELD * 2
    sink = finish(engine, items)
    assert "came while the last session of 'a' was still finishing, more than the 16 that are held" in sink.errors.get("a", ""), sink.errors


def test_an_engine_serves_a_new_pipeline_after_one_was_cancelled(test_bundle):
    """A cancelled run aborts the engine; the next pipeline on it used to lose the engine's last output
    (its None) and wait for ever."""
    engine = build_engine(test_bundle, "resynthesis", chunk_ms=100)

    async def cancelled():
        run = asyncio.ensure_future(Pipeline(MemorySource(talk("a", "The weather is nice today."), interval=0.05), engine,
                                             MemorySink(), Stats(16000)).run())
        await asyncio.sleep(0.3)
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)

    asyncio.run(cancelled())
    sink = finish(engine, talk("b", "Where is the train station?"))
    assert not sink.errors and len(sink.wave("b")) > 0 and not engine.sessions
