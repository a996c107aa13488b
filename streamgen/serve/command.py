"""The `streamgen serve` command (registered in streamgen/cli.py); everything heavy is imported when it runs."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import typer

from ..options import LM_DTYPE_HELP, THREADS_HELP

TOKEN_CHARS = re.compile(r"^[A-Za-z0-9._~+-]{16,512}$")


def read_token(token_file: Path | None) -> str | None:
    """The bearer token: --token-file, else $STREAMGEN_TOKEN, else None (no authentication)."""
    from ..options import fail

    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as e:
            fail(f"--token-file {token_file}: {e.strerror}")
        where = f"--token-file {token_file}"
    else:
        token = os.environ.get("STREAMGEN_TOKEN", "").strip() or None
        where = "$STREAMGEN_TOKEN"
    if token is not None and not TOKEN_CHARS.match(token):
        fail(f"{where}: a token must be 16-512 letters, digits or . _ ~ + - (it travels in a WebSocket subprotocol); "
             "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return token


def parse_hostport(text: str) -> tuple[str, int]:
    from ..options import fail

    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        fail(f"--http {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8000 (port 0 picks a free one)")
    return host.strip("[]"), int(port)


def serve(
    http: str = typer.Option("127.0.0.1:8000", help="HOST:PORT for the page, /ws, /metrics and /healthz (loopback by default)."),
    mqtt: Optional[str] = typer.Option(None, help="Also take sessions over MQTT as a cluster worker: mqtt://host[:port]/PREFIX (mqtts:// for TLS)."),
    task: str = typer.Option("continuation", help="Task for sessions that do not name one."),
    opt: list[str] = typer.Option([], "--opt", help="Default task option KEY=VALUE (repeatable)."),
    bundle: Optional[Path] = typer.Option(None, help="Bundle directory (default: the shipped one)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    lm_dtype: Optional[str] = typer.Option(None, help=LM_DTYPE_HELP),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    chunk_ms: int = typer.Option(320, help="Pipeline chunk size in ms."),
    left_context_ms: int = typer.Option(2000, help="Encoder left context in ms (-1: everything)."),
    lookahead_ms: int = typer.Option(100, help="Encoder look-ahead in ms."),
    vocoder_lookahead: int = typer.Option(-1, help="Vocoder look-ahead in frames (-1: exact)."),
    vad: bool = typer.Option(False, help="End each session's input after trailing silence."),
    max_sessions: int = typer.Option(16, help="Live sessions at once, all clients together; more are refused (MQTT: left to other workers)."),
    max_sessions_per_connection: int = typer.Option(64, help="Sessions one WebSocket connection may open (one at a time)."),
    max_frame_bytes: int = typer.Option(65536, help="Largest binary (audio) WebSocket frame; 4x this closes the connection."),
    max_connections: int = typer.Option(256, help="Open HTTP/WebSocket connections at once; more get HTTP 503."),
    idle_timeout: float = typer.Option(30.0, help="End a session that sends nothing, and close a connection with no session, after this many seconds."),
    drain: float = typer.Option(10.0, help="On SIGTERM/SIGINT, seconds live sessions may go on before they are ended."),
    status_every: float = typer.Option(10.0, help="Seconds between console status lines (0: none)."),
    token_file: Optional[Path] = typer.Option(None, help="File holding the bearer token for /ws and /metrics (else $STREAMGEN_TOKEN; neither: open)."),
    allow_origin: list[str] = typer.Option([], "--allow-origin", help="A web origin (https://host) allowed to open /ws besides this server's own."),
    worker_id: Optional[str] = typer.Option(None, help="MQTT: this worker's name (default: host-pid)."),
    mqtt_username: Optional[str] = typer.Option(None, help="MQTT user; the password comes from $STREAMGEN_MQTT_PASSWORD."),
    mqtt_ca: Optional[str] = typer.Option(None, help="CA file for TLS."), mqtt_cert: Optional[str] = typer.Option(None),
    mqtt_key: Optional[str] = typer.Option(None),
    queue_size: int = typer.Option(16, help="Items per queue between stages."),
    overflow: str = typer.Option("block", help="When the engine falls behind: block, or drop-oldest input."),
    busy_lag_ms: int = typer.Option(0, help="Refuse new sessions (\"busy\") while the engine is this far behind real time: "
                                           "a live session's input waiting for it, or the answers to sessions still talking leaving "
                                           "this long after their input arrived (0: never; clients must then send in real time)."),
    seed: int = typer.Option(0),
):
    """Serve live sessions: a web page, a WebSocket endpoint, /metrics, and MQTT cluster workers."""
    import logging

    from ..options import UsageError, check_device, check_lm_dtype, fail, need_module, open_bundle, parse_kv, set_engine_threads
    from ..pipeline.engine import build_engine
    from ..pipeline.tasks import UnknownTask

    try:
        for module in ("starlette", "uvicorn", "prometheus_client"):
            need_module(module, "serve", "streamgen serve")
    except UsageError as e:
        fail(str(e))
    from .app import HttpOptions
    from .server import ServeOptions, run_server

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        options = parse_kv(opt)
        lm = check_lm_dtype(lm_dtype)
        set_engine_threads(threads, check_device(device))
    except UsageError as e:
        fail(str(e))
    host, port = parse_hostport(http)
    token = read_token(token_file)
    for name, value in (("--max-sessions", max_sessions), ("--max-sessions-per-connection", max_sessions_per_connection),
                        ("--max-frame-bytes", max_frame_bytes), ("--max-connections", max_connections)):
        if value < 1:
            fail(f"{name} must be at least 1, got {value}")
    for name, value, least in (("--idle-timeout", idle_timeout, 1.0), ("--drain", drain, 0.0), ("--status-every", status_every, 0.0)):
        if not value >= least:  # (nan too)
            fail(f"{name} must be at least {least:g} s, got {value:g}")
    cluster = None
    if mqtt is not None:
        from .cluster import ClusterOptions

        try:
            cluster = ClusterOptions.from_url(mqtt, worker_id=worker_id, username=mqtt_username,
                                              password=os.environ.get("STREAMGEN_MQTT_PASSWORD"), ca=mqtt_ca, cert=mqtt_cert, key=mqtt_key)
        except ValueError as e:
            fail(str(e))
    b = open_bundle(bundle, device, lm)
    try:
        engine = build_engine(b, task, options, chunk_ms=chunk_ms, left_context_ms=None if left_context_ms < 0 else left_context_ms,
                              lookahead_ms=None if lookahead_ms < 0 else lookahead_ms,
                              vocoder_lookahead=None if vocoder_lookahead < 0 else vocoder_lookahead, vad=vad, seed=seed,
                              queue_size=queue_size, overflow=overflow, max_sessions=max_sessions,
                              admit_lag_s=busy_lag_ms / 1000 if busy_lag_ms > 0 else None)
    except (UnknownTask, ValueError, RuntimeError) as e:
        fail(str(e))
    http_opts = HttpOptions(task, options, token, tuple(allow_origin), max_frame_bytes, max_sessions_per_connection,
                            max_connections=max_connections)
    opts = ServeOptions(host, port, http_opts,
                        max_sessions, idle_timeout, status_every, drain, cluster)
    describe = f"bundle {bundle or 'shipped default'} ({b.sample_rate} Hz, {device}), chunks of {chunk_ms} ms"
    raise typer.Exit(run_server(engine, opts, describe))
