"""The asyncio pipeline: source -> engine -> sink.

The source's items are checked (bad audio ends only its session, with a message naming the
problem) and handed to the engine (`engine.py`), which holds a bounded inbox per session and
advances every session together in its worker thread; its outputs go to the sink in order.
Back-pressure is per session:

- `overflow="block"` (default): a session whose inbox is full makes the source wait; nothing is
  lost, and a live source that cannot wait buffers in its own bounded buffer.
- `overflow="drop-oldest"`: that session's oldest queued input chunk is dropped and counted
  (`dropped_chunks`); no other session is touched.

A session whose input is bad, or whose processing fails, gets a `SessionError` and its `End`; the
other sessions go on. `request_stop` drains gracefully (SIGTERM / SIGINT).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Protocol

from ..audio import check_wave
from .engine import Engine, build_engine
from .items import AudioChunk, AudioOut, End, Item, SessionError
from .stats import Stats

log = logging.getLogger("streamgen")
MAX_CHUNK_SECONDS = 10.0
MAX_ENDED = 10_000  # sessions over before their input, remembered (as the engine remembers them)


class Source(Protocol):
    def __aiter__(self) -> AsyncIterator[Item]: ...


class Sink(Protocol):
    async def write(self, item: Item) -> None: ...

    async def close(self) -> None: ...


def check_chunk(chunk: AudioChunk, sample_rate: int) -> str | None:
    """Why an input chunk is unusable (the same checks as whole-utterance input), or None."""
    try:
        check_wave(chunk.samples, sample_rate)
    except (TypeError, ValueError) as e:
        return f"audio chunk {chunk.seq}: {e}"
    return None


class Pipeline:
    def __init__(self, source: Source, engine: Engine, sink: Sink, stats: Stats):
        self.source, self.engine, self.sink, self.stats = source, engine, sink, stats
        engine.stats = stats
        self.max_chunk = int(MAX_CHUNK_SECONDS * stats.sample_rate)
        stats.algorithmic_ms = {k: 1000 * v for k, v in engine.algorithmic_s.items() if v}
        # sessions over before their source ended them (rejected at the input, or ended by the engine), until
        # it does, with whether the engine's End for it has come: the newest MAX_ENDED (the serve hub sends no
        # End for a session the engine has ended)
        self.ended: OrderedDict[str, bool] = OrderedDict()
        self.live: set[str] = set()  # sessions the source opened and has not ended
        self.finishing: dict[str, int] = {}  # per id, sessions the source has ended and the engine not yet
        self._stop = asyncio.Event()
        self.stop_reason = ""

    def request_stop(self, reason: str = "the server is shutting down") -> None:
        """Stop accepting input (e.g. on SIGTERM): every live session gets a SessionError with
        `reason` and its End, what is already queued is processed, then `run` returns its stats.
        Safe to call from a signal handler on the event loop, and more than once."""
        if not self._stop.is_set():
            self.stop_reason = reason
            self._stop.set()

    async def run(self) -> Stats:
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        worker = self.engine.start(loop, out)
        drain = loop.create_task(self._drain(out))
        feed = loop.create_task(self._feed())
        try:
            await asyncio.wait({feed, drain}, return_when=asyncio.FIRST_COMPLETED)
            if not feed.done():  # the output side ended first: the sink failed (its error goes on), or the engine
                drain.result()
                raise RuntimeError("the engine stopped while its input went on (see the log above)")
            feed.result()
            self.engine.close()
            await drain
        except BaseException:  # cancelled, or the sink failed: stop the engine where it is
            self.engine.abort()
            for t in (feed, drain):
                t.cancel()
            await asyncio.gather(feed, drain, return_exceptions=True)
            raise
        finally:
            await loop.run_in_executor(None, worker.join)
            await self.sink.close()
        return self.stats

    async def _items(self) -> AsyncIterator[Item]:
        """The source's items until it ends or a stop is requested; then an error and an End for
        every session still live."""
        it = self.source.__aiter__()
        stop = asyncio.ensure_future(self._stop.wait())
        nxt = None
        try:
            while True:
                nxt = asyncio.ensure_future(it.__anext__())
                await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()
                    await asyncio.gather(nxt, return_exceptions=True)
                    break
                try:
                    yield nxt.result()
                except StopAsyncIteration:
                    break
        finally:
            stop.cancel()
            if nxt is not None and not nxt.done():  # cancelled from outside while the source was working
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)
            if hasattr(it, "aclose"):
                await it.aclose()
        if self._stop.is_set():
            for s in sorted(self.live):
                yield SessionError(s, self.stop_reason)
                yield End(s, self.stats.input_record(s).input_samples, time.monotonic())

    async def _feed(self) -> None:
        async for item in self._items():
            s = item.session
            if isinstance(item, End):
                self.live.discard(s)
                if s in self.ended:  # ended before its input did: the End only frees the id (in the engine too)
                    if not self.ended.pop(s):  # the engine's End for that session is still to come, and closes its record
                        self.finishing[s] = self.finishing.get(s, 0) + 1
                        self.stats.input_record(s).input_ended = True  # (made here if it had none): the id's next chunk opens its own
                else:
                    st = self.stats.input_record(s)
                    st.input_ended, st.input_end_at = True, item.captured_at
                    if st.input_samples == 0:
                        await self.engine.put(SessionError(s, "the session ended without any audio (empty input)"))
                    self.finishing[s] = self.finishing.get(s, 0) + 1  # the engine's End for it is to come
                await self.engine.put(item)
                continue
            if s in self.ended:
                continue  # rejected at the input or ended by the engine: the rest of its input is not taken
            self.live.add(s)
            if isinstance(item, AudioChunk):
                why = check_chunk(item, self.stats.sample_rate)
                if why is None and item.samples.numel() > self.max_chunk:
                    why = f"audio chunk {item.seq} of {item.samples.numel() / self.stats.sample_rate:.1f} s exceeds the {MAX_CHUNK_SECONDS:.0f} s limit for one chunk"
                if why is not None:
                    self._end(s, engine_ended=False)
                    item = SessionError(s, why)
                else:
                    st = self.stats.input_record(s)
                    if st.started_at is None:
                        st.started_at = item.captured_at - item.samples.numel() / self.stats.sample_rate
                    st.input_samples += item.samples.numel()
            elif isinstance(item, SessionError):
                self._end(s, engine_ended=False)
            await self.engine.put(item)

    def _end(self, session: str, engine_ended: bool) -> None:
        """The session is over before its source ended it: the rest of its input is dropped here."""
        self.live.discard(session)
        self.ended[session] = engine_ended
        while len(self.ended) > MAX_ENDED:
            self.ended.popitem(last=False)

    async def _drain(self, q: asyncio.Queue) -> None:
        while True:
            item = await q.get()
            if item is None:
                return
            st = self.stats.session(item.session)
            if isinstance(item, AudioOut):
                item.emitted_at = time.monotonic()
                st.add_output(1000 * item.source_samples / self.stats.sample_rate, item.emitted_at, item.samples.numel())
            elif isinstance(item, SessionError):
                st.error = item.message
                self.stats.event(event="error", session=item.session, message=item.message)
            await self.sink.write(item)
            if isinstance(item, End):
                self.stats.close_session(item.session)
                n = self.finishing.pop(item.session, 0)
                if n > 1:
                    self.finishing[item.session] = n - 1
                elif n == 0 and item.session in self.ended:  # the End of a session the pipeline had ended at its input
                    self.ended[item.session] = True
                elif n == 0 and item.session in self.live:  # over before its input: what more of it comes is not taken
                    self._end(item.session, engine_ended=True)


__all__ = ["Pipeline", "Sink", "Source", "build_engine", "check_chunk"]
