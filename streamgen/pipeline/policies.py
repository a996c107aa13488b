"""Decoding policies: when a task speaks, and what it commits. Policies decide; the engine decodes.

A policy sees a session's source units as they become final (`on_source`) and the end of its
input (`on_end`), and answers with a `Decision` (or None): units to speak now, and/or a decode to
run. The engine runs every session's decodes together (`models.generation.Decoder`) and hands the
units back through `on_decoded` as they come (those of a tick's decoder steps together, and the last
ones with the step that ends the decode); with `emit_every` > 0 they are spoken in chunks of
at least that many while decoding goes on, else all at once when the decode is done (`decoded`); a policy
may override `on_decoded` to speak them as soon as it knows they are final. One decode
per session is in flight at a time; the session's next source units wait for it.

Building blocks for task plugins:

- `Resynthesis`: speak the source units back as they arrive (no language model), in the talker's
  own timing (each unit held for the frames the encoder gave it) or with the vocoder's durations.
- `Continuation`: listen until the input ends, then speak; streams every `emit_every` units. Only
  the most recent `context` units of a long input are kept (the model's window).
- `WaitK`: simultaneous; every `chunk_ms` of source, may commit up to ratio * (source units - k).
- `LocalAgreement`: simultaneous; every `chunk_ms`, decode a full hypothesis (or at most `lookahead`
  units of it) and commit the prefix it shares with the previous hypothesis (LA-2), spoken as soon
  as the hypothesis parts from the previous one.
  Both speak their decodes' units as they come (not when the decode is done), and all of a
  segment's closing decode.
  Both simultaneous policies translate a long input segment by segment: a segment closes at a pause
  (a unit held for `pause_ms`, or the encoder's quiet units in a row as long: silence over a noise
  floor maps to several units) once it has `min_segment` units, or at `max_segment`
  units; its translation is finished, then the next segment starts from the units after the cut.
  On a backbone trained to stream, wait-k also closes a segment where the model has ended a sentence
  (</s> before the schedule's end) and a pause follows: sentences run together are all said.
- `Inpainting`: the encoder reads the input with a masked time span's units replaced by one <mask>;
  the context before the span is spoken as it becomes final, the model fills the gap continuing it,
  and the context after the span follows (or, context="regenerate", the model says it all again);
  an input longer than the model's context is refused as soon as it exceeds it.

An encoder-decoder re-encodes a grown source, which changes every cross-attention input, so each
decision re-encodes the source and re-runs the decoder over the committed units in one prefill pass;
a backbone trained to stream (a causal encoder, decoder positions limited to the wait-k schedule)
needs neither: its decisions resume one decode (`models.generation`).

A plugin's own policy subclasses `Policy` and returns `self.speak(units)`, `self.decode(...)` or
None from its hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..models.generation import Request, Sampling, decoder_prefix
from ..models.unit_mbart import EOS, UNIT_OFFSET, PromptKV, UnitMBartConfig, units_to_source


class UnitDecoder:
    """A task's view of the speech LM for one session: its config, the task's shared prompt, its
    sampling settings and forced tokens; it turns a policy's wish into a decode `Request`."""

    def __init__(self, cfg: UnitMBartConfig, prompt: PromptKV | None = None, sampling: Sampling = Sampling(),
                 prefix_tokens: tuple[int, ...] = (), seed: int = 0, quiet: Tensor | None = None):
        self.cfg, self.prompt, self.sampling = cfg, prompt, sampling
        self.quiet = quiet  # [num_units] bool: units the encoder gives to silence and noise (None: unknown)
        self.prefix_tokens = tuple(prefix_tokens)
        self.seed = seed
        self.requests = 0

    @property
    def max_units(self) -> int:
        """The longest source the encoder takes (positions minus </s>)."""
        return self.cfg.max_positions - 1

    @property
    def max_new(self) -> int:
        """The most units one decode can produce (decoder positions minus the forced prefix)."""
        return self.cfg.max_positions - 1 - len(self.prefix_tokens)

    @property
    def streams(self) -> bool:
        """The backbone was trained to stream under wait-k (see `UnitMBartConfig.wait_k`)."""
        return self.cfg.streams

    def decodable(self, source_units: int) -> int:
        """A streaming backbone: how many units its schedule lets follow this many source units."""
        return self.cfg.decodable(source_units) - len(self.prefix_tokens)

    def request(self, source: Tensor, committed: Tensor, max_new: int, min_new: int = 0, tokens: Tensor | None = None,
                complete: bool = True) -> Request:
        """Decode up to `max_new` units continuing `committed`, given the source units (stops at
        </s>, never before `min_new`). `tokens` overrides the encoder input (e.g. a source with a <mask>).
        complete=False: more source will follow; a streaming backbone reads it without </s> and
        decodes only as far as its schedule has read (the engine then resumes the same decode)."""
        if tokens is not None:
            src = tokens.cpu()
        elif self.streams and not complete:
            src = source.cpu().long() + UNIT_OFFSET
        else:
            src = units_to_source(source.cpu())
        if len(src) > self.cfg.max_positions:
            raise ValueError(f"source of {len(src) - 1} units exceeds the model's {self.max_units}-unit context")
        self.requests += 1
        return Request(src, decoder_prefix(self.prefix_tokens, committed), max_new, min_new, self.sampling, self.prompt,
                       seed=(self.seed * 1_000_003 + self.requests) & 0xFFFFFFFF, complete=complete or tokens is not None)


@dataclass
class Decision:
    commit: Tensor | None = None  # units to speak now
    decode: Request | None = None  # then run this decode; its units come to `on_decoded`
    # the commit's timing when the policy knows it (the source's own): one unit id per vocoder frame,
    # continuing the frames given before (it may lengthen the previous unit's run); None: the
    # vocoder predicts the committed units' durations
    frames: Tensor | None = None
    timed_from: int = 0  # with `frames`: the commit's units before this index are timed by the vocoder


def _units(xs) -> Tensor:
    return torch.as_tensor(xs, dtype=torch.long).reshape(-1)


def then(a: Decision | None, b: Decision | None) -> Decision | None:
    """One decision that speaks a's units, then b's, and then runs b's decode (a has none). Timed
    units may follow untimed ones (`timed_from`), not the other way round."""
    if a is None or b is None:
        return a or b
    if a.decode is not None:
        raise ValueError("then(a, b): a's decode would run before b's units are spoken")
    empty = torch.zeros(0, dtype=torch.long)
    ca, cb = (a.commit if a.commit is not None else empty), (b.commit if b.commit is not None else empty)
    commit = torch.cat([ca, cb]) if len(ca) + len(cb) else None
    if a.frames is None and b.frames is None:
        return Decision(commit=commit, decode=b.decode)
    if a.frames is None:  # untimed units, then b's (untimed ones first, then timed)
        return Decision(commit=commit, decode=b.decode, frames=b.frames, timed_from=len(ca) + b.timed_from)
    if a.timed_from or (b.frames is None and len(cb)) or b.timed_from:
        raise ValueError("then(a, b): untimed units cannot follow timed ones in one decision")
    return Decision(commit=commit, decode=b.decode, frames=a.frames if b.frames is None else torch.cat([a.frames, b.frames]))


def run_frames(units: Tensor | np.ndarray, starts: Tensor | np.ndarray, end: int) -> Tensor:
    """Runs of `units` starting at frames `starts`, the last ending at frame `end`: one unit id per frame
    (on the host, in numpy: a few runs per session and tick)."""
    starts = np.asarray(starts)
    lengths = np.empty_like(starts)
    lengths[:-1] = starts[1:] - starts[:-1]
    if len(starts):
        lengths[-1] = end - starts[-1]
    if (lengths < 0).any():
        raise ValueError(f"unit runs starting at frames {starts.tolist()} are out of order or end after frame {end}")
    return torch.from_numpy(np.repeat(np.asarray(units), lengths))


class Policy:
    """Base: collects the source; subclasses decide when to speak."""

    emit_every = 0  # 0: a decode's units are spoken when it is done; n: at least n at a time while decoding (a tick's at once)
    # frames the encoder had turned into units when the current hook's units were final (the
    # engine sets it before each `on_source` and `on_end`)
    source_frames = 0
    # True: `on_source` is called for every encoded chunk, also one that only lengthens the last
    # unit's run (no new units); False: only when there are new units
    every_chunk = False

    def __init__(self, decoder: UnitDecoder):
        self.decoder = decoder
        self.source = torch.zeros(0, dtype=torch.long)
        self.frames = torch.zeros(0, dtype=torch.long)
        self.committed = torch.zeros(0, dtype=torch.long)
        self.pending: list[int] = []  # units of the decode in flight, not yet spoken

    # --- what a policy answers with --------------------------------------------------------------

    def speak(self, units) -> Decision | None:
        """Commit units: they go to the vocoder now."""
        new = _units(units)
        if not len(new):
            return None
        self.committed = torch.cat([self.committed, new])
        return Decision(commit=new)

    def decode(self, max_new: int, min_new: int = 0, tokens: Tensor | None = None, complete: bool = True) -> Decision | None:
        """Decode up to `max_new` units after the committed ones, given the source (complete=False:
        the source so far, more will follow)."""
        max_new = min(max_new, self.decoder.max_new - len(self.committed))
        if max_new <= 0:
            return None
        return Decision(decode=self.decoder.request(self.source, self.committed, max_new, min_new, tokens, complete))

    # --- hooks -------------------------------------------------------------------------------------

    def add_source(self, units: Tensor, frames: Tensor) -> None:
        self.source = torch.cat([self.source, units.cpu()])
        self.frames = torch.cat([self.frames, frames.cpu()])

    def on_source(self, units: Tensor, frames: Tensor, source_samples: int) -> Decision | None:
        self.add_source(units, frames)
        return None

    def on_end(self) -> Decision | None:
        return None

    def on_decoded(self, units: list[int], done: bool) -> Decision | None:
        """Units of the decode in flight, as they come: those of a tick's steps together, the last ones with
        done=True (the decode has finished)."""
        self.pending += units
        if done:
            rest, self.pending = self.pending, []
            return self.decoded(rest)
        if self.emit_every and len(self.pending) >= self.emit_every:
            chunk, self.pending = self.pending, []
            return self.speak(chunk)
        return None

    def decoded(self, units: list[int]) -> Decision | None:
        """A decode finished with these units (those not yet spoken)."""
        return self.speak(units)


class Resynthesis(Policy):
    """Speak the source units back as they arrive: audio -> units -> audio, no language model.

    durations="source" holds each unit for the frames the encoder gave it (the talker's timing: what
    resynthesis can know exactly, one vocoder frame per encoder frame); "predicted" de-duplicates
    and lets the vocoder's duration predictor time them, as every task whose units come from the
    language model must (the ceiling of those tasks)."""

    def __init__(self, decoder: UnitDecoder, durations: str = "source"):
        super().__init__(decoder)
        if durations not in ("source", "predicted"):
            raise ValueError(f"resynthesis durations must be 'source' or 'predicted', got {durations!r}")
        self.durations = durations
        self.every_chunk = durations == "source"  # a run held through a chunk is spoken as it is heard
        self.timed = 0  # frames given to the vocoder
        self.last: int | None = None  # the unit of the run they end in

    def on_source(self, units, frames, source_samples) -> Decision | None:
        if self.durations == "predicted":  # nothing is kept: no length limit
            new = _units(units)
            return Decision(commit=new) if len(new) else None
        return self.speak_timed(_units(units), _units(frames))

    def on_end(self) -> Decision | None:
        return self.speak_timed(_units([]), _units([])) if self.durations == "source" else None

    def speak_timed(self, units: Tensor, starts: Tensor) -> Decision | None:
        """New units starting at absolute frames `starts`: the frames since the last call, the
        previous run continuing up to the first new start, the last run up to `source_frames`."""
        u, f = units.numpy(), starts.numpy()
        if self.last is None:  # the first unit (silence before speech may have been dropped unheard)
            if not len(u):
                return None
            ids, first = u, f
            self.timed = int(f[0])
        else:
            ids, first = np.concatenate([[self.last], u]), np.concatenate([[self.timed], f])
        frames = run_frames(ids, first, self.source_frames)
        if not frames.shape[0]:
            return None
        self.timed, self.last = self.source_frames, int(ids[-1])
        return Decision(commit=units if len(u) else None, frames=frames)


class Continuation(Policy):
    def __init__(self, decoder: UnitDecoder, max_units: int = 250, min_units: int = 25, emit_every: int = 10):
        super().__init__(decoder)
        if max_units < 1 or min_units < 0 or emit_every < 1:
            raise ValueError(f"continuation needs max_units >= 1, min_units >= 0 and emit_every >= 1, "
                             f"got max_units={max_units}, min_units={min_units}, emit_every={emit_every}")
        self.max_units, self.min_units, self.emit_every = max_units, min(min_units, max_units), emit_every

    def add_source(self, units: Tensor, frames: Tensor) -> None:
        """Keep the most recent units the model can take (a long talk is continued from its end)."""
        super().add_source(units, frames)
        n = self.decoder.max_units
        self.source, self.frames = self.source[-n:], self.frames[-n:]

    def on_end(self) -> Decision | None:
        if len(self.source):
            return self.decode(self.max_units, self.min_units)
        return None


class _Simultaneous(Policy):
    """Acts once per `chunk_ms` of source (`decide`); translates a long input segment by segment."""

    emit_every = 10

    def __init__(self, decoder: UnitDecoder, chunk_ms: int = 320, ratio: float = 1.0, sample_rate: int = 16000,
                 max_segment: int = 400, min_segment: int = 25, pause_ms: int = 400, frame_ms: int = 20):
        super().__init__(decoder)
        if chunk_ms <= 0 or ratio <= 0:
            raise ValueError(f"chunk_ms and ratio must be > 0, got chunk_ms={chunk_ms}, ratio={ratio}")
        self.chunk = int(chunk_ms * sample_rate / 1000)
        self.ratio = ratio
        self.next_act = self.chunk
        # a segment's translation must fit the decoder: ratio * segment + 10 units
        fit = int((decoder.max_new - 10) / ratio)
        self.max_segment = max(1, min(max_segment, decoder.max_units, fit))
        self.min_segment = min(min_segment, self.max_segment)
        self.frame_ms = frame_ms
        self.pause_frames = max(1, pause_ms // frame_ms)
        self.carry: tuple[Tensor, Tensor] | None = None  # units after a cut, for the next segment
        self.closing = False
        self.segments = 1

    def _cut(self) -> int | None:
        """Where the current segment ends (units kept), or None: after a pause (one unit held for
        `pause_ms`, or quiet units in a row lasting that long, when the encoder says which units are
        quiet), or at the maximum length."""
        if len(self.source) < self.min_segment:
            return None
        pause = self._pauses() >= self.pause_frames
        long = torch.nonzero(pause[self.min_segment - 1 :])
        if len(long):
            return min(int(long[0]) + self.min_segment, self.max_segment)
        if len(self.source) >= self.max_segment:
            return self.max_segment
        return None

    def _pauses(self) -> Tensor:
        """[units - 1]: for each complete unit, the frames of pause ending with it: its own run (one
        unit held), or, when the encoder says which units are quiet, the quiet units' frames in a row
        up to it (silence over a noise floor maps to several units in short runs)."""
        runs = self.frames[1:] - self.frames[:-1]  # frames each complete run lasted
        if self.decoder.quiet is None:
            return runs
        quiet = self.decoder.quiet[self.source[:-1]]
        total = torch.cumsum(runs * quiet, 0)  # quiet frames up to unit i
        before = torch.cummax(torch.where(quiet, 0, total), 0).values  # ... up to the last unit that was not quiet
        return torch.maximum(runs, torch.where(quiet, total - before, 0))

    def _split(self, cut: int) -> None:
        """The segment keeps its first `cut` units; the rest wait for the next segment."""
        self.carry = (self.source[cut:], self.frames[cut:])
        self.source, self.frames = self.source[:cut], self.frames[:cut]

    def on_source(self, units, frames, source_samples) -> Decision | None:
        self.add_source(units, frames)
        cut = self._cut()
        if cut is not None:
            self._split(cut)
            self.closing = True
            return self.finish_segment()
        if source_samples >= self.next_act:
            self.next_act = (source_samples // self.chunk + 1) * self.chunk
            return self.decide()
        return None

    def decide(self) -> Decision | None:
        raise NotImplementedError

    def finish_segment(self) -> Decision | None:
        """Translate the rest of the current segment (at a cut, or at the end of input)."""
        limit = int(self.ratio * len(self.source)) + 10 - len(self.committed)
        d = self.decode(limit) if len(self.source) else None
        if d is None:
            return self.next_segment(None)
        return d

    def on_decoded(self, units: list[int], done: bool) -> Decision | None:
        """Units are spoken while the decode goes on, not when it is done: a segment's closing decode
        `emit_every` at a time, a decision's as `take` says."""
        d = super().on_decoded(units, done) if self.closing else self.take(units, done)
        return self.next_segment(d) if self.closing and done else d

    def take(self, units: list[int], done: bool) -> Decision | None:
        """A decision's decode, its units as they come: all spoken, `emit_every` at a time."""
        return super().on_decoded(units, done)

    def next_segment(self, spoken: Decision | None) -> Decision | None:
        """A segment is done: start the next from the units after the cut."""
        self.closing = False
        if self.carry is None:
            return spoken
        units, frames = self.carry
        self.carry = None
        self.source = self.frames = torch.zeros(0, dtype=torch.long)
        self.committed = torch.zeros(0, dtype=torch.long)
        self.restart()
        self.segments += 1
        self.add_source(units, frames)
        return spoken

    def restart(self) -> None:
        """Per-segment state a subclass keeps (forget it)."""

    def on_end(self) -> Decision | None:
        self.closing = True
        return self.finish_segment()


def streaming_refusal(cfg: UnitMBartConfig, policy: str, k: int, ratio: float) -> str | None:
    """Why a simultaneous policy cannot run on a backbone trained to stream, or None: it streams under
    wait-k with its own k and ratio only."""
    if not cfg.streams:
        return None
    if policy != "wait-k":
        return (f"this backbone streams under wait-k (k={cfg.wait_k}): {policy} re-decodes hypotheses it may take back, "
                "which a streaming backbone does not; use policy=wait-k")
    if (k, ratio) != (cfg.wait_k, cfg.wait_ratio):
        return (f"this backbone streams under wait-k with k={cfg.wait_k}, ratio={cfg.wait_ratio} (as it was trained), "
                f"not k={k}, ratio={ratio}: give --opt k={cfg.wait_k} --opt ratio={cfg.wait_ratio}")
    return None


class WaitK(_Simultaneous):
    """Wait k source units, then keep ratio units per source unit behind. On a backbone trained to
    stream (its own k and ratio) each decision resumes the previous decode: the new source units are
    encoded and decoding goes on, with nothing re-encoded or re-run, and the units equal one decode of
    the whole source under the schedule.

    Such a backbone reads the source without </s>, so when a decision's decode ends at </s> before its
    schedule's end, the model says its sentence is over while the talker goes on (sentences run together
    with pauses shorter than `pause_ms`). The next sentence starts after the first pause of at least
    `sentence_pause_ms` from 2k units before the schedule's position of that </s> on (the longest, among
    the units read when it is found): the segment closes there and the next one is decoded at once from
    the units after it, so every sentence is translated, not only a segment's first. Until such a pause,
    nothing is said (the model may have ended early, inside its sentence)."""

    def __init__(self, decoder: UnitDecoder, k: int = 10, sentence_pause_ms: int = 200, **kw):
        super().__init__(decoder, **kw)
        if k < 0:
            raise ValueError(f"wait-k needs k >= 0, got {k}")
        if why := streaming_refusal(decoder.cfg, "wait-k", k, self.ratio):
            raise ValueError(why)
        self.k = k
        if sentence_pause_ms < 0:
            raise ValueError(f"sentence_pause_ms must be >= 0, got {sentence_pause_ms}")
        self.sentence_pause = max(1, sentence_pause_ms // self.frame_ms)
        self.until = 0  # the committed units the decision's decode reaches if it runs its whole budget
        self.ended: int | None = None  # the model ended the segment's sentence: look for the next from this unit

    def decide(self) -> Decision | None:
        if self.decoder.streams:
            budget = self.decoder.decodable(len(self.source)) - len(self.committed)
            d = self.decode(budget, complete=False) if budget > 0 else None
            if d is not None:
                self.until = len(self.committed) + d.decode.max_new
            return d
        budget = int(self.ratio * (len(self.source) - self.k)) - len(self.committed)
        return self.decode(budget) if budget > 0 else None

    def take(self, units: list[int], done: bool) -> Decision | None:
        d = super().take(units, done)  # speaks them: once done, every unit of the decode is committed
        if not self.decoder.streams:  # a full re-decode of a source given with </s>: ending early is expected
            return d
        if done and len(self.committed) < self.until:  # </s> before the schedule's end: the sentence is over
            q = len(self.decoder.prefix_tokens) + len(self.committed)  # the decoder position that chose </s>
            read = int(self.decoder.cfg.visible_source(torch.tensor([q]))[0])  # the source it had read
            self.ended = max(0, min(len(self.source), read) - 2 * self.k - 1)
            return then(d, self.next_sentence())
        return d

    def on_source(self, units, frames, source_samples) -> Decision | None:
        if self.ended is None:
            return super().on_source(units, frames, source_samples)
        self.add_source(units, frames)  # the model has ended this segment's sentence: wait for the next
        return self.next_sentence()

    def next_sentence(self) -> Decision | None:
        """After the model ended its sentence: once a pause shows where the next one begins, close the
        segment there and decode the next from the units after it."""
        pauses = self._pauses()  # [units - 1]: unit i ends a pause of pauses[i] frames
        window = pauses[self.ended :]
        if not len(window):
            return None
        i = self.ended + len(window) - 1 - int(torch.argmax(window.flip(0)))  # the longest pause, the latest of equal ones
        if int(pauses[i]) < self.sentence_pause:
            if len(self.source) < self.max_segment:
                return None
            i = len(self.source) - 1  # no pause in a whole segment's length: start afresh from here
        self.ended = None
        self._split(i + 1)
        self.next_segment(None)
        return self.decide() if len(self.source) else None

    def on_end(self) -> Decision | None:
        self.ended = None  # the rest after the sentence the model ended has no pause: it was that sentence's
        return super().on_end()


class LocalAgreement(_Simultaneous):
    """Commits the prefix a decision's hypothesis shares with the previous one. The shared prefix is
    known, and spoken, as soon as the hypothesis parts from the previous one or covers it: the rest of
    the decode only makes the hypothesis the next decision compares with."""

    def __init__(self, decoder: UnitDecoder, lookahead: int = 0, **kw):
        super().__init__(decoder, **kw)
        if lookahead < 0:
            raise ValueError(f"local agreement needs lookahead >= 0 (0: the whole hypothesis), got {lookahead}")
        if why := streaming_refusal(decoder.cfg, "local-agreement", 0, self.ratio):
            raise ValueError(why)
        self.lookahead = lookahead
        self.previous: list[int] = []  # last hypothesis, beyond the committed units
        self.hyp: list[int] = []  # the decode in flight's units
        self.agreed: int | None = None  # how many of them agree, once known

    def decide(self) -> Decision | None:
        limit = int(self.ratio * len(self.source)) + 10 - len(self.committed)
        self.hyp, self.agreed = [], None
        return self.decode(min(limit, self.lookahead) if self.lookahead else limit)

    def take(self, units: list[int], done: bool) -> Decision | None:
        self.hyp += units
        d = None
        if self.agreed is None:  # so far the hypothesis is a prefix of the previous one: compare the new units
            hyp, prev = self.hyp, self.previous
            n = len(hyp) - len(units)
            while n < min(len(hyp), len(prev)) and hyp[n] == prev[n]:
                n += 1
            if n < len(hyp) or n == len(prev) or done:  # parted from the previous one, covered it, or ended
                self.agreed = n
                d = self.speak(hyp[:n])
        if done:
            self.previous = self.hyp[self.agreed :]
        return d

    def restart(self) -> None:
        self.previous, self.hyp, self.agreed = [], [], None


class Inpainting(Policy):
    """Fill the time span [mask_start, mask_end) seconds of the input given the audio around it.

    The encoder reads the input with the span's units replaced by one <mask>. With context="keep"
    (the default) what lies outside the span is the input's own units: those before it are spoken as
    soon as they are final and forced as the decoder's prefix, the decoder then generates as many
    units as the span held, and the units after it follow; only the gap is new. The kept context is
    spoken in the talker's timing (durations="source") or timed by the vocoder ("predicted"), the gap
    always by the vocoder. context="regenerate" lets the model say the whole utterance again (the
    denoising objective as trained), context included."""

    def __init__(self, decoder: UnitDecoder, mask_start: float = 0.0, mask_end: float = 0.0, emit_every: int = 25,
                 frame_rate: float = 50.0, context: str = "keep", durations: str = "source"):
        super().__init__(decoder)
        if not 0 <= mask_start < mask_end:
            raise ValueError(f"inpainting needs 0 <= mask_start < mask_end (seconds), got {mask_start}..{mask_end}: "
                             "give --opt mask_start=S --opt mask_end=E")
        if emit_every < 1:
            raise ValueError(f"emit_every must be >= 1, got {emit_every}")
        if context not in ("keep", "regenerate") or durations not in ("source", "predicted"):
            raise ValueError(f"inpainting takes context=keep|regenerate and durations=source|predicted, "
                             f"got context={context!r}, durations={durations!r}")
        self.span = (int(mask_start * frame_rate), int(mask_end * frame_rate))
        self.mask_end_s = mask_end
        self.frame_rate = frame_rate
        self.emit_every = emit_every
        self.keep = context == "keep"
        self.timed = self.keep and durations == "source"
        self.right: Decision | None = None  # the units after the span, spoken after the generated ones
        mask = decoder.cfg.mask_token
        if mask is None:
            raise ValueError("this bundle's Unit mBART has no <mask> token (give `streamgen convert` --mask-token)")
        self.mask = mask

    def add_source(self, units: Tensor, frames: Tensor) -> None:
        super().add_source(units, frames)
        if len(self.source) > self.decoder.max_units - 1:
            raise ValueError(f"inpainting holds at most {self.decoder.max_units - 1} units of input (the model's context); "
                             f"this input is longer: send a shorter excerpt around the gap")

    def context(self, lo: int, hi: int) -> Decision | None:
        """The input's units [lo, hi) as they were said: units, and in the talker's timing their frames."""
        units = self.source[lo:hi]
        if not len(units):
            return None
        if not self.timed:
            return Decision(commit=units)
        end = int(self.frames[hi]) if hi < len(self.frames) else max(self.source_frames, int(self.frames[-1]) + 1)
        return Decision(commit=units, frames=run_frames(units, self.frames[lo:hi], end))

    def say(self, d: Decision | None) -> Decision | None:
        """Speak a context decision: its units join the committed ones (the decoder's prefix)."""
        if d is not None:
            self.committed = torch.cat([self.committed, d.commit])
        return d

    def on_source(self, units: Tensor, frames: Tensor, source_samples: int) -> Decision | None:
        self.add_source(units, frames)
        if not self.keep:
            return None
        final_left = int((self.frames[1:] <= self.span[0]).sum())  # runs that end by the span's start
        return self.say(self.context(len(self.committed), final_left))

    def on_end(self) -> Decision | None:
        if len(self.source) == 0:
            return None
        a, b = self.span
        end = max(self.source_frames, int(self.frames[-1]) + 1)  # the last run lasts to the input's end
        if a >= end:
            raise ValueError(f"the mask starts at {a / self.frame_rate:.2f} s, after the input's end "
                             f"(about {end / self.frame_rate:.2f} s): give a mask_start inside the input")
        ends = torch.cat([self.frames[1:], torch.tensor([end])])  # a run ends where the next starts
        n_left, n_right = int((ends <= a).sum()), int((self.frames >= b).sum())
        keep_left, keep_right = self.source[:n_left], self.source[len(self.source) - n_right :]
        tokens = torch.cat([keep_left + UNIT_OFFSET, torch.tensor([self.mask]), keep_right + UNIT_OFFSET, torch.tensor([EOS])])
        if not self.keep:
            budget = int(1.5 * len(self.source)) + 10
            return self.decode(budget, min_new=min(n_left + n_right, budget), tokens=tokens)
        left = self.say(self.context(len(self.committed), n_left))  # the last context unit, final only now
        self.right = self.context(len(self.source) - n_right, len(self.source))
        gap = len(self.source) - n_left - n_right  # as many units as the span held
        fill = self.decode(gap, min_new=gap, tokens=tokens) if gap else None
        if fill is None:  # nothing to fill (or no room left in the decoder): the context alone
            fill = self.decoded([])
        return then(left, fill)

    def decoded(self, units: list[int]) -> Decision | None:
        if not self.keep:
            return self.speak(units)
        right, self.right = self.right, None
        gap = self.speak(units)
        if right is None:
            return gap
        self.say(right)
        return then(gap, right)
