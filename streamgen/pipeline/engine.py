"""The engine: one owner of the models that advances every live session together.

Sessions are fed from the event loop (`put`) into their own bounded inboxes; one worker thread
runs `tick()` over and over. A tick makes, per stage, one batched model call for every session
that has work ready:

    intake      inbox -> fixed chunks (+ VAD end-of-input), per session
    encoder     every ready chunk's window (left context + new audio + look-ahead): one padded
                HuBERT call with lengths, one k-means call; or log-mel frames and one k-means call;
                or, for tasks that read through the phone recogniser, one call per window length
                (sessions in step share one)
    policies    each session's task policy turns new units into decisions (speak / decode)
    LM          decoder steps, each advancing every running decode by one token and admitting the
                new decodes (batched encode + ragged prefill) into free K/V slots
                (`models.generation.Decoder`), until the tick's decode budget is spent; one decoder
                per backbone (the shared one, and each task's own where the bundle has one); a session
                whose decode ends with its next units already encoded (or its input ended) has its
                policy decide at once, and its next decode joins the same steps; the other decodes'
                units reach their policies once, after the tick's steps
    vocoder     every session's duration window in one padded call, then every audio window in
                one padded generator call, trimmed per row

On CUDA the calls that recur in a few shapes are replayed as CUDA graphs once a shape has been met
twice (`cuda_graphs`): the decoder's steps, the HuBERT encoder's windows (every frame's unit in the
graph), a CodeHiFiGAN's duration and audio windows (`models.captured`), and its streaming convolutions'
steps in which no stream ends (`models.streaming_conv.StreamingGenerator`).

A session's decode advances by the tokens that fit in a tick's decode budget (`decode_budget_ms`),
interleaved with everyone else's chunks, so no session waits behind another session's whole decode. Each row of a batched call equals that
session computed alone (masks and lengths everywhere; greedy units are identical, audio equal to
float rounding): tests/test_engine.py proves it.

Admission: a new session is refused with a "busy" error when `max_sessions` are live, or (for live
services, `admit_lag_s`) when the engine is already behind real time: a live session has more than
`admit_lag_s` of input waiting for the encoder, or the output chunks of the last second, of sessions whose
input goes on, left more than `admit_lag_s` after the input they answer was captured (the decoder or the
vocoder behind while the encoder keeps up). Refusing is better than letting everyone fall behind.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..audio import SpeechGate
from ..bundle import Bundle
from ..memory import release_freed_memory
from ..models.captured import CapturedCall
from ..models.generation import Decoder, Sampling
from ..models.source_filter_vocoder import SourceFilterVocoder
from ..models.prompt import DeepPrompt, load_prompt
from .items import AudioChunk, AudioOut, Control, End, Item, SessionError
from .policies import Decision, Policy, UnitDecoder
from .stats import Stats
from .streams import (EncoderStream, LogMelUnitStream, PhoneUnitStream, TimedUnitStream, UnitStream, encode_logmel_windows,
                      encode_phone_windows, encode_windows, synthesise, synthesise_source_filter, time_windows, vocoder_streams,
                      window_units)
from .tasks import TaskPlugin, load_task
from .vad import Vad

log = logging.getLogger("streamgen")
MAX_HELD = 8  # queue sizes of a next session's input held while the last session of its id finishes


def task_bug(task: str, e: Exception) -> str:
    """What a session is told when its task raised something other than the ValueError that names bad input."""
    return f"task {task!r} could not start: {type(e).__name__}: {e} (a bug in the task; see the server log)"


def finish_in_tick(spent: float, steps: int, left: int, budget: float, waiting: bool) -> bool:
    """Past its decode budget, whether a tick goes on stepping: only to finish the decodes in flight
    (`left` tokens at most, at the tick's pace so far) within a second budget, and only while no
    session has input waiting."""
    return not waiting and spent + left * spent / steps <= 2 * budget


@dataclass
class EngineConfig:
    task: str = "continuation"
    options: dict = field(default_factory=dict)
    chunk_samples: int = 1600  # each chunk runs the unit encoder once
    left_frames: int | None = 100  # encoder left context (None: unbounded)
    lookahead_frames: int | None = 5  # encoder look-ahead (None: encode at the end)
    vocoder_lookahead: int | None = None  # frames; None: exact
    vad: bool = False
    seed: int = 0
    queue_size: int = 16  # input items held per session
    overflow: str = "block"  # or "drop-oldest": a full inbox drops that session's oldest chunk
    max_sessions: int = 256
    admit_lag_s: float | None = None  # refuse new sessions while this far behind real time (input waiting, answers late; live services)
    max_batch: int = 0  # 0: no limit; 1: one session per model call (the one-at-a-time baseline)
    decode_budget_ms: float = 30.0  # decoder steps per tick: as many as fit in this (at least one)
    trim_every_s: float = 10.0  # freed memory goes back to the system this often while sessions run
    cuda_graphs: bool = True  # on CUDA, decoder steps, the encoder's and vocoder's windows and streaming steps replay as CUDA graphs
    speech_gate: bool = True  # a session's units reach its task only once speech has been heard in it

    def __post_init__(self):
        if self.overflow not in ("block", "drop-oldest"):
            raise ValueError(f"overflow must be 'block' or 'drop-oldest', got {self.overflow!r}")
        if self.chunk_samples < 1:
            raise ValueError(f"the chunk must hold at least one sample, got {self.chunk_samples}")
        if self.queue_size < 1 or self.max_sessions < 1:
            raise ValueError("queue_size and max_sessions must be >= 1")


class Session:
    """One live session's state inside the engine."""

    def __init__(self, name: str, plugin: TaskPlugin, policy: Policy, decoder: Decoder | None,
                 units: EncoderStream, vocoder: TimedUnitStream, gate: SpeechGate | None = None):
        self.name, self.plugin, self.policy = name, plugin, policy
        self.decoder = decoder  # the decoder of the task's backbone (None: the task needs no LM)
        self.gate = gate
        self.heard = gate is None  # speech has been heard (or nobody listens for it)
        self.held: deque = deque(maxlen=100)  # units from before the first speech (the latest 100 chunks)
        self.units, self.vocoder = units, vocoder
        self.inbox: deque[Item] = deque()
        self.waiters: list[asyncio.Future] = []
        self.buf = torch.zeros(0)  # input audio not yet cut into a chunk
        self.pos = 0  # input samples cut into chunks
        self.seq = 0
        self.chunks: deque[tuple[Tensor, int, float]] = deque()  # (samples, end sample, captured_at)
        self.chunked = 0  # samples in `chunks` (read by admission on the event loop while the worker pops chunks)
        # units for the policy: (units, their start frames, frames encoded, end sample, captured_at)
        self.events: deque[tuple[Tensor, Tensor, int, int, float]] = deque()
        self.input_ended = False  # no more input audio (End or the VAD)
        self.source_ended = False  # the source's End has been taken in
        self.end_queued = False  # the source's End is in the inbox or taken: what follows is the id's next session's
        self.held_dropped = 0  # the next session's chunks not held (more than MAX_HELD while this one finished)
        self.encoder_done = False
        self.policy_ended = False  # on_end has been called
        self.decoding = False
        self.source_samples = 0  # input read when the latest units were committed
        self.captured_at = 0.0

    @property
    def has_input(self) -> bool:
        """Input a tick would take in: items in the inbox (after the source's End they are the next
        session's of this id, held until this one ends), chunks for the encoder, units for the policy."""
        return bool((self.inbox and not self.source_ended) or self.chunks or self.events)

    @property
    def idle(self) -> bool:
        return not (self.has_input or self.decoding)

    @property
    def backlog(self) -> int:
        """Input samples received and not yet encoded."""
        return len(self.buf) + self.chunked + sum(i.samples.numel() for i in self.inbox if isinstance(i, AudioChunk))


class Engine:
    """Owns the bundle's models on one device; `tick()` advances every session (see module doc)."""

    def __init__(self, bundle: Bundle, cfg: EngineConfig, stats: Stats | None = None):
        self.bundle, self.cfg = bundle, cfg
        self.stats = stats or Stats(bundle.sample_rate)
        sr = bundle.sample_rate
        # on CUDA: the decoder's steps, the HuBERT encoder's windows and a CodeHiFiGAN's windows, durations and
        # streaming steps are replayed as CUDA graphs, one per shape met (`models.captured`)
        self.graphs = cfg.cuda_graphs and bundle.device.type == "cuda"
        self.captured: list[CapturedCall] = []

        def capture(fn, name: str) -> CapturedCall | None:
            if not self.graphs:
                return None
            self.captured.append(CapturedCall(fn, name))
            return self.captured[-1]

        # the unit encoder's stream class -> its batched call, and the stream each task reads with
        self.encode_batch: dict[type, object] = {}
        if bundle.logmel_units is not None:  # log-mel units: frame-local, exact at any chunking
            lm = bundle.logmel_units
            self.new_kmeans_stream = lambda: LogMelUnitStream(lm)
            self.encode_batch[LogMelUnitStream] = lambda windows: encode_logmel_windows(lm, windows)
            enc_wait = lm.cfg.pad / sr
            self.quiet_units = lm.quiet_units()  # pauses over a noise floor, for the segmenting policies
        else:
            self.quiet_units = None  # HuBERT units: silence is one unit held
            hubert, quantizer = bundle.need("hubert"), bundle.need("kmeans")
            self.new_kmeans_stream = lambda: UnitStream(hubert, quantizer, cfg.left_frames, cfg.lookahead_frames)
            frame_units = capture(window_units(hubert, quantizer), "the unit encoder")
            self.encode_batch[UnitStream] = lambda windows: encode_windows(hubert, quantizer, windows, frame_units)
            hc = hubert.cfg
            enc_wait = float("inf") if cfg.lookahead_frames is None else ((hc.receptive_field - hc.hop) + cfg.lookahead_frames * hc.hop) / sr
        if bundle.phone_units is not None:  # read in windows of `stride` frames with `lookahead` after them
            reader, pc = bundle.phone_units, bundle.phone_units.cfg
            self.encode_batch[PhoneUnitStream] = lambda windows: encode_phone_windows(reader, lm, windows)
            enc_wait = max(enc_wait, (pc.stride - 1 + pc.lookahead) * pc.hop / sr)
        voc = bundle.unit_vocoder
        self.new_vocoder_stream = vocoder_streams(voc, cfg.vocoder_lookahead, self.graphs)
        if isinstance(voc, SourceFilterVocoder):
            self.time_batch = lambda windows: time_windows(voc, windows)
            self.audio_batch = synthesise_source_filter
        else:
            durations, generate = capture(voc.durations, "the duration predictor"), capture(voc.generate, "the vocoder")
            self.time_batch = lambda windows: time_windows(voc, windows, durations)
            self.audio_batch = lambda streams, windows: synthesise(streams, windows, generate)
        voc_wait = (voc.frame_context() if cfg.vocoder_lookahead is None else cfg.vocoder_lookahead) * voc.hop / sr
        self.decoders: dict[str, Decoder] = {}  # by backbone: "" the shared one, else the task that has its own
        self.vad = Vad(bundle.sample_rate) if cfg.vad else None
        self.plugins: dict[str, TaskPlugin] = {}  # entry points are read once per task, not per session
        self.prompts: dict[str, object] = {}  # one shared prompt K/V per task
        self.sessions: dict[str, Session] = {}
        # sessions the engine ended before their source did (refused, failed, ended by the VAD): their
        # later items are dropped until the source's End, after which the id may be used again
        self.closed: OrderedDict[str, None] = OrderedDict()
        self.lock = threading.RLock()  # guards sessions and inboxes between the event loop and the worker
        self.wake = threading.Condition(self.lock)
        self.closing = False
        self.aborted = False
        self.emit = None  # callable(item), set by `start`
        self.on_commit = None  # optional callable(session, units): every unit a policy commits to speak
        self.compute: dict[str, float] = {}  # seconds per stage, all sessions
        self.largest_batch: dict[str, int] = {}  # sessions in the largest call per stage
        self.busy_s = 0.0  # time spent in ticks (the engine's load)
        # how late the engine answers: (when, how long after its input was captured) of the last second's
        # output chunks (under `lock`: the worker adds, admission reads)
        self.answers: deque[tuple[float, float]] = deque()
        self.ticks = 0
        self.trims, self.trimmed_at, self.trimmed_tick = 0, time.perf_counter(), 0
        self.algorithmic_s = {"chunker": cfg.chunk_samples / sr, "encoder": enc_wait, "vocoder": voc_wait}
        self.plugin(cfg.task).resolve_options(cfg.options, bundle=bundle)  # unknown task or option: fail before any audio

    # --- tasks -----------------------------------------------------------------------------------

    def plugin(self, task: str) -> TaskPlugin:
        if task not in self.plugins:
            self.plugins[task] = load_task(task)
        return self.plugins[task]

    def decoder_for(self, task: str) -> Decoder:
        """The decoder of the backbone a task runs on (made on first use): its sessions batch together."""
        key = task if task in self.bundle.backbones else ""
        if key not in self.decoders:
            self.decoders[key] = Decoder(self.bundle.backbone(task), max_batch=self.cfg.max_batch, graphs=self.graphs)
        return self.decoders[key]

    def prompt_for(self, plugin: TaskPlugin):
        if plugin.name not in self.prompts:
            mbart = self.bundle.backbone(plugin.name)
            if plugin.prompt is not None:
                prompt: DeepPrompt | None = load_prompt(plugin.prompt, mbart.cfg).to(self.bundle.device)
            else:
                prompt = self.bundle.prompts.get(plugin.name)
            if prompt is None and plugin.name not in self.bundle.backbones:
                log.warning("no trained prompt for task %r in this bundle: using the unprompted backbone", plugin.name)
            self.prompts[plugin.name] = prompt.shared_kv(mbart) if prompt is not None else None
        return self.prompts[plugin.name]

    def new_policy(self, task: str, options: dict) -> tuple[TaskPlugin, Policy, Decoder | None]:
        """The task's plugin, a policy for `options`, and the decoder of its backbone. ValueError: what is
        wrong with the task or its options, or a bug in the task (anything else its policy raised), named."""
        try:
            return self._build_policy(task, options)
        except ValueError:
            raise
        except Exception as e:
            log.exception("task %r could not start", task)
            raise ValueError(task_bug(task, e)) from e

    def _build_policy(self, task: str, options: dict) -> tuple[TaskPlugin, Policy, Decoder | None]:
        plugin = self.plugin(task)
        opts = plugin.resolve_options(options, bundle=self.bundle)
        has_lm = self.bundle.has_backbone(plugin.name)
        if plugin.uses_lm and not has_lm:
            raise ValueError(f"task {task!r} needs a speech LM and this bundle has none")
        lm = self.decoder_for(plugin.name) if plugin.uses_lm else None
        prompt = self.prompt_for(plugin) if plugin.uses_lm else None
        cfg = self.bundle.backbone(plugin.name).cfg if has_lm else None
        decoder = UnitDecoder(cfg, prompt, Sampling(**plugin.sampling), plugin.prefix_tokens, self.cfg.seed, self.quiet_units)
        return plugin, plugin.make_policy(decoder, opts), lm

    def task_options(self, task: str | None, options: dict | None) -> tuple[str, dict]:
        """The default task with the default options overridden by `options`, or another task with its own."""
        if task is None or task == self.cfg.task:
            return self.cfg.task, {**self.cfg.options, **(options or {})}
        return task, options or {}

    def new_units(self, plugin: TaskPlugin) -> EncoderStream:
        """How a task's sessions read their input: through the phone recogniser, or the k-means units."""
        if self.bundle.reads_phone_units(plugin.name):
            return PhoneUnitStream(self.bundle.phone_units, self.bundle.logmel_units)
        return self.new_kmeans_stream()

    def open(self, name: str, task: str | None = None, options: dict | None = None) -> Session:
        """A new session of `task_options(task, options)`."""
        plugin, policy, lm = self.new_policy(*self.task_options(task, options))
        s = Session(name, plugin, policy, lm, self.new_units(plugin), self.new_vocoder_stream(),
                    SpeechGate(self.bundle.sample_rate) if self.cfg.speech_gate else None)
        self.sessions[name] = s
        return s

    # --- the event-loop side ------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, out: asyncio.Queue, out_limit: int = 64) -> threading.Thread:
        """Run ticks in a worker thread; outputs go to `out` on `loop` (None after the last one).
        The worker starts no tick while `out` holds `out_limit` items (a slow sink slows the engine, and
        then the sources, instead of growing memory); `emit` itself never waits, since it may be called
        holding the lock the event loop needs to drain `out`."""
        self.loop, self.out, self.out_limit = loop, out, out_limit
        self.closing = False  # an engine serves one pipeline after another (its models stay loaded)
        if self.aborted:  # the last pipeline was cancelled: what its sessions left goes, not into this one
            for s in self.sessions.values():
                if s.decoder is not None:
                    s.decoder.cancel(s.name)
            self.sessions.clear()
            self.aborted = False
        self.thread = threading.Thread(target=self._run, name="streamgen-engine", daemon=True)

        def emit(item) -> None:
            if not self.aborted:
                loop.call_soon_threadsafe(out.put_nowait, item)

        self.emit = emit
        self.thread.start()
        return self.thread

    async def put(self, item: Item) -> None:
        """Queue a source item for its session (blocks, or drops that session's oldest chunk, when
        its inbox is full)."""
        while True:
            with self.lock:
                s = self._session_for(item)
                if s is None:
                    return
                if s.end_queued:  # the id's next session, held until this one ends: its own bound, never a wait
                    if isinstance(item, AudioChunk) and self._held(s) >= MAX_HELD * self.cfg.queue_size:
                        s.held_dropped += 1
                    else:
                        s.inbox.append(item)
                    return
                if isinstance(item, End):
                    s.end_queued = True
                full = sum(isinstance(i, AudioChunk) for i in s.inbox) >= self.cfg.queue_size
                if full and isinstance(item, AudioChunk) and self.cfg.overflow == "drop-oldest":
                    for i, queued in enumerate(s.inbox):
                        if isinstance(queued, AudioChunk):
                            del s.inbox[i]
                            self.stats.session(s.name).dropped_chunks += 1
                            self.stats.event(event="dropped", session=s.name, seq=queued.seq)
                            break
                    full = False
                if not full or not isinstance(item, AudioChunk):
                    s.inbox.append(item)
                    self.wake.notify()
                    return
                waiter = self.loop.create_future()
                s.waiters.append(waiter)
            await waiter

    def close(self) -> None:
        """No more input: every session's input has ended (whether or not its End came); finish
        them, then stop."""
        with self.lock:
            self.closing = True
            for s in self.sessions.values():
                if not s.end_queued:
                    s.inbox.append(End(s.name, s.pos, time.monotonic()))
                    s.end_queued = True
                elif (rest := self._after_end(s)) and not isinstance(rest[-1], End):  # a held next session's input ends too
                    s.inbox.append(End(s.name, 0, time.monotonic()))
            self.wake.notify()

    def abort(self) -> None:
        """Stop now (the pipeline was cancelled): the worker drops what it holds and exits."""
        with self.lock:
            self.aborted = True
            self.wake.notify()

    def _session_for(self, item: Item) -> Session | None:
        """The session an item goes to (opening it, or refusing it when the engine is full or behind)."""
        name = item.session
        s = self.sessions.get(name)
        if s is not None:
            if isinstance(item, Control) and item.action == "start" and not s.end_queued:  # failed by the worker, which owns the decoder
                s.inbox.append(SessionError(name, f"session {name!r} already started"))
                self.wake.notify()
                return None
            return s
        if name in self.closed:
            if isinstance(item, End):
                self.closed.pop(name)  # the id may be used again
            return None
        if isinstance(item, (End, SessionError)):
            self.emit(item)  # an ended or failed session the engine never held
            return None
        why = self._admission()
        if why is None:
            try:
                task, options = (item.task, item.options) if isinstance(item, Control) else (None, None)
                s = self.open(name, task, options)
                self.stats.session(name)
            except ValueError as e:
                why = str(e)
            except Exception as e:  # a bug met opening it: this session is refused, the service goes on
                log.exception("session %s could not start", name)
                why = task_bug(task or self.cfg.task, e)
        if why is not None:
            self._refuse(name, why)
            return None
        return s if not isinstance(item, Control) else None

    def _admission(self) -> str | None:
        """Why a new session is refused now, or None. Behind real time is either of: a live session's
        input waiting for the encoder, or the last second's answers to sessions still talking leaving
        that long after the input they answer was captured (a loaded decoder or vocoder, with the encoder
        keeping up)."""
        if len(self.sessions) >= self.cfg.max_sessions:
            return f"busy: the server holds its maximum of {self.cfg.max_sessions} live sessions; try again later or another server"
        if self.cfg.admit_lag_s is not None and self.sessions:
            waiting = max(s.backlog for s in self.sessions.values()) / self.bundle.sample_rate
            behind = max(waiting, self.answer_lag(time.monotonic()))
            if behind > self.cfg.admit_lag_s:
                return (f"busy: the server is {behind:.1f} s behind real time with {len(self.sessions)} live sessions; "
                        "try again later or another server")
        return None

    def _answered(self, now: float, captured_at: float) -> None:
        """An output chunk of a session whose input goes on left `now` for input captured at `captured_at`
        (0: a source without capture times, not counted)."""
        with self.lock:
            if captured_at > 0:
                self.answers.append((now, now - captured_at))
            self._forget_answers(now)

    def answer_lag(self, now: float) -> float:
        """How long after their input was captured the last second's output chunks to sessions still
        talking left (0: none left)."""
        with self.lock:
            self._forget_answers(now)
            return max((lag for _, lag in self.answers), default=0.0)

    def _forget_answers(self, now: float) -> None:
        while self.answers and self.answers[0][0] < now - 1.0:
            self.answers.popleft()

    def _refuse(self, name: str, why: str) -> None:
        self._close(name)
        self.emit(SessionError(name, why))
        self.emit(End(name, 0, time.monotonic()))

    def _close(self, name: str) -> None:
        self.closed[name] = None
        while len(self.closed) > 10_000:
            self.closed.popitem(last=False)

    def _fail(self, s: Session, why: str) -> None:
        """End one session with an error; nothing else is touched."""
        log.warning("session %s: %s", s.name, why)
        with self.lock:
            self.sessions.pop(s.name, None)
            if s.decoder is not None:
                s.decoder.cancel(s.name)
            if not s.source_ended:
                ended = next((i for i, item in enumerate(s.inbox) if isinstance(item, End)), None)
                if ended is None:  # its source's End is still to come: what it sends until then is dropped
                    self._close(s.name)
                    s.inbox.clear()
                else:  # the End is queued: this session's input up to it goes, the next session's after it stays
                    for _ in range(ended + 1):
                        s.inbox.popleft()
                    s.source_ended = True
            if self.vad is not None:
                self.vad.close(s.name)
            self.emit(SessionError(s.name, why))
            self.emit(End(s.name, s.pos, time.monotonic()))
            self._successor(s)
            self._release_waiters(s)

    def _successor(self, s: Session) -> None:
        """After a session's end: what its source sent after its End (the id used again for a new session
        while this one finished) opens that session now, in order. If more came than could be held, the
        new session ends at once saying so (nothing is dropped silently)."""
        if s.source_ended:
            items = list(s.inbox)
            if s.held_dropped:
                why = (f"{s.held_dropped} of its audio chunks came while the last session of {s.name!r} was still finishing, "
                       f"more than the {MAX_HELD * self.cfg.queue_size} that are held meanwhile: start a session after the last one's end")
                opens = next((i for i, it in enumerate(items) if not isinstance(it, (End, SessionError))), None)
                if opens is not None:  # into the new session, once its first item has opened it
                    items.insert(opens + 1, SessionError(s.name, why))
            for item in items:
                if isinstance(item, End) and s.name in self.sessions:
                    self.sessions[s.name].end_queued = True
                t = self._session_for(item)
                if t is not None:
                    t.inbox.append(item)
        s.inbox.clear()

    @staticmethod
    def _after_end(s: Session) -> list[Item]:
        """The id's next session's items waiting in this session's inbox (after its End)."""
        items = list(s.inbox)
        if not s.source_ended:
            items = items[next((i for i, it in enumerate(items) if isinstance(it, End)), len(items)) + 1 :]
        return items

    def _held(self, s: Session) -> int:
        return sum(isinstance(i, AudioChunk) for i in self._after_end(s))

    def _release_waiters(self, s: Session) -> None:
        for w in s.waiters:
            self.loop.call_soon_threadsafe(lambda w=w: w.done() or w.set_result(None))
        s.waiters.clear()

    # --- the worker thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while True:
                with self.lock:
                    if self.aborted or (self.closing and not self.sessions):
                        break
                    idle = not self._has_work()
                if idle:
                    if self.ticks != self.trimmed_tick:  # work was done since the last trim
                        self._trim()
                    with self.lock:
                        if not self._has_work():
                            self.wake.wait(timeout=0.05)
                    continue
                while self.out.qsize() >= self.out_limit and not self.aborted:  # the sink is behind: wait for it
                    time.sleep(0.005)
                t = time.perf_counter()
                self.tick()
                self.busy_s += time.perf_counter() - t
                self.ticks += 1
                if t - self.trimmed_at >= self.cfg.trim_every_s:
                    self._trim()
        except Exception:  # a bug in the engine itself: fail every session loudly, never hang
            log.exception("the engine failed")
            with self.lock:
                for s in list(self.sessions.values()):
                    self._fail(s, "internal error in the engine (see the server log)")
        finally:
            if self.ticks != self.trimmed_tick:
                self._trim()
            self.emit(None)

    def _trim(self) -> None:
        """Hand what the ticks freed back to the system (see `streamgen.memory`): while sessions run,
        every `trim_every_s`, and whenever the engine falls idle; with no session left, the decoders' K/V
        pools, the vocoder's slot tensors and the CUDA graphs captured for them too (sized for the most
        sessions served at once)."""
        with self.lock:
            if not self.sessions:
                for decoder in self.decoders.values():
                    decoder.release_pool()
                if self.new_vocoder_stream.slots is not None:
                    self.new_vocoder_stream.slots.shrink()  # (its captured steps go with its tensors)
                for call in self.captured:
                    call.clear()
        release_freed_memory()
        self.trimmed_at, self.trimmed_tick, self.trims = time.perf_counter(), self.ticks, self.trims + 1

    def _has_work(self) -> bool:
        return any(not s.idle or s.input_ended for s in self.sessions.values())

    def tick(self) -> None:
        """Advance every session by one step of each stage."""
        with self.lock:
            self._intake()
        self._encode()
        self._decide()
        self._decode()
        self._vocode()

    # intake: inbox -> chunks ------------------------------------------------------------------------

    def _intake(self) -> None:
        for s in list(self.sessions.values()):
            took = False
            while s.inbox and len(s.chunks) < 16 and not s.source_ended:  # after its End: the id's next session's
                item = s.inbox.popleft()
                took = True
                try:
                    self._take(s, item)
                except Exception as e:  # a task's options or policy: that session ends, named
                    self._policy_failed(s, e)
                    break
            if took:
                self._release_waiters(s)

    def _take(self, s: Session, item: Item) -> None:
        if isinstance(item, SessionError):
            raise ValueError(item.message)
        if isinstance(item, Control):
            if item.action == "task":
                task, options = self.task_options(item.task, item.options)
                plugin, policy, decoder = self.new_policy(task, options)
                if self.bundle.reads_phone_units(plugin.name) != isinstance(s.units, PhoneUnitStream):
                    if s.pos:  # its units so far are the other reading's: the new task would get wrong input
                        how = lambda phone: "through the phone recogniser" if phone else "as k-means units"
                        raise ValueError(f"task {task!r} reads its input {how(not isinstance(s.units, PhoneUnitStream))} and "
                                         f"this session's input has been read {how(isinstance(s.units, PhoneUnitStream))}: "
                                         f"start a new session for {task!r}")
                    s.units = self.new_units(plugin)
                if s.decoder is not None:  # its decode in flight, or a stream parked between decodes
                    s.decoder.cancel(s.name)
                s.decoding = False
                s.plugin, s.policy, s.decoder = plugin, policy, decoder
            return
        if isinstance(item, End):
            s.source_ended = True
            if len(s.buf) and not s.input_ended:
                self._chunk(s, s.buf, item.captured_at)
            s.buf = torch.zeros(0)
            s.input_ended = True
            return
        if s.input_ended:
            return  # after the VAD ended the input
        if isinstance(item, AudioChunk):
            s.buf = torch.cat([s.buf, item.samples.float()])
            n = self.cfg.chunk_samples
            while s.buf.shape[0] >= n and not s.input_ended:
                self._chunk(s, s.buf[:n], item.captured_at)
                s.buf = s.buf[n:]

    def _chunk(self, s: Session, samples: Tensor, captured_at: float) -> None:
        n = samples.shape[0]
        s.pos += n
        s.seq += 1
        s.chunks.append((samples, s.pos, captured_at))
        s.chunked += n
        if not s.heard:
            s.heard = s.gate.push(samples.numpy())
        if self.vad is not None and self.vad.ended(s.name, samples):
            s.input_ended = True

    # encoder ---------------------------------------------------------------------------------------

    def _encode(self) -> None:
        """Every chunk waiting in every session, each as its own window (what it would have been
        one tick at a time, so the units do not depend on timing), in one batched call: a session
        that fell behind catches up in one tick instead of one chunk per tick."""
        jobs = []
        for s in list(self.sessions.values()):
            while s.chunks or (s.input_ended and not s.encoder_done):
                if s.chunks:
                    samples, end, captured = s.chunks.popleft()
                    s.chunked -= len(samples)
                    s.units.add(samples)
                    final = s.input_ended and not s.chunks
                else:
                    end, captured, final = s.pos, time.monotonic(), True
                if final:
                    s.encoder_done = True
                    if self.vad is not None:
                        self.vad.close(s.name)
                while (w := s.units.plan(final)) is not None:
                    jobs.append((s, w, end, captured))
        by_encoder: dict[type, list] = {}
        for job in jobs:
            by_encoder.setdefault(type(job[0].units), []).append(job)
        for kind, kind_jobs in by_encoder.items():
            self._finish_encoding(kind_jobs, self.encode_batch[kind])

    def _finish_encoding(self, jobs: list, encode) -> None:
        for batch in self._batches(jobs):
            units = self._run_batch("encoder", batch, lambda b: encode([w for _, w, _, _ in b]))
            for (s, w, end, captured), fu in zip(batch, units):
                if fu is None:
                    continue
                u, frames = s.units.finish(w, fu)
                if len(u) or s.policy.every_chunk:
                    (s.events if s.heard else s.held).append((u, frames, s.units.n_done, end, captured))

    # policies and the LM -------------------------------------------------------------------------------

    def _decide(self) -> None:
        for s in list(self.sessions.values()):
            if s.heard and s.held:  # speech began: what was held (its onset) goes to the task first
                s.events.extendleft(reversed(s.held))
                s.held.clear()
            if s.encoder_done and not s.heard:
                self._fail(s, f"no speech heard in its {s.pos / self.bundle.sample_rate:.1f} s of input, so the task "
                              "had nothing to answer and nothing was said")
                continue
            self._next_decisions(s)

    def _next_decisions(self, s: Session) -> None:
        """The session's units waiting for its policy, until one of them starts a decode; with none left
        after the end of its input, the policy's end."""
        try:
            while not s.decoding and s.events:
                u, frames, s.policy.source_frames, end, captured = s.events.popleft()
                s.source_samples, s.captured_at = end, captured
                self._apply(s, s.policy.on_source(u, frames, end))
            if not s.decoding and not s.events and s.encoder_done and not s.policy_ended:
                s.policy_ended = True
                s.source_samples, s.policy.source_frames = s.pos, s.units.n_done
                self._apply(s, s.policy.on_end())
        except Exception as e:
            self._policy_failed(s, e)

    def _apply(self, s: Session, d: Decision | None) -> None:
        if d is None:
            return
        if d.frames is not None:  # timed by the policy (the source's own durations), after any it leaves untimed
            if d.timed_from:
                s.vocoder.add(d.commit[: d.timed_from])
            s.vocoder.add_frames(d.frames)
        elif d.commit is not None and len(d.commit):
            s.vocoder.add(d.commit)
        if d.commit is not None and len(d.commit) and self.on_commit is not None:
            self.on_commit(s.name, d.commit)
        if d.decode is not None:
            s.decoder.submit(s.name, d.decode)
            s.decoding = True

    def _decode(self) -> None:
        """Decoder steps until the tick's decode budget is spent (at least one step while any decode
        runs): units come at 50 per second of speech, far faster than chunks arrive. Past the budget
        the steps go on only while no session has input waiting and every decode in flight will end
        within a second budget at this tick's pace: its last units then reach the vocoder in this
        tick, not a whole tick (every session's vocoder and encoder calls) later. A long decode (a
        continuation) still speaks budget by budget.

        A policy gets its units once a tick (at the end of the steps), or with the step that ends its
        decode (its next decision may then start the next decode in the same steps), and the steps'
        time is charged to each session once a tick too: per step and row the engine only gathers (on a
        GPU serving a thousand sessions, per-row Python costs as much as the step)."""
        t0, budget, steps = time.perf_counter(), self.cfg.decode_budget_ms / 1000, 0
        # by session id, its decode's [session, decoder, the decoder's share total before it joined, units this tick not yet
        # given to its policy] (lists: made per session and tick, unpacked per row)
        decoding: dict[str, list] = {}
        shares: dict[Decoder, float] = {}  # per decoder: a row's share of its steps' time so far this tick
        charged: dict[Session, float] = {}
        largest = 0
        try:
            while busy := [d for d in self.decoders.values() if d.busy]:
                for decoder in busy:
                    largest = max(largest, self._decode_step(decoder, decoding, shares, charged))
                steps += 1
                spent = time.perf_counter() - t0
                if spent >= budget and not finish_in_tick(spent, steps, max(d.left for d in self.decoders.values()),
                                                          budget, self._input_waiting()):
                    break
        finally:
            for s, decoder, since, _ in decoding.values():
                charged[s] = charged.get(s, 0.0) + shares[decoder] - since
            # (a session failed in the steps, whose id may have a new session already, gets nothing)
            live = {s: t for s, t in charged.items() if self.sessions.get(s.name) is s}
            self._charge("generator", live, largest)
            for s, _, _, units in decoding.values():
                if s in live:
                    self._on_decoded(s, units, False)

    def _input_waiting(self) -> bool:
        """Some session has input the rest of a tick would take in (audio, units for its policy)."""
        return any(s.has_input for s in list(self.sessions.values()))

    def _decode_step(self, decoder: Decoder, decoding: dict[str, list], shares: dict[Decoder, float],
                     charged: dict[Session, float]) -> int:
        """One step of a decoder: its units gathered per session in `decoding` (a finished decode's given to its
        policy now, its share of the steps' time added to `charged`). Returns the rows it moved."""
        t = time.perf_counter()
        try:
            results = decoder.step()
        except Exception as e:  # cannot be pinned on one session: every session decoding on it fails
            log.exception("decoder step failed")
            for s in [s for s in list(self.sessions.values()) if s.decoder is decoder and s.decoding]:
                self._fail(s, f"generator: {type(e).__name__}: {e}")
            return 0
        seconds = time.perf_counter() - t
        self._total("generator", seconds)
        before = shares.get(decoder, 0.0)  # (every decode running is in every step: a session's share is
        shares[decoder] = after = before + seconds / max(1, len(results))  # the rows' shares since it joined)
        for name, units, done in results:
            d = decoding.get(name)
            if d is None:
                s = self.sessions.get(name)
                if s is None:
                    continue
                d = decoding[name] = [s, decoder, before, units]
            else:
                d[3] += units
            if not done:
                continue
            del decoding[name]
            s = d[0]
            charged[s] = charged.get(s, 0.0) + after - d[2]
            s.decoding = False
            if not self._on_decoded(s, d[3], True):
                continue
            if s.heard and not s.decoding and s.name in self.sessions:
                # its next decision now, not a tick later: the units it waits on were encoded while it decoded
                # (at the end of its input, the closing decode follows its last decision's in the same steps)
                self._next_decisions(s)
        return len(results)

    def _on_decoded(self, s: Session, units: list[int], done: bool) -> bool:
        """Give a session's policy its decoded units; whether it took them (a failing policy fails its session)."""
        try:
            if (d := s.policy.on_decoded(units, done)) is not None:
                self._apply(s, d)
        except Exception as e:
            self._policy_failed(s, e)
            return False
        return True

    def _policy_failed(self, s: Session, e: Exception) -> None:
        """A task's policy raised: a ValueError says what is wrong with the session's input or options;
        anything else is a bug in the task (a plugin's), which ends that session only."""
        if isinstance(e, ValueError):
            self._fail(s, str(e))
        else:
            log.exception("task %r failed on session %s", s.plugin.name, s.name)
            self._fail(s, f"task {s.plugin.name!r} failed: {type(e).__name__}: {e} (a bug in the task; see the server log)")

    # vocoder ---------------------------------------------------------------------------------------

    def _vocode(self) -> None:
        ready = []
        for s in list(self.sessions.values()):
            if s.policy_ended and not s.decoding and not s.vocoder.ended:
                s.vocoder.end()
            w = s.vocoder.plan_durations()
            if w is not None:
                ready.append((s, w))
        for batch in self._batches(ready):
            durs = self._run_batch("vocoder", batch, lambda b: self.time_batch([w for _, w in b]))
            for (s, w), d in zip(batch, durs):
                if d is not None:
                    s.vocoder.finish_durations(w, d)
        jobs = [(s, w) for s in list(self.sessions.values()) if s.name in self.sessions and (w := s.vocoder.plan_audio()) is not None]
        for batch in self._batches(jobs):
            # stateful (each stream's convolution state advances inside the call): a failed call is not retried
            waves = self._run_batch("vocoder", batch, lambda b: self.audio_batch([s.vocoder for s, _ in b], [w for _, w in b]),
                                    alone=False)
            for (s, w), wave in zip(batch, waves):
                if wave is None:
                    continue
                audio = s.vocoder.finish_audio(w, wave)
                if len(audio):
                    self.emit(AudioOut(s.name, audio, s.source_samples, s.captured_at))
                    if not s.input_ended:  # after it a reply runs ahead of real time (a continuation's 5 s in 0.5 s), not late
                        self._answered(time.monotonic(), s.captured_at)
        for s in list(self.sessions.values()):
            if s.vocoder.done and s.policy_ended and not s.decoding:
                with self.lock:
                    self.sessions.pop(s.name)
                    if s.decoder is not None:  # a stream's slot kept between its decodes
                        s.decoder.cancel(s.name)
                    if not s.source_ended:
                        self._close(s.name)
                    if self.vad is not None:
                        self.vad.close(s.name)
                    self.emit(End(s.name, s.pos, time.monotonic()))
                    self._successor(s)
                    self._release_waiters(s)

    # batching helpers ---------------------------------------------------------------------------------

    def _batches(self, jobs: list) -> list[list]:
        n = self.cfg.max_batch or len(jobs) or 1
        return [jobs[i : i + n] for i in range(0, len(jobs), n)]

    def _run_batch(self, stage: str, batch: list, fn, alone: bool = True) -> list:
        """One batched call; if it fails, each row alone, so that only the rows that fail alone fail
        (`alone=False`, for a call that changes its sessions' state: every row fails with it)."""
        t = time.perf_counter()
        try:
            out = fn(batch)
        except Exception as e:
            if not alone:
                log.exception("%s failed on a batch of %d sessions", stage, len(batch))
                for job in batch:
                    self._fail(job[0], f"{stage}: {type(e).__name__}: {e}")
                self._account(stage, [job[0] for job in batch], time.perf_counter() - t)
                return [None] * len(batch)
            out = []
            for job in batch:
                try:
                    (r,) = fn([job])
                except Exception as e:
                    log.warning("%s failed on session %s: %s", stage, job[0].name, e)
                    self._fail(job[0], f"{stage}: {type(e).__name__}: {e}")
                    r = None
                out.append(r)
        self._account(stage, [job[0] for job in batch], time.perf_counter() - t)
        return out

    def _account(self, stage: str, sessions: list[Session], seconds: float) -> None:
        """A batched call's time, shared equally by its rows (a session behind by several chunks has a row for each)."""
        self._total(stage, seconds)
        share, charged = seconds / max(1, len(sessions)), {}
        for s in sessions:
            charged[s] = charged.get(s, 0.0) + share
        self._charge(stage, charged, len(sessions))

    def _total(self, stage: str, seconds: float) -> None:
        self.compute[stage] = self.compute.get(stage, 0.0) + seconds

    def _charge(self, stage: str, charged: dict[Session, float], batch: int) -> None:
        """Each session's compute in a stage (its shares of calls of at most `batch` sessions)."""
        self.largest_batch[stage] = max(self.largest_batch.get(stage, 0), batch)
        now = time.monotonic()
        log_events = self.stats.json_log is not None
        for s, seconds in charged.items():
            st = self.stats.session(s.name)
            st.compute[stage] = st.compute.get(stage, 0.0) + seconds
            if log_events:
                self.stats.event(event="stage", stage=stage, session=s.name, batch=batch,
                                 compute_ms=round(1000 * seconds, 3), algorithmic_ms=round(1000 * self.algorithmic_s.get(stage, 0.0), 1),
                                 since_capture_ms=round(1000 * (now - s.captured_at), 3) if s.captured_at else None)

    @property
    def live_sessions(self) -> int:
        return len(self.sessions)


def build_engine(bundle: Bundle, task: str = "continuation", options: dict | None = None, *, chunk_ms: int = 100,
                 left_context_ms: int | None = 2000, lookahead_ms: int | None = 100, vocoder_lookahead: int | None = None,
                 vad: bool = False, seed: int = 0, stats: Stats | None = None, **kw) -> Engine:
    """The standard engine: chunker (+VAD) -> unit encoder -> task policy over the speech LM -> vocoder.
    None for a context means unbounded (everything before / until the end of input)."""
    if chunk_ms <= 0:
        raise ValueError(f"--chunk-ms must be > 0, got {chunk_ms}")
    sr = bundle.sample_rate
    frames = lambda ms: None if ms is None else sr * ms // 1000 // bundle.unit_hop
    cfg = EngineConfig(task, dict(options or {}), sr * chunk_ms // 1000, frames(left_context_ms), frames(lookahead_ms),
                       vocoder_lookahead, vad, seed, **kw)
    return Engine(bundle, cfg, stats)
