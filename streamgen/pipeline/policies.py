"""Decoding policies: when a task speaks, and what it commits.

A policy receives a session's source units as they become final and yields chunks of target units
it commits to. Building blocks for task plugins:

- `Continuation`: listen until the input ends, then speak; output streams every `emit_every` units.
- `WaitK`: simultaneous; every `chunk_ms` of source, may commit up to ratio * (source units - k).
- `LocalAgreement`: simultaneous; every `chunk_ms`, decode a full hypothesis and commit the prefix it
  shares with the previous hypothesis (LA-2).
- `Inpainting`: at the end, replace the units of a masked time span by one <mask> and regenerate.

An encoder-decoder re-encodes a grown source, which changes every cross-attention input, so each
decision re-encodes the source and re-runs the decoder over the committed units in one prefill pass.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ..models.generation import Sampling, allowed_tokens_mask, choose
from ..models.unit_mbart import EOS, UNIT_OFFSET, PromptKV, UnitMBart, units_to_source


class UnitDecoder:
    """Unit mBART plus a task's shared prompt and sampling settings, for one session."""

    def __init__(self, mbart: UnitMBart, prompt: PromptKV | None, sampling: Sampling = Sampling(),
                 prefix_tokens: tuple[int, ...] = (), seed: int | None = None):
        self.mbart, self.prompt, self.sampling = mbart, prompt, sampling
        self.device = mbart.embed_tokens.weight.device
        self.prefix = torch.tensor((EOS, *prefix_tokens), device=self.device)
        self.allowed = allowed_tokens_mask(mbart, self.device)
        self.no_eos = self.allowed.clone()
        self.no_eos[EOS] = False
        self.generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None

    @property
    def max_units(self) -> int:
        return self.mbart.cfg.max_positions - 1

    @torch.no_grad()
    def extend(self, source: Tensor, committed: Tensor, max_new: int, min_new: int = 0, tokens: Tensor | None = None) -> Iterator[int]:
        """Yield up to `max_new` units continuing `committed`, given the source units (stops at </s>).
        `tokens` overrides the encoder input (e.g. a source with a <mask>)."""
        src = units_to_source(source.to(self.device)) if tokens is None else tokens.to(self.device)
        if len(src) > self.mbart.cfg.max_positions:
            raise ValueError(f"source of {len(src) - 1} units exceeds the model's {self.max_units}-unit context")
        max_new = min(max_new, self.mbart.cfg.max_positions - len(self.prefix) - len(committed))
        if max_new <= 0:
            return
        state = self.mbart.start(src[None], self.prompt, capacity=len(self.prefix) + len(committed) + max_new)
        prev = torch.cat([self.prefix, committed.to(self.device) + UNIT_OFFSET])
        logits = self.mbart.step(state, prev[None])[:, -1]  # prefill the committed units at once
        for t in range(max_new):
            nxt = choose(logits, self.allowed if t >= min_new else self.no_eos, self.sampling, self.generator)
            if int(nxt) == EOS:
                return
            yield int(nxt) - UNIT_OFFSET
            logits = self.mbart.step(state, nxt)


def _units(xs: list[int]) -> Tensor:
    return torch.tensor(xs, dtype=torch.long)


class Policy:
    """Base: collects the source; subclasses decide when to speak."""

    def __init__(self, decoder: UnitDecoder):
        self.decoder = decoder
        self.source = torch.zeros(0, dtype=torch.long)
        self.frames = torch.zeros(0, dtype=torch.long)
        self.committed = torch.zeros(0, dtype=torch.long)

    def add_source(self, units: Tensor, frames: Tensor) -> None:
        self.source = torch.cat([self.source, units.cpu()])
        self.frames = torch.cat([self.frames, frames.cpu()])
        if len(self.source) > self.decoder.max_units:
            raise ValueError(f"source of {len(self.source)} units exceeds the model's {self.decoder.max_units}-unit context")

    def commit(self, units: list[int]) -> Tensor:
        new = _units(units)
        self.committed = torch.cat([self.committed, new])
        return new

    def on_source(self, units: Tensor, frames: Tensor, source_samples: int) -> Iterator[Tensor]:
        self.add_source(units, frames)
        return iter(())

    def on_end(self) -> Iterator[Tensor]:
        return iter(())

    def commit_every(self, units: Iterator[int], n: int) -> Iterator[Tensor]:
        """Commit decoded units in chunks of `n` as they come (the output streams while decoding)."""
        pending: list[int] = []
        for u in units:
            pending.append(u)
            if len(pending) >= n:
                yield self.commit(pending)
                pending = []
        if pending:
            yield self.commit(pending)


class Resynthesis(Policy):
    """Speak the source units back as they arrive: audio -> units -> audio, the ceiling of every task."""

    def on_source(self, units, frames, source_samples) -> Iterator[Tensor]:
        self.add_source(units, frames)
        if len(units):
            yield self.commit(units.tolist())

    def add_source(self, units: Tensor, frames: Tensor) -> None:  # no model context involved: no length limit
        self.source = units.cpu()


class Continuation(Policy):
    def __init__(self, decoder: UnitDecoder, max_units: int = 250, min_units: int = 25, emit_every: int = 10):
        super().__init__(decoder)
        self.max_units, self.min_units, self.emit_every = max_units, min_units, emit_every

    def on_end(self) -> Iterator[Tensor]:
        if len(self.source):
            yield from self.commit_every(self.decoder.extend(self.source, self.committed, self.max_units, self.min_units), self.emit_every)


class _Simultaneous(Policy):
    """Acts once per `chunk_ms` of source; `decide` returns the units to commit now."""

    def __init__(self, decoder: UnitDecoder, chunk_ms: int = 320, ratio: float = 1.0, sample_rate: int = 16000):
        super().__init__(decoder)
        self.chunk = int(chunk_ms * sample_rate / 1000)
        self.ratio = ratio
        self.next_act = self.chunk

    def on_source(self, units, frames, source_samples) -> Iterator[Tensor]:
        self.add_source(units, frames)
        if source_samples >= self.next_act:
            self.next_act = (source_samples // self.chunk + 1) * self.chunk
            new = self.decide()
            if new:
                yield self.commit(new)

    def decide(self) -> list[int]:
        raise NotImplementedError

    def on_end(self) -> Iterator[Tensor]:
        limit = int(self.ratio * len(self.source)) + 10 - len(self.committed)
        rest = list(self.decoder.extend(self.source, self.committed, max(limit, 0)))
        if rest:
            yield self.commit(rest)


class WaitK(_Simultaneous):
    def __init__(self, decoder: UnitDecoder, k: int = 10, **kw):
        super().__init__(decoder, **kw)
        self.k = k

    def decide(self) -> list[int]:
        budget = int(self.ratio * (len(self.source) - self.k)) - len(self.committed)
        return list(self.decoder.extend(self.source, self.committed, budget)) if budget > 0 else []


class LocalAgreement(_Simultaneous):
    def __init__(self, decoder: UnitDecoder, **kw):
        super().__init__(decoder, **kw)
        self.previous: list[int] = []  # last hypothesis, beyond the committed units

    def decide(self) -> list[int]:
        limit = int(self.ratio * len(self.source)) + 10 - len(self.committed)
        hyp = list(self.decoder.extend(self.source, self.committed, max(limit, 0)))
        n = 0
        while n < min(len(hyp), len(self.previous)) and hyp[n] == self.previous[n]:
            n += 1
        self.previous = hyp[n:]
        return hyp[:n]


class Inpainting(Policy):
    """Regenerate the utterance with the units of [mask_start, mask_end) seconds replaced by <mask>."""

    def __init__(self, decoder: UnitDecoder, mask_start: float = 0.0, mask_end: float = 0.0, emit_every: int = 25, frame_rate: float = 50.0):
        super().__init__(decoder)
        if not 0 <= mask_start < mask_end:
            raise ValueError(f"inpainting needs 0 <= mask_start < mask_end (seconds), got {mask_start}..{mask_end}")
        self.span = (int(mask_start * frame_rate), int(mask_end * frame_rate))
        self.emit_every = emit_every
        mask = decoder.mbart.cfg.mask_token
        if mask is None:
            raise ValueError("this bundle's Unit mBART has no <mask> token (give `streamgen convert` --mask-token)")
        self.mask = mask

    def on_end(self) -> Iterator[Tensor]:
        if len(self.source) == 0:
            return
        a, b = self.span
        ends = torch.cat([self.frames[1:], self.frames[-1:] + 1])  # a run ends where the next starts
        keep_left = self.source[ends <= a]
        keep_right = self.source[self.frames >= b]
        eos = torch.tensor([EOS])
        tokens = torch.cat([keep_left + UNIT_OFFSET, torch.tensor([self.mask]), keep_right + UNIT_OFFSET, eos])
        budget = int(1.5 * len(self.source)) + 10
        decoded = self.decoder.extend(self.source, self.committed, budget, min_new=len(keep_left) + len(keep_right), tokens=tokens)
        yield from self.commit_every(decoded, self.emit_every)
