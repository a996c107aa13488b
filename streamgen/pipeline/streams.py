"""Per-session streaming state of the unit encoder and the vocoder, split into plan / finish so that
the engine can run the model once for every session that has work (a padded batch with lengths).

Each step is a window over the session's stream: `plan_*` says which input the model must see,
the engine runs the model on all sessions' windows together, `finish_*` keeps what is final and
drops what no later window needs. `push` / `flush` do the same for one session alone (the
reference the batched path must equal).

UnitStream: frame i of the conv extractor covers input samples [i*hop, i*hop + rf). When audio
arrives, the frames whose look-ahead is complete are encoded from a window that starts
`left_frames` frames earlier (aligned to the frame grid, so frame i is the same conv frame as
offline) and ends `lookahead_frames` after them. Transformer attention and the first layer's
GroupNorm see the whole window, so units agree with offline extraction only as far as the context
allows; with unbounded context (`left_frames=None`, `lookahead_frames=None`) everything is encoded
at the end in one pass and agreement is exact.

VocoderStream: a unit's duration is final once `dur_predictor.radius` later units are known. By
default its frames then go through the generator as streaming convolutions
(`models.streaming_conv`): every sample of every layer is computed once, and the audio equals
`CodeHiFiGAN.forward(all units)` exactly. With a `lookahead` of L frames instead, each chunk is
synthesised from a window of its frames with `frame_context()` frames before and L after, and
trimmed: a small L trades exactness at chunk edges for latency (and recomputes the context).
Memory stays bounded either way: only the context is kept.

LogMelUnitStream and SourceFilterStream do the same for the log-mel units and the source-filter
vocoder (`models.logmel_units`, `models.source_filter_vocoder`): units frame by frame as soon as a
frame's window is in; durations, then parameter frames once `frame_context()` later frames are
known (the parameter network runs on the stream, `models.streaming_conv.StreamingParams`, so no
frame is computed twice), then the samples between parameter frames. Both equal whole-utterance
processing, alone or in a batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.hubert import HubertEncoder
from ..models.kmeans import KMeansQuantizer, dedup_continuing
from ..models.logmel_units import LogMelUnits
from ..models.phone_units import PhoneUnits, next_window
from ..models.source_filter_vocoder import SourceFilterVocoder
from ..models.shapes import padded_batch
from ..models.streaming_conv import Slots, StreamingGenerator, StreamingParams
from ..models.vocoder import CodeHiFiGAN, check_units

Batched = Callable[[Tensor, Tensor], Tensor]  # (padded batch, lengths) -> result: a model call, or it captured (`models.captured`)


def _empty() -> tuple[Tensor, Tensor]:
    return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)


@dataclass
class EncodeWindow:
    wave: Tensor  # [n] samples the encoder reads
    first: int  # index in the window's frames of the first frame to keep
    count: int  # frames to keep
    end: int  # absolute frame index after the last kept one
    stream: EncoderStream | None = None  # the stream whose running statistics its frames follow (they normalise)


class EncoderStream(ABC):
    """Units of audio as it arrives. The engine batches sessions through `plan` (the window to
    encode now) and `finish` (its frames' units -> the new de-duplicated units); `push` / `flush`
    run them for one stream. The base keeps the input samples a later window may still read
    (`buf`, from sample index `b0`) and where planning and finishing stand, in frames."""

    def __init__(self, lead: Tensor | None = None):
        self.buf = torch.zeros(0) if lead is None else lead  # input samples from index b0 (`lead`: samples before the first)
        self.b0 = 0
        self.n_samples = 0
        self.n_planned = 0  # frames in windows already planned (the engine may plan several before finishing them)
        self.n_done = 0  # frames already turned into units
        self.last_unit: int | None = None  # for de-duplication across chunk edges

    def add(self, samples: Tensor) -> None:
        """More input samples."""
        self.buf = torch.cat([self.buf, samples.float().cpu().reshape(-1)])
        self.n_samples += samples.numel()

    def samples(self, start: int, end: int) -> Tensor:
        """The kept samples [start, end) (indices in the stream's input, from `b0` on)."""
        return self.buf[start - self.b0 : end - self.b0]

    @abstractmethod
    def plan(self, final: bool = False) -> EncodeWindow | None:
        """The window to encode now (None: nothing is final yet). `final`: the input has ended."""

    @abstractmethod
    def needed_from(self) -> int | None:
        """The first sample index a window still to plan may read, once the planned ones are finished
        (None: every sample, as with unlimited left context)."""

    def finish(self, window: EncodeWindow, frame_units: Tensor) -> tuple[Tensor, Tensor]:
        """frame_units [count]: the window's kept frames quantised -> (new de-duplicated units, their
        start frames). Windows finish in the order they were planned."""
        a, self.n_done = self.n_done, window.end
        keep = self.needed_from()
        if keep is not None:  # drop samples no later window needs (planned ones hold their own views)
            self.buf, self.b0 = self.buf[keep - self.b0 :], keep
        return self.new_units(frame_units.cpu(), a)

    @abstractmethod
    def encode_one(self, window: EncodeWindow) -> Tensor:
        """This stream's window through its batched encoding function, as a batch of one."""

    @torch.no_grad()
    def push(self, samples: Tensor) -> tuple[Tensor, Tensor]:
        """Add input samples; return (new de-duplicated units, their start frames)."""
        self.add(samples)
        return self._run(final=False)

    @torch.no_grad()
    def flush(self) -> tuple[Tensor, Tensor]:
        """End of input: the remaining frames, with whatever look-ahead there is."""
        return self._run(final=True)

    def new_units(self, frame_units: Tensor, first_frame: int) -> tuple[Tensor, Tensor]:
        """The next frames' units de-duplicated (a run that continues the stream's last unit is not
        repeated), with the absolute frame each one starts at."""
        units, idx = dedup_continuing(frame_units, self.last_unit)
        self.last_unit = int(frame_units[-1])
        return units, idx + first_frame

    def _run(self, final: bool) -> tuple[Tensor, Tensor]:
        """Every window there is to plan now (a stream may plan several, one after the other)."""
        units, starts = [_empty()[0]], [_empty()[1]]
        while (window := self.plan(final)) is not None:
            u, i = self.finish(window, self.encode_one(window))
            units.append(u)
            starts.append(i)
        return torch.cat(units), torch.cat(starts)


class UnitStream(EncoderStream):
    def __init__(self, hubert: HubertEncoder, quantizer: KMeansQuantizer, left_frames: int | None = 100, lookahead_frames: int | None = 5):
        super().__init__()
        self.hubert, self.quantizer = hubert, quantizer
        self.hop, self.rf = hubert.cfg.hop, hubert.cfg.receptive_field
        self.left, self.lookahead = left_frames, lookahead_frames

    def frames_available(self, n_samples: int) -> int:
        return max(0, (n_samples - self.rf) // self.hop + 1)

    def plan(self, final: bool = False) -> EncodeWindow | None:
        """The window to encode now (None: nothing is final yet). `final`: the input has ended."""
        if final:
            end = self.frames_available(self.n_samples)
        elif self.lookahead is None:
            return None
        else:
            end = self.frames_available(self.n_samples) - self.lookahead
        a = self.n_planned
        if end <= a:
            return None
        w0 = 0 if self.left is None else max(0, a - self.left)
        w1 = self.frames_available(self.n_samples)  # every frame the audio allows: the look-ahead
        wave = self.samples(w0 * self.hop, (w1 - 1) * self.hop + self.rf)
        self.n_planned = end
        return EncodeWindow(wave, a - w0, end - a, end)

    def needed_from(self) -> int | None:
        return None if self.left is None else max(0, self.n_done - self.left) * self.hop

    def encode_one(self, window: EncodeWindow) -> Tensor:
        return encode_windows(self.hubert, self.quantizer, [window])[0]


def encode_windows(hubert: HubertEncoder, quantizer: KMeansQuantizer, windows: list[EncodeWindow],
                   frame_units: Batched | None = None) -> list[Tensor]:
    """Frame units of every window's kept frames: one padded HuBERT call with lengths, one k-means call.
    `frame_units(wave, lengths)` (`window_units` captured: the engine's on a GPU): the units of every frame of
    the padded batch in one call, the kept ones read on the host."""
    p = next(hubert.parameters())
    wave, lengths = padded_batch([w.wave for w in windows], 16 * hubert.cfg.hop, 0.0, p.device)  # (extra rows: silence)
    padded = wave.shape[0] > 1 or wave.shape[1] > len(windows[0].wave)
    if frame_units is not None and padded:
        units = frame_units(wave.to(p.dtype), lengths).cpu()  # one read back per call
        return [units[i, w.first : w.first + w.count] for i, w in enumerate(windows)]
    feats = hubert(wave.to(p.dtype), lengths=lengths if padded else None)
    kept = torch.cat([feats[i, w.first : w.first + w.count] for i, w in enumerate(windows)])
    return list(quantizer(kept).cpu().split([w.count for w in windows]))


def window_units(hubert: HubertEncoder, quantizer: KMeansQuantizer) -> Batched:
    """(wave [B, T], lengths [B]) -> the unit of every frame [B, F]: a padded batch's whole encoding in one
    call whose work follows its shapes only (what `CapturedCall` captures)."""
    return lambda wave, lengths: quantizer(hubert(wave, lengths=lengths))


@dataclass
class DurationWindow:
    units: Tensor  # [n] units the duration predictor reads
    first: int
    count: int


@dataclass
class AudioWindow:
    frames: Tensor  # [n] unit id per frame the generator reads
    first: int  # frames to trim at the left
    count: int  # frames of audio to keep
    ended: bool = False  # (streaming) these are the last frames


class TimedUnitStream(ABC):
    """Units as they arrive, timed into frames (one unit id per hop) by the vocoder's duration
    predictor: a duration is final once `dur_predictor.radius` later units are known. Subclasses
    turn the frames into audio (`plan_audio` / `finish_audio`, `synthesise_one`); the engine batches
    both stages across sessions through `plan_*` / `finish_*`, and `push` / `flush` run them for one."""

    def __init__(self, model, num_units: int):
        self.model = model
        self.num_units = num_units
        self.unit_radius = model.dur_predictor.radius if model.dur_predictor is not None else 0
        self.units = torch.empty(0, dtype=torch.long)  # units from absolute index u0
        self.u0 = 0
        self.n_units = 0  # units received
        self.n_timed = 0  # units whose durations are final
        self.frames = torch.empty(0, dtype=torch.long)  # frame unit ids from absolute frame f0
        self.f0 = 0
        self.n_frames = 0
        self.ended = False  # no more units
        self.waiting: list[Tensor] = []  # timed frames after units not yet timed (those end where they begin)

    def add(self, units: Tensor) -> None:
        if self.waiting and units.numel():
            raise ValueError("units cannot follow timed frames that wait for earlier units' durations")
        check_units(units, self.num_units)
        self.units = torch.cat([self.units, units.cpu().long()])
        self.n_units += units.numel()

    def add_frames(self, frames: Tensor) -> None:
        """Units already timed (one id per frame, e.g. the source's own durations): they follow the
        frames made so far without going through the duration predictor. Units still waiting for
        their durations are timed first, as a sequence that ends there (as `durations` would time
        them alone), and the frames wait for them."""
        check_units(frames, self.num_units)
        frames = frames.cpu().long()
        if self.n_timed == self.n_units and not self.waiting:
            self.frames = torch.cat([self.frames, frames])
            self.n_frames += frames.numel()
        else:
            self.waiting.append(frames)

    def end(self) -> None:
        """No more units: the last durations and frames become final."""
        self.ended = True

    def plan_durations(self) -> DurationWindow | None:
        end = self.n_units if self.ended or self.waiting else self.n_units - self.unit_radius
        a, r = self.n_timed, self.unit_radius
        if end <= a:
            return None
        lo, hi = max(0, a - r), min(self.n_units, end + r)
        return DurationWindow(self.units[lo - self.u0 : hi - self.u0], a - lo, end - a)

    def finish_durations(self, window: DurationWindow, dur: Tensor) -> None:
        """dur [count]: durations of the window's kept units."""
        new = torch.repeat_interleave(window.units[window.first : window.first + window.count], dur.cpu())
        self.frames = torch.cat([self.frames, new])
        self.n_frames += new.numel()
        self.n_timed += window.count
        keep = max(0, self.n_timed - self.unit_radius)  # left context the next window needs
        self.units, self.u0 = self.units[keep - self.u0 :], keep
        if self.waiting and self.n_timed == self.n_units:  # the frames that waited for these units
            waiting, self.waiting = torch.cat(self.waiting), []
            self.frames = torch.cat([self.frames, waiting])
            self.n_frames += waiting.numel()

    @abstractmethod
    def plan_audio(self) -> AudioWindow | None:
        """The frames whose audio can be made now (None: nothing to do)."""

    @abstractmethod
    def finish_audio(self, window: AudioWindow, out) -> Tensor:
        """What the synthesis returned for the window -> the new audio."""

    @abstractmethod
    def synthesise_one(self, window: AudioWindow):
        """This stream's window through its batched synthesis function, as a batch of one."""

    @torch.no_grad()
    def push(self, units: Tensor) -> Tensor:
        """Add units [n]; return the audio that is now final (possibly empty)."""
        self.add(units)
        return self._run()

    @torch.no_grad()
    def flush(self) -> Tensor:
        """End of stream: return all remaining audio."""
        self.end()
        return self._run()

    def _run(self) -> Tensor:
        w = self.plan_durations()
        if w is not None:
            (dur,) = time_windows(self.model, [w])
            self.finish_durations(w, dur)
        w = self.plan_audio()
        if w is None:
            return torch.empty(0)
        return self.finish_audio(w, self.synthesise_one(w))


class VocoderStream(TimedUnitStream):
    """CodeHiFiGAN synthesis of units as they arrive, in chunks that concatenate to
    `CodeHiFiGAN.forward(all units)`."""

    def __init__(self, model: CodeHiFiGAN, lookahead: int | None = None, graph: StreamingGenerator | None = None):
        super().__init__(model, model.cfg.num_embeddings)
        self.context = model.frame_context()
        self.lookahead = self.context if lookahead is None else lookahead
        # exact by default: the generator's convolutions run on the stream (one graph per model, shared)
        self.graph = (graph or StreamingGenerator(model)) if lookahead is None else None
        self.gen = self.graph.new_stream() if self.graph is not None else None
        self.emitted = 0  # frames whose audio has been returned

    def plan_audio(self) -> AudioWindow | None:
        final = self.ended and self.n_timed == self.n_units
        if self.gen is not None:  # streaming: every frame that has its duration, once
            if self.gen.ended or (self.emitted == self.n_frames and not final):
                return None
            return AudioWindow(self.frames[self.emitted - self.f0 :], 0, self.n_frames - self.emitted, final)
        end = self.n_frames if final else self.n_frames - self.lookahead
        a = self.emitted
        if end <= a:
            return None
        lo, hi = max(0, a - self.context), min(self.n_frames, end + self.lookahead)
        return AudioWindow(self.frames[lo - self.f0 : hi - self.f0], a - lo, end - a)

    def finish_audio(self, window: AudioWindow, wave: Tensor) -> Tensor:
        """wave: the window's synthesis (at least its first (first + count) * hop samples) -> the new audio."""
        self.emitted += window.count
        if self.gen is not None:  # the streaming generator returns just the new audio
            self.frames, self.f0 = self.frames[self.emitted - self.f0 :], self.emitted
            return wave
        hop = self.model.hop
        out = wave[window.first * hop : (window.first + window.count) * hop]
        keep = max(0, self.emitted - self.context)
        self.frames, self.f0 = self.frames[keep - self.f0 :], keep
        return out

    def synthesise_one(self, window: AudioWindow) -> Tensor:
        return synthesise([self], [window])[0]

    @property
    def done(self) -> bool:
        finished = self.ended and self.n_timed == self.n_units and self.emitted == self.n_frames
        return finished and (self.gen is None or self.gen.ended)


def _pad(seqs: list[Tensor], device) -> tuple[Tensor, Tensor]:
    """Unit ids per row -> [B, width] padded with 0 and the lengths, built on the host and moved without
    waiting for the device (on a GPU, two asynchronous copies per call instead of a blocking one per row)."""
    return padded_batch([s.cpu() for s in seqs], 16, 0, device)  # (extra rows: unit 0)


def time_windows(model: CodeHiFiGAN, windows: list[DurationWindow], durations: Batched | None = None) -> list[Tensor]:
    """Durations of every window's kept units: one padded duration-predictor call (`durations(units, lengths)`:
    `model.durations` captured, the engine's on a GPU)."""
    dev = model.dict.weight.device
    units, lengths = _pad([w.units for w in windows], dev)
    padded = len(windows) > 1 or units.shape[1] > len(windows[0].units)
    dur = ((durations or model.durations)(units, lengths) if padded else model.durations(units)).cpu()  # one read back per call
    return [dur[i, w.first : w.first + w.count] for i, w in enumerate(windows)]


def synthesise(streams: list[VocoderStream], windows: list[AudioWindow], generate: Batched | None = None) -> list[Tensor]:
    """Audio of every stream's window in one batched call (streaming convolutions, or windows: see
    `synthesise_windows`)."""
    if streams[0].gen is not None:
        return streams[0].graph.step([s.gen for s in streams], [w.frames for w in windows], [w.ended for w in windows])
    return synthesise_windows(streams[0].model, windows, generate)


def synthesise_windows(model: CodeHiFiGAN, windows: list[AudioWindow], generate: Batched | None = None) -> list[Tensor]:
    """Audio of every window: one padded generator call with lengths, trimmed per row (`generate(frames,
    lengths)`: `model.generate` captured, the engine's on a GPU)."""
    dev = model.dict.weight.device
    frames, lengths = _pad([w.frames for w in windows], dev)
    padded = len(windows) > 1 or frames.shape[1] > len(windows[0].frames)
    wave = ((generate or model.generate)(frames, lengths) if padded else model.generate(frames)).float().cpu()
    hop = model.hop
    return [wave[i, : len(w.frames) * hop] for i, w in enumerate(windows)]


class LogMelUnitStream(EncoderStream):
    """Log-mel units as audio arrives, equal to `LogMelUnits.encode` of the whole input (plan / finish
    as `UnitStream`; frame i needs samples up to (i+1)*hop + pad)."""

    def __init__(self, encoder: LogMelUnits):
        c = encoder.cfg
        super().__init__(lead=torch.zeros(c.pad))  # indices are the padded input's: the left zero padding first
        self.encoder = encoder
        self.hop, self.pad, self.win = c.hop, c.pad, c.win
        self.padded = False
        self.norm_state = encoder.start_norm() if encoder.normalises else None

    def plan(self, final: bool = False) -> EncodeWindow | None:
        if final:
            end = self.n_samples // self.hop
            if not self.padded:  # the zeros after the audio, as whole-utterance encoding pads
                need = end * self.hop + 2 * self.pad
                self.buf = torch.nn.functional.pad(self.buf, (0, max(0, need - self.b0 - len(self.buf))))
                self.padded = True
        else:
            end = max(0, (self.n_samples - self.pad) // self.hop)
        a = self.n_planned
        if end <= a:
            return None
        wave = self.samples(a * self.hop, (end - 1) * self.hop + self.win)
        self.n_planned = end
        return EncodeWindow(wave, 0, end - a, end, self if self.norm_state is not None else None)

    def needed_from(self) -> int | None:
        return self.n_planned * self.hop  # padded index where the next window to plan starts

    def encode_one(self, window: EncodeWindow) -> Tensor:
        return encode_logmel_windows(self.encoder, [window])[0]


def encode_logmel_windows(encoder: LogMelUnits, windows: list[EncodeWindow]) -> list[Tensor]:
    """Frame units of every window: all windows' frames in one log-mel call (a padded batch: each frame reads
    its own samples only) and one k-means call. A stream that normalises has its windows' frames normalised
    in the order they were planned, its running statistics kept only once every window is encoded (a batch
    that fails, retried a row at a time, starts from the same statistics)."""
    dev = encoder.fb.device
    wave, _ = padded_batch([w.wave.float() for w in windows], 16 * encoder.cfg.hop, 0.0, dev)  # (extra rows: silence)
    batch = encoder.frame_features(wave, max(w.count for w in windows))  # [rows, frames, n_mels]
    feats, states = [], {}
    for row, w in enumerate(windows):
        f = batch[row, : w.count]
        if w.stream is not None:
            f, states[w.stream] = encoder.normalise(f, states.get(w.stream, w.stream.norm_state))
        feats.append(f)
    units = encoder.quantize(torch.cat(feats)).cpu().split([w.count for w in windows])
    for stream, state in states.items():
        stream.norm_state = state
    return list(units)


class PhoneUnitStream(EncoderStream):
    """The bundle's units read through the phone recogniser as audio arrives (`models.phone_units`):
    each window of `PhoneUnits.read`'s definition is planned as soon as its look-ahead is in, so the
    units equal `PhoneUnits.read` of the whole input whatever the chunking, and a batch equals each
    stream alone."""

    def __init__(self, reader: PhoneUnits, logmel: LogMelUnits):
        super().__init__()
        self.reader, self.logmel = reader, logmel
        c = reader.cfg
        self.hop, self.left, self.lookahead, self.stride = c.hop, c.left, c.lookahead, c.stride

    def plan(self, final: bool = False) -> EncodeWindow | None:
        span = next_window(self.n_planned, self.n_samples // self.hop, final, self.left, self.lookahead, self.stride)
        if span is None:
            return None
        w0, a, count, w1 = span
        self.n_planned = a + count
        return EncodeWindow(self.samples(w0 * self.hop, w1 * self.hop), a - w0, count, a + count)

    def needed_from(self) -> int | None:
        return max(0, self.n_planned - self.left) * self.hop  # where the next window to plan starts

    def encode_one(self, window: EncodeWindow) -> Tensor:
        return encode_phone_windows(self.reader, self.logmel, [window])[0]


def encode_phone_windows(reader: PhoneUnits, logmel: LogMelUnits, windows: list[EncodeWindow]) -> list[Tensor]:
    """Frame units of every window's kept frames: windows of equal length in one batched call each."""
    units = reader.frame_units([w.wave for w in windows], logmel)
    return [u[w.first : w.first + w.count] for u, w in zip(units, windows)]


class SourceFilterStream(TimedUnitStream):
    """Source-filter synthesis of units as they arrive; the chunks concatenate to
    `SourceFilterVocoder.forward(all units)`. A frame's parameters are final once `frame_context()`
    later frames are known, and a segment's samples once the parameter frame after it is.
    """

    def __init__(self, model: SourceFilterVocoder, graph: StreamingParams | None = None):
        super().__init__(model, model.cfg.num_units)
        self.context = model.frame_context()
        self.graph = graph or StreamingParams(model)  # one per model, shared by every stream
        self.params = self.graph.new_stream()
        self.n_fed = 0  # frames fed to the parameter network
        self.pending: Tensor | None = None  # parameter frames not yet past their last segment [m, n_params]
        self.segment = 0  # absolute index of pending's first segment
        self.turns = 0
        self.started = False
        self.finished = False  # the last samples are out

    def plan_audio(self) -> AudioWindow | None:
        """The frames timed since the last call, for the parameter network (which keeps its own
        context), and whether they are the last."""
        final = self.ended and self.n_timed == self.n_units
        if self.finished or (self.n_fed == self.n_frames and not final):
            return None
        return AudioWindow(self.frames[self.n_fed - self.f0 :], 0, self.n_frames - self.n_fed, final)

    def finish_audio(self, window: AudioWindow, out: tuple[Tensor, Tensor | None, int]) -> Tensor:
        """out: (the window's new samples, the parameter frames still pending, the phase after them)."""
        wave, pending, turns = out
        h = self.model.cfg.h
        self.n_fed += window.count
        self.frames, self.f0 = self.frames[self.n_fed - self.f0 :], self.n_fed
        if pending is None:  # nothing to render yet
            self.finished = window.ended
            return wave
        self.segment += len(wave) // h
        self.pending, self.turns = pending, turns
        if not self.started and len(wave):
            wave, self.started = wave[h // 2 :], True
        if window.ended:
            wave, self.finished = wave[: len(wave) - h // 2], True
        return wave

    def synthesise_one(self, window: AudioWindow) -> tuple[Tensor, Tensor | None, int]:
        return synthesise_source_filter([self], [window])[0]

    @property
    def done(self) -> bool:
        return self.finished


@dataclass
class VocoderStreams:
    """A maker of a bundle's vocoder streams (call it), every stream sharing one streaming graph, whose slot
    tensors (`slots`; None for windowed synthesis) hold every live stream's state."""

    make: Callable[[], TimedUnitStream]
    slots: Slots | None

    def __call__(self) -> TimedUnitStream:
        return self.make()


def vocoder_streams(vocoder: SourceFilterVocoder | CodeHiFiGAN, lookahead: int | None = None, graphs: bool = True) -> VocoderStreams:
    """The streams of a bundle's unit vocoder (`Bundle.unit_vocoder`), every stream sharing one copy of
    its streaming weights: `SourceFilterStream` for the source-filter vocoder (always exact),
    `VocoderStream` for a CodeHiFiGAN (exact, or windowed with `lookahead` frames; on CUDA with `graphs`, the
    streaming convolutions' steps replayed as CUDA graphs)."""
    if isinstance(vocoder, SourceFilterVocoder):
        if lookahead is not None:
            raise ValueError("--vocoder-lookahead applies to CodeHiFiGAN vocoders; this bundle's source-filter vocoder is always exact")
        params = StreamingParams(vocoder)
        return VocoderStreams(lambda: SourceFilterStream(vocoder, params), params.slots)
    graph = StreamingGenerator(vocoder, graphs=graphs) if lookahead is None else None
    return VocoderStreams(lambda: VocoderStream(vocoder, lookahead, graph), graph.slots if graph is not None else None)


def synthesise_source_filter(streams: list[SourceFilterStream], windows: list[AudioWindow]) -> list[tuple[Tensor, Tensor | None, int]]:
    """Every stream's new frames through the parameter network on streams in one batched step, then
    every stream's new segments (its pending parameter frames and the new ones) in one padded render
    call with per-row noise positions and phases. Per stream: (new samples, parameter frames left
    pending, phase after them)."""
    model = streams[0].model
    dev, h = model.dict.weight.device, model.cfg.h
    todo = [i for i, (s, w) in enumerate(zip(streams, windows)) if (w.count or w.ended) and not s.params.ended]
    new: dict[int, Tensor] = {}
    if todo:
        got = streams[0].graph.step([streams[i].params for i in todo], [windows[i].frames for i in todo], [windows[i].ended for i in todo])
        new = {i: p for i, p in zip(todo, got) if len(p)}
    seqs: list[Tensor | None] = []
    for i, (s, w) in enumerate(zip(streams, windows)):
        q = s.pending
        if i in new:
            q = torch.cat([new[i][:1], new[i]]) if q is None else torch.cat([q, new[i]])  # P'_0 = P_0
        if q is not None and w.ended:
            q = torch.cat([q, q[-1:]])  # P'_{P+1} = P_{P-1}
        seqs.append(q)
    rows = [i for i, q in enumerate(seqs) if q is not None and len(q) >= 2]
    out: list[tuple[Tensor, Tensor | None, int]] = [(torch.zeros(0), q, s.turns) for q, s in zip(seqs, streams)]
    if rows:
        longest = max(len(seqs[i]) for i in rows)
        p = torch.stack([torch.cat([seqs[i], seqs[i][-1:].expand(longest - len(seqs[i]), -1)]) for i in rows])
        segments = torch.tensor([len(seqs[i]) - 1 for i in rows], device=dev)
        f0, voiced = model.source(p)
        s0 = torch.tensor([streams[i].segment for i in rows], device=dev)
        turns0 = torch.tensor([streams[i].turns for i in rows], device=dev)
        wave, turns = model.render(p, f0, voiced, s0=s0, turns0=turns0, segments=segments)
        wave, turns = wave.float().cpu(), turns.tolist()
        for row, i in enumerate(rows):
            m = len(seqs[i]) - 1
            out[i] = (wave[row, : m * h], seqs[i][-1:], turns[row])
    return out
