"""`streamgen serve`: one process, one engine (the Pipeline), an HTTP/WebSocket server (uvicorn) and
optionally an MQTT cluster link, all on one event loop.

Life cycle: print a banner once listening; a one-line status every `status_every_s`; on SIGTERM or
SIGINT stop taking sessions, give live ones up to `drain_s` to finish, then end the rest with an
error to their clients (`Pipeline.request_stop`), print the final figures and return (exit 0). A
second signal ends the live sessions at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import uvicorn

from ..pipeline.engine import Engine
from ..pipeline.runner import Pipeline
from ..pipeline.stats import Stats
from . import ServeError
from .app import HttpOptions, build_app, is_loopback
from .hub import Hub
from .metrics import ServeMetrics

SHUTDOWN_REASON = "the server is shutting down"


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    http: HttpOptions = field(default_factory=HttpOptions)
    max_sessions: int = 16  # live sessions in the engine, all front ends together
    idle_timeout_s: float = 30.0  # a session with no input this long is ended
    status_every_s: float = 10.0  # console status line; 0: none
    drain_s: float = 10.0  # on SIGTERM, how long live sessions may go on before they are ended
    mqtt: object | None = None  # cluster.ClusterOptions


def percentile(xs, q: float) -> float | None:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def listen(host: str, port: int) -> socket.socket:
    """A bound socket for the HTTP server (so port 0 and bind errors are known before it starts)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise ServeError(f"cannot listen on {host}:{port} ({e.strerror}); choose another with --http HOST:PORT") from None
    return sock


HTTP_HEADROOM = 32  # plain HTTP requests (the page, /healthz, /metrics) beside a full house of WebSockets


class _DenialIsNotAnError(logging.Filter):
    """uvicorn logs an ERROR for every WebSocket handshake refused with an HTTP status (a draining server, the
    connection cap): each is this server's answer, not a fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("ASGI callable returned without completing handshake")


class _Http(uvicorn.Server):
    """uvicorn's server without its signal handlers: this process handles SIGTERM/SIGINT itself."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class Server:
    def __init__(self, engine: Engine, opts: ServeOptions, describe: str = "",
                 echo: Callable[[str], None] | None = None):
        self.opts, self.describe = opts, describe
        self.echo = echo or (lambda line: print(line, flush=True))
        self.stats = Stats(engine.bundle.sample_rate, chunk_records=0)  # a service keeps running figures only
        self.metrics = ServeMetrics()
        self.hub = Hub(self.stats, self.metrics, opts.max_sessions, idle_timeout_s=opts.idle_timeout_s)
        self.pipeline = Pipeline(self.hub, engine, self.hub, self.stats)
        self.metrics.bind_engine(engine)
        self.app = build_app(self.hub, opts.http, local_only=is_loopback(opts.host))
        self.cluster = None
        self.port: int | None = None
        self.started_at = time.monotonic()
        self._signals = 0

    async def run(self) -> Stats:
        loop = asyncio.get_running_loop()
        o = self.opts
        http = _Http(uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                    # the WebSocket endpoint counts its own connections (uvicorn's limit skips upgrades
                                    # yet counts them, so it refused /healthz and /metrics instead); plain HTTP keeps room
                                    ws_max_size=4 * o.http.max_frame_bytes, limit_concurrency=o.http.max_connections + HTTP_HEADROOM,
                                    timeout_graceful_shutdown=5))
        uvicorn_log = logging.getLogger("uvicorn.error")
        if not any(isinstance(f, _DenialIsNotAnError) for f in uvicorn_log.filters):
            uvicorn_log.addFilter(_DenialIsNotAnError())
        sock = listen(o.host, o.port)
        self.port = sock.getsockname()[1]
        if o.mqtt is not None:
            from .cluster import ClusterLink

            self.cluster = ClusterLink(self.hub, o.mqtt, o.http.default_task, o.http.default_options)
            try:
                await self.cluster.start()
            except ServeError:
                sock.close()
                raise
        http_task = loop.create_task(http.serve(sockets=[sock]))
        while not http.started and not http_task.done():
            await asyncio.sleep(0.01)
        if http_task.done():
            http_task.result()
            raise ServeError(f"the HTTP server on {o.host}:{self.port} stopped at start-up")
        engine = loop.create_task(self.pipeline.run())
        ticker = loop.create_task(self._tick())
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.echo(self.banner())
        try:
            await engine
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            await asyncio.gather(*(c.flush(2.0) for c in list(self.app.state.connections)))
            if self.cluster is not None:
                await self.cluster.stop()
            http.should_exit = True
            await http_task
        self.echo(self.final())
        return self.stats

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals == 1 and self.hub.sessions:
            self.echo(f"{signal.Signals(sig).name}: draining {len(self.hub.sessions)} live session(s) for up to {self.opts.drain_s:.0f} s "
                      "(signal again to end them now)")
            self.hub.accepting = False
            if self.cluster is not None:
                self.cluster.draining()
            asyncio.get_running_loop().create_task(self._drain())
        else:
            self.echo(f"{signal.Signals(sig).name}: ending {len(self.hub.sessions)} live session(s)")
            self.stop()

    def stop(self, reason: str = SHUTDOWN_REASON) -> None:
        self.hub.accepting = False
        self.pipeline.request_stop(reason)

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.opts.drain_s
        while self.hub.sessions and time.monotonic() < deadline:
            self.hub.slot_freed.clear()
            try:
                await asyncio.wait_for(self.hub.slot_freed.wait(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
        self.stop()

    async def _tick(self) -> None:
        last_status = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            await self.hub.tick()
            if self.cluster is not None:
                self.cluster.tick()
            if self.opts.status_every_s and time.monotonic() - last_status >= self.opts.status_every_s:
                last_status = time.monotonic()
                self.echo(self.status())

    def _count(self, name: str, **labels) -> int:
        return int(self.metrics.registry.get_sample_value(name, labels) or 0)

    def status(self) -> str:
        m = self.metrics
        lags = list(m.recent_lags)
        lag = f"lag p50 {percentile(lags, 0.5):.2f} s p95 {percentile(lags, 0.95):.2f} s" if lags else "lag -"
        queues = " ".join(f"{k} {v}" for k, v in m.queue_depths().items())
        ok, err = self._count("streamgen_sessions_ended_total", outcome="ok"), self._count("streamgen_sessions_ended_total", outcome="error")
        refused = sum(self._count("streamgen_sessions_refused_total", reason=r) for r in ("capacity", "draining", "connection_limit", "busy"))
        return (f"{time.strftime('%H:%M:%S')} live {len(self.hub.sessions)}/{self.hub.max_sessions} | ended {ok + err} ({err} with errors) "
                f"| refused {refused} | {lag} | queues {queues}")

    def banner(self) -> str:
        o = self.opts
        base = f"[{o.host}]:{self.port}" if ":" in o.host else f"{o.host}:{self.port}"  # an IPv6 literal in a URL is bracketed
        auth = " (bearer token required)" if o.http.token else ""
        lines = [f"streamgen serve: {self.describe}",
                 f"  default task {o.http.default_task}; up to {o.max_sessions} live sessions, {o.http.max_sessions_per_connection} per connection "
                 f"(one at a time), frames up to {o.http.max_frame_bytes} bytes",
                 f"  page       http://{base}/",
                 f"  websocket  ws://{base}/ws{auth}",
                 f"  metrics    http://{base}/metrics{auth}",
                 f"  health     http://{base}/healthz"]
        if self.cluster is not None:
            lines.append(f"  mqtt       {self.cluster.describe()}")
        if not is_loopback(o.host) and not o.http.token:
            lines.append("  warning: listening beyond loopback without a token: anyone who can reach this port can use it")
        lines.append("SIGTERM or Ctrl-C drains the live sessions and exits")
        return "\n".join(lines)

    def final(self) -> str:
        m = self.metrics
        ok, err = self._count("streamgen_sessions_ended_total", outcome="ok"), self._count("streamgen_sessions_ended_total", outcome="error")
        refused = {r: self._count("streamgen_sessions_refused_total", reason=r) for r in ("capacity", "draining", "connection_limit", "busy")}
        lags = list(m.recent_lags)
        out = [f"streamgen serve stopped after {time.monotonic() - self.started_at:.0f} s: {ok + err} sessions ended ({err} with errors), "
               f"refused {sum(refused.values())} ({', '.join(f'{k} {v}' for k, v in refused.items())}), "
               f"{m.registry.get_sample_value('streamgen_audio_output_seconds_total') or 0:.1f} s of audio sent"]
        if lags:
            out.append(f"  chunk lag: median {percentile(lags, 0.5):.3f} s, p95 {percentile(lags, 0.95):.3f} s, max {max(lags):.3f} s "
                       f"(last {len(lags)} chunks)")
        compute = m.compute_by_stage()
        if compute:
            out.append("  compute: " + ", ".join(f"{k} {v:.2f} s" for k, v in compute.items()))
        return "\n".join(out)


def run_server(engine: Engine, opts: ServeOptions, describe: str = "") -> int:
    """Run until stopped by a signal; the exit status (0 after a drain)."""
    server = Server(engine, opts, describe)
    try:
        asyncio.run(server.run())
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
