"""The HTTP side of `streamgen serve` (Starlette): the page, the WebSocket endpoint, /metrics, /healthz.

WebSocket protocol (`/ws`), one live session at a time per connection:

    in   text    {"type": "start", "task": "continuation", "options": {...}, "sample_rate": 48000}
         binary  PCM16 little-endian mono audio at the start message's sample rate
         text    {"type": "stop"}                      end of input: the session flushes, then ends
    out  text    {"type": "started", "session": ID, "task": ..., "sample_rate": 16000}
         binary  PCM16 little-endian mono audio at the "started" sample rate
         text    {"type": "stats", ...}                live figures (first_audio_ms, lag_ms, ...), and a final one
         text    {"type": "error", "message": ...}
         text    {"type": "end"}                       after the session's last message; a new start may follow

Session ids are made by the server, so a connection reaches only the sessions it opened.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from importlib import resources
from urllib.parse import urlparse

import numpy as np
import soxr
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..audio import pcm16_decode, pcm16_encode
from ..io.mqtt import MAX_RATE, MIN_RATE, control_body, options_problem
from ..pipeline.items import AudioChunk, Control, End
from ..pipeline.tasks import available_tasks, load_task
from .hub import Hub

log = logging.getLogger("streamgen.serve")
MAX_CONTROL_BYTES = 4096
FIELDS = {"start": {"type", "task", "options", "sample_rate"}, "stop": {"type"}}  # what each control message takes
PAGE = resources.files("streamgen.serve") / "page"
CSP = "default-src 'self'; connect-src 'self' ws: wss:; style-src 'self'; img-src 'self' data:"


@dataclass
class HttpOptions:
    default_task: str = "continuation"
    default_options: dict = field(default_factory=dict)
    token: str | None = None  # bearer token for /ws and /metrics; None: open
    allow_origins: tuple[str, ...] = ()  # WebSocket Origins allowed besides the server's own
    max_frame_bytes: int = 65536  # one binary (audio) frame
    max_sessions_per_connection: int = 64  # sessions one connection may open, one at a time
    send_buffer: int = 2048  # messages queued for a client before it counts as not reading
    max_connections: int = 256  # open HTTP/WebSocket connections; more get HTTP 503


class ProtocolError(Exception):
    pass


def unknown_fields(body: dict) -> str | None:
    """A control message's fields that its type does not take (a misspelt "sample_rate" was ignored, and the audio
    read at the wrong rate), named; None if there are none."""
    extra = sorted(set(body) - FIELDS[body["type"]])
    if not extra:
        return None
    named = ", ".join(repr(k[:40]) for k in extra[:4]) + (f" and {len(extra) - 4} more" if len(extra) > 4 else "")
    return (f'{body["type"]} message with unknown field{"s" if len(extra) > 1 else ""} {named}; '
            f'it takes {", ".join(sorted(FIELDS[body["type"]]))}')


def _token_ok(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def bearer(headers) -> str | None:
    auth = headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else None


class WsConnection:
    """One WebSocket client: its input goes to the hub, its sessions' output comes back here."""

    def __init__(self, ws: WebSocket, hub: Hub, opts: HttpOptions):
        self.ws, self.hub, self.opts = ws, hub, opts
        self.rate = hub.stats.sample_rate
        self.prefix = secrets.token_hex(6)
        self.opened = 0
        self.current: str | None = None  # the session whose input is open
        self.running: str | None = None  # the session started here that the engine has not ended
        self.ended_early: str | None = None  # ended by the engine (busy, VAD, an error) while its client still sent
        self.seq = self.pos = 0
        self.in_rate = self.rate
        self.resampler = None
        self.out: asyncio.Queue = asyncio.Queue(opts.send_buffer)
        self.overflow = asyncio.Event()
        self.idle_since = time.monotonic()  # when it last had no session running

    # Route (called by the hub; never blocks)
    def audio(self, session: str, samples: torch.Tensor) -> None:
        self._send(pcm16_encode(samples.numpy()).tobytes())

    def control(self, session: str, body: dict) -> None:
        self._send(json.dumps(body))

    def ended(self, session: str) -> None:
        if self.running == session:
            self.running = None
            self.idle_since = time.monotonic()
        if self.current == session:  # the client has not sent stop: what it still sends is dropped, not an error
            self.current, self.ended_early = None, session

    def _send(self, msg: bytes | str) -> None:
        try:
            self.out.put_nowait(msg)
        except asyncio.QueueFull:
            self.overflow.set()

    async def run(self) -> None:
        tasks = [asyncio.ensure_future(c) for c in (self._receive(), self._write(), self.overflow.wait(), self._idle())]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        too_slow = tasks[2] in done
        if tasks[3] in done:  # no session for the idle timeout: the connection's place goes to someone else
            try:
                await self.ws.close(code=1000, reason=f"no session for {self.hub.idle_timeout:.0f} s")
            except (RuntimeError, OSError):
                pass
        if self.current is not None:
            await self.hub.abort(self.current, "the client did not read its output fast enough" if too_slow else "the client disconnected")
        if self.running is not None:
            self.hub.detach(self.running)
        if too_slow:
            try:
                await self.ws.close(code=1008, reason="the client did not read its output fast enough")
            except (RuntimeError, OSError):
                pass  # already gone

    async def _idle(self) -> None:
        """Returns once the connection has had no session running for the hub's idle timeout."""
        while True:
            left = self.idle_since + self.hub.idle_timeout - time.monotonic()
            if self.running is None and left <= 0:
                return
            await asyncio.sleep(max(0.05, left if self.running is None else self.hub.idle_timeout))

    async def flush(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.out.empty() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def _write(self) -> None:
        try:
            while True:
                msg = await self.out.get()
                if isinstance(msg, bytes):
                    await self.ws.send_bytes(msg)
                else:
                    await self.ws.send_text(msg)
        except (WebSocketDisconnect, RuntimeError, OSError):
            return  # the client went away; the receive side ends the session

    async def _receive(self) -> None:
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            try:
                if msg.get("bytes") is not None:
                    await self._audio(msg["bytes"])
                elif msg.get("text") is not None:
                    await self._control(msg["text"])
            except Exception as e:  # whatever a message does, it ends at most this connection's session
                if not isinstance(e, ProtocolError):
                    log.exception("WebSocket message not handled")
                    e = ProtocolError(f"the server could not handle this message ({type(e).__name__}; see its log)")
                self.hub.metrics.protocol_errors.labels(via="ws").inc()
                if self.current is not None:  # its input stream is broken: end the session with the error
                    await self.hub.abort(self.current, str(e))
                else:
                    self.control("", {"type": "error", "message": str(e)})

    async def _control(self, text: str) -> None:
        size = len(text.encode())
        if size > MAX_CONTROL_BYTES:
            raise ProtocolError(f"control message of {size} bytes exceeds the {MAX_CONTROL_BYTES}-byte limit")
        try:
            body = control_body(text)
        except ValueError as e:
            raise ProtocolError(f'control message {e} ("start" or "stop")') from None
        if body["type"] == "stop" and (why := unknown_fields(body)):
            raise ProtocolError(why)
        if body["type"] == "start":
            why = self._refusal(body)
            if why is not None:  # answered alone: a running session is not touched
                self.control("", {"type": "error", "message": why})
                return
            await self._start(body)
        elif body["type"] == "stop":
            await self._stop()
        else:
            raise ProtocolError(f'unknown control message type {body["type"]!r}; expected "start" or "stop"')

    def _refusal(self, body: dict) -> str | None:
        """Why a start message cannot begin a session, or None."""
        if self.running is not None:
            self.hub.metrics.protocol_errors.labels(via="ws").inc()
            return "a session is already running on this connection: send stop and wait for its end, then start again"
        why = self._start_problem(body)
        if why is not None:
            self.hub.metrics.protocol_errors.labels(via="ws").inc()
            return why
        if self.opened >= self.opts.max_sessions_per_connection:
            self.hub.metrics.refused.labels(reason="connection_limit").inc()
            return f"this connection has opened its limit of {self.opts.max_sessions_per_connection} sessions; open a new connection"
        return None

    def _start_problem(self, body: dict) -> str | None:
        """What in a start message breaks the protocol (a field, the task, an option, the rate), or None."""
        task, options, rate = body.get("task"), body.get("options", {}), body.get("sample_rate", self.rate)
        if (why := unknown_fields(body)) is not None:
            return why
        if task is not None and not isinstance(task, str):
            return '"task" must be a task name (see /tasks)'
        if (why := options_problem(options)) is not None:
            return why
        if not isinstance(rate, int) or not MIN_RATE <= rate <= MAX_RATE:
            return f'"sample_rate" must be an integer from {MIN_RATE} to {MAX_RATE} Hz, got {rate!r}'
        try:
            load_task(self._task(body)).resolve_options(self._options(body))
        except ValueError as e:
            return str(e)
        return None

    def _task(self, body: dict) -> str:
        return body.get("task") or self.opts.default_task

    def _options(self, body: dict) -> dict:
        """A start message's options; for the server's default task (no task named), over the server's --opt."""
        return body.get("options", {}) if body.get("task") else {**self.opts.default_options, **body.get("options", {})}

    async def _start(self, body: dict) -> None:
        task, options = self._task(body), self._options(body)
        session = f"{self.prefix}-{self.opened}"
        why = self.hub.open(session, self, "ws")
        if why is not None:
            self.control("", {"type": "error", "message": why})
            return
        self.opened += 1
        self.current = self.running = session
        self.ended_early = None
        self.seq = self.pos = 0
        self.in_rate = body.get("sample_rate", self.rate)
        self.resampler = soxr.ResampleStream(self.in_rate, self.rate, 1, dtype="float32", quality="HQ") if self.in_rate != self.rate else None
        self.control(session, {"type": "started", "session": session, "task": task, "sample_rate": self.rate})
        await self.hub.put(Control(session, "start", task, options))

    async def _stop(self) -> None:
        if self.current is None and self.ended_early is not None:
            self.ended_early = None  # the stop of a session the engine already ended (its client was told)
            return
        if self.current is None:
            raise ProtocolError("stop without a live session on this connection")
        if self.resampler is not None:
            await self._put_audio(self.resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        await self.hub.put(End(self.current, self.pos, time.monotonic()))
        self.current = None

    async def _audio(self, data: bytes) -> None:
        if self.current is None and self.ended_early is not None:
            return  # in flight when the engine ended its session (the client has its error and end)
        if self.current is None:
            raise ProtocolError('audio before start: send {"type": "start", ...} first' if self.running is None
                                else "audio after stop: wait for the end of this session, then start another")
        if len(data) > self.opts.max_frame_bytes:
            raise ProtocolError(f"audio frame of {len(data)} bytes exceeds the limit of {self.opts.max_frame_bytes} bytes "
                                f"({self.opts.max_frame_bytes / 2 / self.in_rate:.2f} s at {self.in_rate} Hz); send smaller frames")
        if not data or len(data) % 2:
            raise ProtocolError(f"audio frame of {len(data)} bytes is not a whole number of PCM16 samples")
        x = pcm16_decode(np.frombuffer(data, "<i2"))
        await self._put_audio(x if self.resampler is None else self.resampler.resample_chunk(x))

    async def _put_audio(self, x: np.ndarray) -> None:
        if not len(x):
            return
        await self.hub.put(AudioChunk(self.current, self.seq, torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), self.pos, time.monotonic()))
        self.seq += 1
        self.pos += len(x)


PAGE_HEADERS = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache"}  # revalidated: an upgrade never pairs
# a new index.html with a cached app.js


class _PageFiles(StaticFiles):
    """The page's files with the page's headers."""

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(PAGE_HEADERS)
        return response


async def _deny(ws: WebSocket, status: int, text: str) -> None:
    """Refuse a WebSocket handshake with an HTTP status (where the server can send one; else a plain refusal)."""
    try:
        await ws.send_denial_response(Response(text, status))
    except (AttributeError, RuntimeError):  # an older Starlette, or a server without the denial extension
        await ws.close(code=1013)


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_NAMES or host.startswith("127.") or host.endswith(".localhost")


def build_app(hub: Hub, opts: HttpOptions, local_only: bool = False) -> Starlette:
    """`local_only`: the server listens on a loopback address. Without a token, a browser page (it sends
    an Origin) must then name the server by a loopback name: a page whose own name an attacker points at
    127.0.0.1 (DNS rebinding) sends an Origin that matches its Host. With a token, as behind a reverse
    proxy (docs/deploy.md), such a page cannot authenticate, and the public name is the Host."""
    connections: set[WsConnection] = set()

    def origin_ok(ws: WebSocket) -> bool:
        origin, host = ws.headers.get("origin"), ws.headers.get("host", "")
        if origin is None or origin in opts.allow_origins:
            return True
        name = urlparse(f"//{host}").hostname or ""
        if opts.token is None and not is_loopback(name):
            # a page may reach this server only by a name no one else can point at it: on a loopback server, a
            # loopback name; on any other (0.0.0.0 answers on loopback too), also an address itself (DNS
            # rebinding needs a domain name; a LAN host name goes in --allow-origin, or use a token)
            if local_only or not is_ip_address(name):
                return False
        return urlparse(origin).netloc == host

    async def ws_endpoint(ws: WebSocket) -> None:
        offered = ws.scope.get("subprotocols", [])
        if opts.token is not None:
            given = bearer(ws.headers) or next((p[len("streamgen.token."):] for p in offered if p.startswith("streamgen.token.")), None)
            if not _token_ok(given, opts.token):
                await ws.close(code=1008)  # before accept: the handshake gets HTTP 403
                return
        if not origin_ok(ws):
            await ws.close(code=1008)
            return
        if not hub.accepting:  # draining: as /healthz says, so a proxy passes the handshake to another worker
            hub.metrics.refused.labels(reason="draining").inc()
            await _deny(ws, 503, "the server is shutting down and takes no new connections; try another server or retry later\n")
            return
        if len(connections) >= opts.max_connections:
            hub.metrics.refused.labels(reason="connection_limit").inc()
            await _deny(ws, 503, f"the server holds its limit of {opts.max_connections} connections; retry later\n")
            return
        await ws.accept(subprotocol="streamgen" if "streamgen" in offered else None)
        conn = WsConnection(ws, hub, opts)
        connections.add(conn)
        hub.metrics.connections.inc()
        try:
            await conn.run()
        finally:
            connections.discard(conn)
            hub.metrics.connections.dec()

    async def metrics(request: Request) -> Response:
        if opts.token is not None and not _token_ok(bearer(request.headers), opts.token):
            return Response("a bearer token is required\n", 401, {"WWW-Authenticate": "Bearer"})
        return Response(hub.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def healthz(request: Request) -> Response:
        body = {"status": "ok" if hub.accepting else "draining", "live_sessions": len(hub.sessions),
                "max_sessions": hub.max_sessions}
        return JSONResponse(body, 200 if hub.accepting else 503)

    async def tasks(request: Request) -> Response:
        out = []
        for name in sorted(available_tasks()):
            try:
                p = load_task(name)
            except Exception:  # a broken plugin is left out of the picker
                continue
            # the server's own --opt defaults for its default task: the page shows, and sends, what this server runs
            defaults = {**p.options, **opts.default_options} if name == opts.default_task else p.options
            out.append({"name": name, "description": p.description, "options": defaults})
        return JSONResponse({"default": opts.default_task, "tasks": out, "auth": opts.token is not None})

    async def index(request: Request) -> Response:
        return FileResponse(PAGE / "index.html", headers=PAGE_HEADERS)

    app = Starlette(routes=[
        Route("/", index), Route("/tasks", tasks), Route("/metrics", metrics), Route("/healthz", healthz),
        WebSocketRoute("/ws", ws_endpoint), Mount("/static", _PageFiles(directory=str(PAGE)), name="static"),
    ])
    app.state.connections = connections
    return app
