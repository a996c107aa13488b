"""Pipeline stages. Each holds per-session state and maps one input item to output items; model
compute happens here, in the stage's worker thread, never on the event loop.

    Chunker -> UnitEncoder -> Generator -> Vocoder

Items a stage does not handle pass through unchanged; `End` flushes and frees the session.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from ..bundle import Bundle
from ..models.generation import Sampling
from ..models.prompt import DeepPrompt, load_prompt
from ..models.vocoder import VocoderStream
from .tasks import TaskPlugin, load_task
from .items import AudioChunk, AudioOut, Control, End, Item, TargetUnits, UnitChunk
from .policies import Policy, UnitDecoder
from .units import UnitStream

log = logging.getLogger("streamgen")


class Stage:
    name = "stage"
    wait_s = 0.0  # algorithmic latency: audio this stage must wait for before it can emit


    def process(self, item: Item) -> Iterator[Item]:
        yield item

    def close(self, session: str) -> None:
        """Forget a session's state (after End, or when it failed)."""


class StreamStage(Stage):
    """A stage holding one streaming state per session: items of type `accepts` feed it, `End`
    flushes and frees it, anything else passes through."""

    accepts: type = object

    def __init__(self):
        self.streams: dict[str, object] = {}

    def new_stream(self, session: str):
        raise NotImplementedError

    def feed(self, stream, item) -> Iterator[Item]:
        raise NotImplementedError

    def flush(self, stream, end: End) -> Iterator[Item]:
        raise NotImplementedError

    def process(self, item: Item) -> Iterator[Item]:
        s = item.session
        if isinstance(item, self.accepts):
            if s not in self.streams:
                self.streams[s] = self.new_stream(s)
            yield from self.feed(self.streams[s], item)
        elif isinstance(item, End):
            stream = self.streams.pop(s, None)
            if stream is not None:
                yield from self.flush(stream, item)
            yield item
        else:
            yield item

    def close(self, session: str) -> None:
        self.streams.pop(session, None)


class Chunker(Stage):
    """Re-blocks input audio into fixed chunks; with a VAD, ends the input after trailing silence."""

    name = "chunker"

    def __init__(self, chunk_samples: int, vad: Vad | None = None, sample_rate: int = 16000):
        self.chunk = chunk_samples
        self.wait_s = chunk_samples / sample_rate  # filling one chunk
        self.vad = vad
        self.buf: dict[str, torch.Tensor] = {}
        self.pos: dict[str, int] = {}  # samples emitted per session
        self.seq: dict[str, int] = {}
        self.ended: set[str] = set()  # ended by the VAD: later input is ignored

    def process(self, item: Item) -> Iterator[Item]:
        s = item.session
        if isinstance(item, AudioChunk):
            if s in self.ended:
                return
            buf = torch.cat([self.buf.get(s, torch.zeros(0)), item.samples])
            while len(buf) >= self.chunk:
                yield from self._emit(s, buf[: self.chunk], item.captured_at)
                buf = buf[self.chunk :]
                if s in self.ended:
                    return
            self.buf[s] = buf
        elif isinstance(item, End):
            if s not in self.ended:
                rest = self.buf.get(s)
                if rest is not None and len(rest):
                    yield from self._emit(s, rest, item.captured_at)
                if s not in self.ended:
                    yield End(s, self.pos.get(s, 0), item.captured_at)
            self.close(s)
            self.ended.discard(s)
        else:
            yield item

    def _emit(self, s: str, samples: torch.Tensor, captured_at: float) -> Iterator[Item]:
        start = self.pos.get(s, 0)
        seq = self.seq.get(s, 0)
        self.pos[s], self.seq[s] = start + len(samples), seq + 1
        yield AudioChunk(s, seq, samples, start, captured_at)
        if self.vad is not None and self.vad.ended(s, samples):
            self.ended.add(s)
            yield End(s, self.pos[s], captured_at)

    def close(self, session: str) -> None:
        for d in (self.buf, self.pos, self.seq):
            d.pop(session, None)
        if self.vad is not None:
            self.vad.close(session)


class Vad:
    """silero-vad (its weights ship in its package): the input ends after `silence_ms` of silence
    that follows speech."""

    def __init__(self, sample_rate: int = 16000, silence_ms: int = 700, threshold: float = 0.5):
        try:
            from silero_vad import load_silero_vad
        except ImportError:
            raise RuntimeError("VAD needs silero-vad: pip install 'streamgen[vad]'") from None
        if sample_rate != 16000:
            raise ValueError("the VAD runs at 16 kHz")
        self.model = load_silero_vad()
        self.window = 512
        self.silence = int(silence_ms * sample_rate / 1000)
        self.threshold = threshold
        self.state: dict[str, dict] = {}

    @torch.no_grad()
    def ended(self, session: str, samples: torch.Tensor) -> bool:
        st = self.state.setdefault(session, {"buf": torch.zeros(0), "speech": False, "quiet": 0})
        buf = torch.cat([st["buf"], samples])
        while len(buf) >= self.window:
            # one model per process, sessions interleave: reset its recurrent state per session window
            # (each 32 ms window is scored on its own, which is how the speech/silence decision is used here)
            self.model.reset_states()
            p = float(self.model(buf[: self.window], 16000))
            buf = buf[self.window :]
            if p >= self.threshold:
                st["speech"], st["quiet"] = True, 0
            elif st["speech"]:
                st["quiet"] += self.window
        st["buf"] = buf
        return st["speech"] and st["quiet"] >= self.silence

    def close(self, session: str) -> None:
        self.state.pop(session, None)


class UnitEncoder(StreamStage):
    name = "encoder"
    accepts = AudioChunk

    def __init__(self, bundle: Bundle, left_frames: int | None = 100, lookahead_frames: int | None = 5):
        super().__init__()
        self.hubert, self.quantizer = bundle.need("hubert"), bundle.need("kmeans")
        self.left, self.lookahead = left_frames, lookahead_frames
        cfg = self.hubert.cfg
        # a frame needs its receptive field, then `lookahead` more frames (unbounded: the whole input)
        self.wait_s = float("inf") if lookahead_frames is None else ((cfg.receptive_field - cfg.hop) + lookahead_frames * cfg.hop) / cfg.sample_rate

    def new_stream(self, session: str) -> UnitStream:
        return UnitStream(self.hubert, self.quantizer, self.left, self.lookahead)

    def feed(self, stream: UnitStream, item: AudioChunk) -> Iterator[Item]:
        units, frames = stream.push(item.samples)
        if len(units):
            yield UnitChunk(item.session, units, frames, item.start + len(item.samples), item.captured_at)

    def flush(self, stream: UnitStream, end: End) -> Iterator[Item]:
        units, frames = stream.flush()
        if len(units):
            yield UnitChunk(end.session, units, frames, end.source_samples, end.captured_at)


class Generator(StreamStage):
    """Runs each session's task policy over the prompt-conditioned Unit mBART."""

    name = "generator"
    accepts = UnitChunk

    def __init__(self, bundle: Bundle, task: str = "continuation", options: dict | None = None, seed: int | None = 0):
        super().__init__()
        self.bundle = bundle
        self.mbart = bundle.need("mbart")
        self.default = (task, options or {})
        self.seed = seed
        self.prompts: dict[str, DeepPrompt | None] = {}  # one per task, shared by all its sessions
        load_task(task).resolve_options(options or {})  # unknown task or option: fail before any audio

    def prompt_for(self, plugin: TaskPlugin) -> DeepPrompt | None:
        if plugin.name not in self.prompts:
            if plugin.prompt is not None:
                prompt = load_prompt(plugin.prompt, self.mbart.cfg).to(self.bundle.device)
            else:
                prompt = self.bundle.prompts.get(plugin.name)
            if prompt is None:
                log.warning("no trained prompt for task %r in this bundle: using the unprompted backbone", plugin.name)
            self.prompts[plugin.name] = prompt
        return self.prompts[plugin.name]

    def start(self, session: str, task: str, options: dict) -> Policy:
        plugin = load_task(task)
        opts = plugin.resolve_options(options)
        prompt = self.prompt_for(plugin) if plugin.uses_lm else None
        decoder = UnitDecoder(self.mbart, prompt.shared_kv(self.mbart) if prompt else None,
                              Sampling(**plugin.sampling), plugin.prefix_tokens, self.seed)
        return plugin.make_policy(decoder, opts)

    def new_stream(self, session: str) -> Policy:
        return self.start(session, *self.default)

    def process(self, item: Item) -> Iterator[Item]:
        if isinstance(item, Control):
            s = item.session
            if s in self.streams and item.action == "start":
                raise ValueError(f"session {s!r} already started")
            self.streams[s] = self.start(s, item.task or self.default[0], item.options if item.task else {**self.default[1], **item.options})
        else:
            yield from super().process(item)

    def feed(self, policy: Policy, item: UnitChunk) -> Iterator[Item]:
        for units in policy.on_source(item.units, item.frames, item.source_samples):
            yield TargetUnits(item.session, units, item.source_samples, item.captured_at)

    def flush(self, policy: Policy, end: End) -> Iterator[Item]:
        for units in policy.on_end():
            yield TargetUnits(end.session, units, end.source_samples, end.captured_at)


class Vocoder(StreamStage):
    name = "vocoder"
    accepts = TargetUnits

    def __init__(self, bundle: Bundle, lookahead: int | None = None):
        super().__init__()
        self.model = bundle.need("vocoder")
        self.lookahead = lookahead
        frames = self.model.frame_context() if lookahead is None else lookahead
        self.wait_s = frames * self.model.hop / bundle.sample_rate  # frames of output it holds back

    def new_stream(self, session: str) -> VocoderStream:
        return VocoderStream(self.model, self.lookahead)

    def feed(self, stream: VocoderStream, item: TargetUnits) -> Iterator[Item]:
        audio = stream.push(item.units)
        if len(audio):
            yield AudioOut(item.session, audio.float().cpu(), item.source_samples, item.captured_at)

    def flush(self, stream: VocoderStream, end: End) -> Iterator[Item]:
        audio = stream.flush()
        if len(audio):
            yield AudioOut(end.session, audio.float().cpu(), end.source_samples, end.captured_at)
