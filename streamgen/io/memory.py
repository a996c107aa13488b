"""In-process endpoints, for programs that embed the pipeline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import torch

from ..pipeline.items import AudioChunk, AudioOut, End, Item, SessionError


class MemorySource:
    """Yields the given items (AudioChunk, Control, End, ...); `interval` seconds between them."""

    def __init__(self, items: Iterable[Item], interval: float = 0.0):
        self.items, self.interval = items, interval

    async def __aiter__(self) -> AsyncIterator[Item]:
        for item in self.items:
            if self.interval:
                await asyncio.sleep(self.interval)
            yield item


def chunks_of(session: str, wave: torch.Tensor, block: int, at: float = 0.0, end: bool = True) -> list[Item]:
    """A waveform cut into AudioChunks of `block` samples (and its End)."""
    items: list[Item] = [AudioChunk(session, i, wave[s : s + block], s, at) for i, s in enumerate(range(0, len(wave), block))]
    return items + ([End(session, len(wave), at)] if end else [])


class MemorySink:
    """Collects each session's audio, end and error."""

    def __init__(self):
        self.audio: dict[str, list[torch.Tensor]] = {}
        self.ended: list[str] = []
        self.errors: dict[str, str] = {}

    def wave(self, session: str) -> torch.Tensor:
        return torch.cat(self.audio.get(session) or [torch.zeros(0)])

    async def write(self, item: Item) -> None:
        if isinstance(item, AudioOut):
            self.audio.setdefault(item.session, []).append(item.samples)
        elif isinstance(item, End):
            self.ended.append(item.session)
        elif isinstance(item, SessionError):
            self.errors[item.session] = item.message

    async def close(self) -> None:
        pass
