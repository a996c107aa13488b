"""The asyncio pipeline: source -> stages -> sink, joined by bounded queues.

Each stage runs its compute in its own worker thread; outputs are handed to the next queue as they
are produced (a continuation streams while it decodes). Back-pressure is explicit:

- `overflow="block"` (default): a full queue makes its producer wait, back to the source; nothing
  is lost, and a live source that cannot wait buffers in its own bounded buffer.
- `overflow="drop-oldest"`: when the input queue is full, the oldest queued input chunk is dropped
  and counted (`dropped_chunks` per session); later stages still block.

Memory stays bounded either way: every queue holds at most `queue_size` items. A session whose
input is bad, or whose processing fails, gets a `SessionError` and is closed in every stage; the
other sessions go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol


from ..audio import check_wave
from .items import AudioChunk, AudioOut, End, Item, SessionError
from .stages import Stage
from .stats import Stats

log = logging.getLogger("streamgen")
_STOP = object()  # after the source is exhausted: flows through every stage, then ends the run
MAX_CHUNK_SECONDS = 10.0


class Source(Protocol):
    def __aiter__(self) -> AsyncIterator[Item]: ...


class Sink(Protocol):
    async def write(self, item: Item) -> None: ...

    async def close(self) -> None: ...


class InputQueue(asyncio.Queue):
    def drop_oldest_audio(self) -> AudioChunk | None:
        """Remove the oldest queued AudioChunk (never an End or control item)."""
        for i, item in enumerate(self._queue):
            if isinstance(item, AudioChunk):
                del self._queue[i]
                return item
        return None


def check_chunk(chunk: AudioChunk, sample_rate: int) -> str | None:
    """Why an input chunk is unusable (the same checks as whole-utterance input), or None."""
    try:
        check_wave(chunk.samples, sample_rate)
    except (TypeError, ValueError) as e:
        return f"audio chunk {chunk.seq}: {e}"
    return None


class Pipeline:
    def __init__(self, source: Source, stages: list[Stage], sink: Sink, stats: Stats, queue_size: int = 16,
                 overflow: str = "block"):
        if overflow not in ("block", "drop-oldest"):
            raise ValueError(f"overflow must be 'block' or 'drop-oldest', got {overflow!r}")
        self.source, self.stages, self.sink, self.stats = source, stages, sink, stats
        self.queue_size, self.overflow = queue_size, overflow
        self.queues: list[asyncio.Queue] = []
        self.max_chunk = int(MAX_CHUNK_SECONDS * stats.sample_rate)
        stats.algorithmic_ms = {s.name: 1000 * s.wait_s for s in stages if s.wait_s}
        self.failed: set[str] = set()  # sessions rejected at the input
        self.live: set[str] = set()  # sessions the source opened and has not ended
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
        self.queues = [InputQueue(self.queue_size)] + [asyncio.Queue(self.queue_size) for _ in self.stages]
        executors = [ThreadPoolExecutor(1, thread_name_prefix=f"streamgen-{s.name}") for s in self.stages]
        tasks = [loop.create_task(self._run_stage(s, ex, self.queues[i], self.queues[i + 1]))
                 for i, (s, ex) in enumerate(zip(self.stages, executors))]
        tasks.append(loop.create_task(self._drain(self.queues[-1])))
        try:
            await self._feed(self.queues[0])
            await self.queues[0].put(_STOP)
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for ex in executors:
                ex.shutdown(wait=False, cancel_futures=True)
            await self.sink.close()
        return self.stats

    async def _items(self) -> AsyncIterator[Item]:
        """The source's items until it ends or a stop is requested; then an error and an End for
        every session still live."""
        it = self.source.__aiter__()
        stop = asyncio.ensure_future(self._stop.wait())
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
            if hasattr(it, "aclose"):
                await it.aclose()
        if self._stop.is_set():
            for s in sorted(self.live):
                yield SessionError(s, self.stop_reason)
                yield End(s, self.stats.session(s).input_samples, time.monotonic())

    async def _feed(self, q: InputQueue) -> None:
        async for item in self._items():
            s = item.session
            if isinstance(item, End):
                self.live.discard(s)
            else:
                self.live.add(s)
            if isinstance(item, AudioChunk):
                if s in self.failed:
                    continue
                why = check_chunk(item, self.stats.sample_rate)
                if why is None and item.samples.numel() > self.max_chunk:
                    why = f"audio chunk {item.seq} of {item.samples.numel() / self.stats.sample_rate:.1f} s exceeds the {MAX_CHUNK_SECONDS:.0f} s limit for one chunk"
                if why is not None:
                    self.failed.add(s)
                    item = SessionError(s, why)
                else:
                    st = self.stats.session(s)
                    if st.started_at is None:
                        st.started_at = item.captured_at - item.samples.numel() / self.stats.sample_rate
                    st.input_samples += item.samples.numel()
            elif isinstance(item, End):
                st = self.stats.session(s)
                st.input_end_at = item.captured_at
                if st.input_samples == 0 and s not in self.failed:
                    await q.put(SessionError(s, "the session ended without any audio (empty input)"))
                self.failed.discard(s)
            elif isinstance(item, SessionError):
                self.failed.add(s)
            if self.overflow == "drop-oldest" and q.full() and isinstance(item, AudioChunk):
                dropped = q.drop_oldest_audio()
                if dropped is not None:
                    self.stats.session(dropped.session).dropped_chunks += 1
                    self.stats.event(event="dropped", session=dropped.session, seq=dropped.seq)
            await q.put(item)

    async def _run_stage(self, stage: Stage, executor, inq: asyncio.Queue, outq: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        failed: set[str] = set()

        def work(item: Item) -> tuple[float, str | None]:
            """Run the stage on one item in the worker thread, handing each output on as it comes."""
            compute, t = 0.0, time.perf_counter()
            try:
                for out in stage.process(item):
                    compute += time.perf_counter() - t
                    asyncio.run_coroutine_threadsafe(outq.put(out), loop).result()
                    t = time.perf_counter()
                return compute + time.perf_counter() - t, None
            except Exception as e:  # one session's failure must not stop the others
                log.exception("%s failed on session %r", stage.name, item.session)
                stage.close(item.session)
                return compute + time.perf_counter() - t, f"{stage.name}: {type(e).__name__}: {e}"

        while True:
            item = await inq.get()
            if item is _STOP:
                await outq.put(_STOP)
                return
            s = item.session
            if isinstance(item, SessionError):
                stage.close(s)
                failed.add(s)
                await outq.put(item)
                continue
            if s in failed:
                if isinstance(item, End):  # let every stage, and the sink, see the session end
                    failed.discard(s)
                    await outq.put(item)
                continue
            compute, error = await loop.run_in_executor(executor, work, item)
            st = self.stats.session(s)
            st.compute[stage.name] = st.compute.get(stage.name, 0.0) + compute
            self.stats.event(event="stage", stage=stage.name, session=s, item=type(item).__name__,
                             seq=getattr(item, "seq", None), compute_ms=round(1000 * compute, 3),
                             algorithmic_ms=round(1000 * stage.wait_s, 1),
                             since_capture_ms=round(1000 * (time.monotonic() - getattr(item, "captured_at", time.monotonic())), 3))
            if error is not None:
                failed.add(s)
                await outq.put(SessionError(s, error))

    async def _drain(self, q: asyncio.Queue) -> None:
        while True:
            item = await q.get()
            if item is _STOP:
                return
            st = self.stats.session(item.session)
            if isinstance(item, AudioOut):
                item.emitted_at = time.monotonic()
                st.outputs.append((1000 * item.source_samples / self.stats.sample_rate, item.emitted_at, item.samples.numel()))
            elif isinstance(item, SessionError):
                st.error = item.message
                self.stats.event(event="error", session=item.session, message=item.message)
            elif isinstance(item, End):
                self.stats.event(event="session", **st.summary())
            await self.sink.write(item)


def build_stages(bundle, task: str = "continuation", options: dict | None = None, *, chunk_ms: int = 100,
                 left_context_ms: int | None = 2000, lookahead_ms: int | None = 100, vocoder_lookahead: int | None = None,
                 vad: bool = False, seed: int | None = 0) -> list[Stage]:
    """The standard chain: chunker (+VAD) -> unit encoder -> generator (task policy) -> vocoder.
    None for a context means unbounded (everything before / until the end of input)."""
    from .stages import Chunker, Generator, UnitEncoder, Vad, Vocoder

    sr, hop = bundle.sample_rate, bundle.need("hubert").cfg.hop
    frames = lambda ms: None if ms is None else sr * ms // 1000 // hop
    return [
        Chunker(sr * chunk_ms // 1000, Vad(sr) if vad else None, sr),
        UnitEncoder(bundle, frames(left_context_ms), frames(lookahead_ms)),
        Generator(bundle, task, options, seed),
        Vocoder(bundle, vocoder_lookahead),
    ]
