"""One engine, many clients: the Hub is the Pipeline's source and its sink.

Client front ends (WebSocket connections, the MQTT cluster link) open sessions on the hub, each
with a `Route` back to whoever opened it, and put their sessions' items into one bounded inbox;
the pipeline reads that inbox as its source. What the pipeline emits (AudioOut, SessionError, End)
comes back through `write` and goes to the session's route only, so a client can reach nothing but
the sessions it opened. Routes never block the engine: each buffers what it is given and drops its
client when that client stops reading.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Protocol

import torch

from ..audio import ahead_of_real_time
from ..pipeline.items import AudioChunk, AudioOut, End, Item, SessionError
from ..pipeline.stats import Stats
from .metrics import ServeMetrics

STATS_EVERY_S = 0.5  # a session's live figures go to its client at most this often
FORGET_AFTER_S = 5.0  # an ended session's figures stay in Stats this long, then go (a server runs for months)


class Route(Protocol):
    """Where one client's session output goes. Must not block."""

    def audio(self, session: str, samples: torch.Tensor) -> None: ...

    def control(self, session: str, body: dict) -> None: ...

    def ended(self, session: str) -> None:
        """The session is over in the engine (after its last message)."""


class _Session:
    def __init__(self, route: Route | None, via: str):
        self.route, self.via = route, via
        self.input_open = True
        self.opened_at = self.last_input = time.monotonic()
        self.input_samples = 0
        self.stats_sent_at = 0.0
        self.error: str | None = None


class Hub:
    def __init__(self, stats: Stats, metrics: ServeMetrics, max_sessions: int = 16, inbox_size: int = 64,
                 idle_timeout_s: float = 30.0):
        self.stats, self.metrics = stats, metrics
        self.max_sessions, self.idle_timeout = max_sessions, idle_timeout_s
        self.inbox: asyncio.Queue[Item] = asyncio.Queue(inbox_size)
        self.sessions: dict[str, _Session] = {}
        self.accepting = True
        self.slot_freed = asyncio.Event()  # set whenever a session ends (front ends waiting for capacity)
        self._forget: deque[tuple[float, str]] = deque()
        metrics.bind_hub(self)

    # -- front ends ------------------------------------------------------------------------------
    def open(self, session: str, route: Route, via: str) -> str | None:
        """Register a new session; None, or why it is refused (one line for the client)."""
        if not self.accepting:
            self.metrics.refused.labels(reason="draining").inc()
            return "the server is shutting down and takes no new sessions; try another server or retry later"
        if len(self.sessions) >= self.max_sessions:
            self.metrics.refused.labels(reason="capacity").inc()
            return f"the server is at capacity ({self.max_sessions} live sessions); retry later"
        if session in self.sessions:
            return f"session {session!r} is already live"
        self.sessions[session] = _Session(route, via)
        self.metrics.started.labels(via=via).inc()
        return None

    @property
    def full(self) -> bool:
        return len(self.sessions) >= self.max_sessions

    async def put(self, item: Item) -> None:
        """Hand one of an open session's input items (AudioChunk, Control, End, SessionError) to the engine."""
        s = self.sessions.get(item.session)
        if s is None or not s.input_open:
            return
        s.last_input = time.monotonic()
        if isinstance(item, AudioChunk):
            s.input_samples += item.samples.numel()
            why = ahead_of_real_time(s.input_samples / self.stats.sample_rate, s.last_input - s.opened_at)
            if why is not None:
                await self.abort(item.session, why)
                return
        if isinstance(item, End):
            s.input_open = False
            # shielded: a front end cancelled while the inbox is full (its client vanished) must not lose the
            # End, or the session would hold its slot for good (its input is already closed here)
            await asyncio.shield(self.inbox.put(item))
            return
        await self.inbox.put(item)

    async def abort(self, session: str, message: str) -> None:
        """End a session's input with an error (its client broke the protocol, vanished or idled)."""
        s = self.sessions.get(session)
        if s is None or not s.input_open:
            return
        await self.put(SessionError(session, message))
        await self.put(End(session, self.stats.input_record(session).input_samples, time.monotonic()))

    def detach(self, session: str) -> None:
        """The client is gone: drop the session's output (the engine still finishes and frees it)."""
        s = self.sessions.get(session)
        if s is not None:
            s.route = None

    # -- the pipeline's source -------------------------------------------------------------------
    async def __aiter__(self) -> AsyncIterator[Item]:
        while True:
            yield await self.inbox.get()

    # -- the pipeline's sink ---------------------------------------------------------------------
    async def write(self, item: Item) -> None:
        s = self.sessions.get(item.session)
        if s is None:
            return
        now = time.monotonic()
        if isinstance(item, AudioOut):
            st = self.stats.current(item.session)
            lag = None
            if st is not None and st.started_at is not None:
                lag = (item.emitted_at - st.started_at) - item.source_samples / self.stats.sample_rate
                self.metrics.chunk_lag(lag)
                if st.output_chunks == 1:
                    self.metrics.first_audio.observe(item.emitted_at - st.started_at)
            self.metrics.audio_out.inc(item.samples.numel() / self.stats.sample_rate)
            if s.route is not None:
                s.route.audio(item.session, item.samples)
                if now - s.stats_sent_at >= STATS_EVERY_S:
                    s.stats_sent_at = now
                    s.route.control(item.session, {"type": "stats", **self.live_figures(item.session, lag)})
        elif isinstance(item, SessionError):
            s.error = item.message
            if item.message.startswith("busy:"):  # the engine refused it (full, or behind real time)
                self.metrics.refused.labels(reason="busy").inc()
            if s.route is not None:
                s.route.control(item.session, {"type": "error", "message": item.message})
        elif isinstance(item, End):
            del self.sessions[item.session]
            self.metrics.ended.labels(outcome="error" if s.error else "ok").inc()
            st = self.stats.current(item.session)
            if st is not None:
                self._forget.append((now, st.key))  # (its key: the id may be in use again by then)
            if s.route is not None:
                if st is not None:
                    s.route.control(item.session, {"type": "stats", "final": True, **st.summary()})
                s.route.control(item.session, {"type": "end"})
                s.route.ended(item.session)
            self.slot_freed.set()

    async def close(self) -> None:
        """The engine has stopped: sessions it never saw end here, with the reason."""
        for name, s in list(self.sessions.items()):
            if s.route is not None:
                s.route.control(name, {"type": "error", "message": "the server is shutting down"})
                s.route.control(name, {"type": "end"})
                s.route.ended(name)
        self.sessions.clear()
        self.slot_freed.set()

    def live_figures(self, session: str, lag: float | None) -> dict:
        st = self.stats.current(session)
        if st is None:
            return {}
        out = {"input_s": round(st.input_samples / st.sample_rate, 3),
               "output_s": round(st.output_samples / st.sample_rate, 3),
               "rtf": round(sum(st.compute.values()) / max(st.input_samples / st.sample_rate, 1e-9), 4)}
        if st.first_output is not None and st.started_at is not None:
            out["first_audio_ms"] = round(1000 * (st.first_output[1] - st.started_at), 1)
        if lag is not None:
            out["lag_ms"] = round(1000 * lag, 1)
        return out

    # -- housekeeping, once a second -------------------------------------------------------------
    async def tick(self) -> None:
        now = time.monotonic()
        for name, s in list(self.sessions.items()):
            if s.input_open and now - s.last_input > self.idle_timeout:
                await self.abort(name, f"no input for {self.idle_timeout:.0f} s; the session is ended")
        while self._forget and now - self._forget[0][0] > FORGET_AFTER_S:
            _, key = self._forget.popleft()
            if (st := self.stats.sessions.get(key)) is not None and st.closed:
                del self.stats.sessions[key]
