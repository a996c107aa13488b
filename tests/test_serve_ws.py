"""`streamgen serve` over its WebSocket protocol, without a browser: a real server process on the tiny
random bundle; concurrent sessions, malformed frames, a vanishing client, the token, SIGTERM."""

import asyncio
import contextlib
import json
import time

import numpy as np
import pytest
import websockets
from websockets.exceptions import InvalidStatus
from serve_helpers import ServeProcess, pcm16, ws_session
from speech import espeak

from streamgen.testing import random_bundle

pytest.importorskip("starlette")

TEXTS = ["the quick brown fox", "a stream of speech", "seven hundred boats", "hello from the server"]
MAX_FRAME = 8192


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    random_bundle(seed=1).save(d)
    return d


@pytest.fixture(scope="module")
def server(bundle_dir):
    s = ServeProcess("--bundle", str(bundle_dir), "--task", "resynthesis", "--max-frame-bytes", str(MAX_FRAME),
                     "--status-every", "1", "--max-sessions", "12")
    yield s
    s.stop()


@contextlib.asynccontextmanager
async def in_process(bundle_dir, engine: dict | None = None, serve: dict | None = None):
    """A server in this process (its engine and hub at hand), on a free port, stopped at the end."""
    from streamgen.bundle import load_bundle
    from streamgen.pipeline.runner import build_engine
    from streamgen.serve.server import Server, ServeOptions

    e = build_engine(load_bundle(bundle_dir), "resynthesis", chunk_ms=320, **(engine or {}))
    srv = Server(e, ServeOptions(port=0, status_every_s=0, **(serve or {})), echo=lambda line: None)
    run = asyncio.ensure_future(srv.run())
    try:
        while srv.port is None:
            await asyncio.sleep(0.05)
        yield srv
    finally:
        srv.stop()
        await asyncio.wait_for(run, 30)


def wave(i: int, rate: int = 16000) -> np.ndarray:
    return espeak(TEXTS[i % len(TEXTS)], rate=rate).numpy()


def sessions_spec():
    """8 sessions: two tasks, four texts, two input rates (48 kHz is resampled by the server)."""
    return [dict(wave=wave(i, rate), rate=rate, task=task)
            for i, (task, rate) in enumerate([("resynthesis", 16000), ("continuation", 48000)] * 4)]


async def test_concurrent_sessions_each_get_what_they_get_alone(server):
    specs = sessions_spec()
    alone = [await ws_session(server.port, **s) for s in specs]
    together = await asyncio.gather(*(ws_session(server.port, **s) for s in specs))
    for (a, ma), (t, mt), s in zip(alone, together, specs):
        assert [m["type"] for m in ma if m["type"] != "stats"] == ["started", "end"], ma
        assert [m["type"] for m in mt if m["type"] != "stats"] == ["started", "end"], mt
        assert len(a) > 1600, f"{s['task']} gave {len(a)} samples"
        assert len(t) == len(a)
        assert np.abs(t.astype(np.int32) - a).max() <= 1, s["task"]  # equal up to PCM16 rounding of float noise
        final = [m for m in mt if m["type"] == "stats" and m.get("final")]
        assert final and final[0]["output_s"] == pytest.approx(len(t) / 16000, abs=1e-3)
    sessions = {m["session"] for _, msgs in together for m in msgs if m["type"] == "started"}
    assert len(sessions) == len(specs)  # server-assigned, one per session
    m = server.metrics()
    assert m[("streamgen_live_sessions", ())] == 0
    assert m[("streamgen_sessions_ended_total", (("outcome", "ok"),))] >= 2 * len(specs)
    assert m[("streamgen_chunk_lag_seconds_count", ())] > 0
    assert any(k[0] == "streamgen_stage_compute_seconds_total" and v > 0 for k, v in m.items())
    assert any(k[0] == "streamgen_queue_depth" for k in m)


async def _first_text(ws) -> dict:
    while True:
        m = await asyncio.wait_for(ws.recv(), 30)
        if isinstance(m, str):
            return json.loads(m)


async def _quiet(ws, seconds: float = 0.5) -> bool:
    try:
        await asyncio.wait_for(ws.recv(), seconds)
        return False
    except TimeoutError:
        return True


async def test_malformed_frames_get_one_error_each_and_touch_nobody_else(server):
    good = dict(wave=wave(0), rate=16000, task="resynthesis")
    reference, _ = await ws_session(server.port, **good)

    async def bad_json():
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
            await ws.send("{not json")
            m = await _first_text(ws)
            assert m["type"] == "error" and "not valid JSON" in m["message"]
            assert await _quiet(ws)
            out, msgs = await ws_session(server.port, ws=ws, **good)  # the connection still works
            assert msgs[-1]["type"] == "end" and len(out) == len(reference)

    async def audio_before_start():
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
            await ws.send(pcm16(np.zeros(320, np.float32)))
            m = await _first_text(ws)
            assert m["type"] == "error" and "audio before start" in m["message"]
            assert await _quiet(ws)

    async def unknown_task():
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
            await ws.send(json.dumps({"type": "start", "task": "nope"}))
            m = await _first_text(ws)
            assert m["type"] == "error" and "unknown task 'nope'" in m["message"]
            assert await _quiet(ws)

    async def unknown_type():
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
            await ws.send(json.dumps({"type": "pause"}))
            m = await _first_text(ws)
            assert m["type"] == "error" and "unknown control message type 'pause'" in m["message"]

    async def oversized_frame():
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
            await ws.send(json.dumps({"type": "start", "task": "resynthesis", "sample_rate": 16000}))
            assert (await _first_text(ws))["type"] == "started"
            await ws.send(pcm16(wave(1)[:3200]))
            await ws.send(b"\0\0" * (MAX_FRAME // 2 + 1))
            texts = []
            while not texts or texts[-1]["type"] != "end":
                texts.append(await _first_text(ws))
            errors = [m for m in texts if m["type"] == "error"]
            assert len(errors) == 1 and f"exceeds the limit of {MAX_FRAME} bytes" in errors[0]["message"]

    async def deep_json():  # within the size limit, deeper than the JSON parser's recursion
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
            await ws.send("[" * 1990 + "]" * 1990)
            m = await _first_text(ws)
            assert m["type"] == "error" and "nests 1990 levels deep" in m["message"]
            out, msgs = await ws_session(server.port, ws=ws, **good)  # the connection still works
            assert msgs[-1]["type"] == "end" and len(out) == len(reference)

    async def overflowing_option():  # 1e400 parses as infinity, which no integer option can take
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
            await ws.send('{"type": "start", "task": "continuation", "options": {"max_units": 1e400}}')
            m = await _first_text(ws)
            assert m["type"] == "error" and "option 'max_units' must be a string" in m["message"] and "float inf" in m["message"]
            assert await _quiet(ws)

    # the good session talks in real time, as a person would, while the others misbehave
    results = await asyncio.gather(ws_session(server.port, realtime=True, **good), bad_json(), audio_before_start(), unknown_task(),
                                   unknown_type(), oversized_frame(), deep_json(), overflowing_option())
    out, msgs = results[0]
    assert [m["type"] for m in msgs if m["type"] != "stats"] == ["started", "end"]
    assert np.abs(out.astype(np.int32) - reference).max() <= 1
    m = server.metrics()
    assert m[("streamgen_protocol_errors_total", (("via", "ws"),))] >= 5
    assert m[("streamgen_live_sessions", ())] == 0


async def test_a_page_at_a_name_pointed_at_the_loopback_is_refused(server):
    """DNS rebinding: an attacker's page whose own name now resolves to 127.0.0.1 sends an Origin that
    matches the Host it sends; a server on a loopback address without a token wants a loopback name."""
    with pytest.raises(InvalidStatus):
        await websockets.connect(f"ws://rebound.example:{server.port}/ws", host="127.0.0.1", port=server.port,
                                 origin=f"http://rebound.example:{server.port}")
    for name in ("localhost", "127.0.0.1"):  # the server's own page, by a loopback name
        async with websockets.connect(f"ws://{name}:{server.port}/ws", host="127.0.0.1", port=server.port,
                                      origin=f"http://{name}:{server.port}"):
            pass
    async with websockets.connect(f"ws://127.0.0.1:{server.port}/ws"):
        pass  # a program (no Origin)


async def test_a_client_that_vanishes_mid_session_is_freed(server):
    before = server.metrics()
    errors_before = before.get(("streamgen_sessions_ended_total", (("outcome", "error"),)), 0)
    ws = await websockets.connect(f"ws://127.0.0.1:{server.port}/ws")
    await ws.send(json.dumps({"type": "start", "task": "continuation", "sample_rate": 16000}))
    assert json.loads(await ws.recv())["type"] == "started"
    x = wave(2)
    for i in range(0, 16000, 800):
        await ws.send(pcm16(x[i : i + 800]))
    assert server.metrics()[("streamgen_live_sessions", ())] == 1
    ws.transport.abort()  # no close handshake: the client is just gone
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = server.metrics()
        if m[("streamgen_live_sessions", ())] == 0:
            break
        await asyncio.sleep(0.2)
    assert m[("streamgen_live_sessions", ())] == 0
    assert m[("streamgen_sessions_ended_total", (("outcome", "error"),))] == errors_before + 1
    assert m[("streamgen_connections", ())] == 0
    assert server.get("/healthz")[0] == 200
    out, msgs = await ws_session(server.port, wave=wave(3), task="resynthesis")  # still serving
    assert msgs[-1]["type"] == "end" and len(out) > 0
    assert any(line.startswith(tuple("0123456789")) and "live" in line for line in server.lines)  # status lines


async def test_a_session_the_engine_ends_before_its_stop_gets_one_error_and_its_late_input_is_dropped(bundle_dir):
    """The engine ends a session while its client still streams (here refused busy: the engine holds
    one session; the same for a VAD end or a policy error): the client hears that error and the end,
    once; the frames and the stop it had in flight are dropped without further errors, and nothing of
    the session stays behind in the server."""
    async with in_process(bundle_dir, {"max_sessions": 1}) as srv:
        url = f"ws://127.0.0.1:{srv.port}/ws"
        async with websockets.connect(url) as holder, websockets.connect(url) as ws:
            await holder.send(json.dumps({"type": "start"}))
            assert (await _first_text(holder))["type"] == "started"
            await holder.send(pcm16(wave(0)[:3200]))
            await asyncio.sleep(0.3)  # the engine holds it
            await ws.send(json.dumps({"type": "start"}))
            x = wave(1)
            for i in range(0, 16000, 320):  # streaming as the page does, through the refusal
                await ws.send(pcm16(x[i : i + 320]))
                await asyncio.sleep(0.005)
            await ws.send(json.dumps({"type": "stop"}))
            texts = [await _first_text(ws)]
            while texts[-1]["type"] != "end":
                texts.append(await _first_text(ws))
            assert await _quiet(ws, 1.0)
            kinds = [m["type"] for m in texts if m["type"] != "stats"]
            assert kinds == ["started", "error", "end"], texts
            assert texts[1]["message"].startswith("busy: the server holds its maximum of 1 live sessions")
            session = texts[0]["session"]
            await holder.send(json.dumps({"type": "stop"}))
            while (await _first_text(holder))["type"] != "end":
                pass
            out, msgs = await ws_session(srv.port, ws=holder, wave=wave(2), task="resynthesis")  # the engine serves on
            assert msgs[-1]["type"] == "end" and len(out) > 0
        assert (srv.metrics.registry.get_sample_value("streamgen_protocol_errors_total", {"via": "ws"}) or 0) == 0
        assert session not in srv.pipeline.live and session not in srv.hub.sessions


async def test_a_connection_with_no_session_is_closed_after_the_idle_timeout(bundle_dir):
    """Idle connections would otherwise hold --max-connections places for ever (256 of them locked
    everyone out, /healthz included); a connection with a session running is never closed for it."""
    async with in_process(bundle_dir, serve={"idle_timeout_s": 1.0}) as srv:
        url = f"ws://127.0.0.1:{srv.port}/ws"
        async with websockets.connect(url) as idle, websockets.connect(url) as busy:
            talking = asyncio.ensure_future(ws_session(srv.port, wave=np.tile(wave(0), 2), ws=busy, realtime=True))
            with pytest.raises(websockets.ConnectionClosedOK) as closed:
                await asyncio.wait_for(idle.recv(), 20)
            assert closed.value.rcvd.reason == "no session for 1 s"
            out, msgs = await talking  # longer than the timeout, and never cut off
            assert msgs[-1]["type"] == "end" and len(out) > 0


async def test_token_origin_and_sigterm_drain(bundle_dir, tmp_path):
    token = "test-token-0123456789abcdef"
    s = ServeProcess("--bundle", str(bundle_dir), "--task", "resynthesis", "--drain", "1", "--max-sessions", "1",
                     env={"STREAMGEN_TOKEN": token})
    auth = {"Authorization": f"Bearer {token}"}
    try:
        assert "bearer token required" in "\n".join(s.lines)
        assert token not in "\n".join(s.lines)
        assert s.get("/metrics")[0] == 401
        assert s.get("/metrics", {"Authorization": f"Bearer {token}"})[0] == 200
        assert s.get("/healthz")[0] == 200
        with pytest.raises(InvalidStatus) as e:
            await websockets.connect(f"ws://127.0.0.1:{s.port}/ws")
        assert e.value.response.status_code == 403
        with pytest.raises(InvalidStatus):
            await websockets.connect(f"ws://127.0.0.1:{s.port}/ws", additional_headers={"Authorization": "Bearer wrong-token-0123456789"})
        with pytest.raises(InvalidStatus):  # another site's page cannot use it
            await websockets.connect(f"ws://127.0.0.1:{s.port}/ws", origin="http://evil.example",
                                     additional_headers={"Authorization": f"Bearer {token}"})
        async with websockets.connect("ws://talk.example.net/ws", host="127.0.0.1", port=s.port,
                                      origin="https://talk.example.net", additional_headers=auth):
            pass  # behind a reverse proxy (docs/deploy.md): the public name, and the token
        ws = await websockets.connect(f"ws://127.0.0.1:{s.port}/ws", subprotocols=["streamgen", f"streamgen.token.{token}"])
        assert ws.subprotocol == "streamgen"
        # SIGTERM while a session is live: it gets a clear error and its end, the process exits 0
        live = asyncio.ensure_future(ws_session(s.port, wave=np.tile(wave(0), 4), ws=ws, realtime=True))
        await asyncio.sleep(1.0)
        async with websockets.connect(f"ws://127.0.0.1:{s.port}/ws", additional_headers=auth) as other:
            await other.send(json.dumps({"type": "start"}))  # the server is full: refused, with the reason
            m = json.loads(await other.recv())
            assert m["type"] == "error" and "at capacity (1 live sessions)" in m["message"]
        assert s.metrics(auth)[("streamgen_sessions_refused_total", (("reason", "capacity"),))] == 1
        s.signal()
        out, msgs = await asyncio.wait_for(live, 30)
        assert [m["type"] for m in msgs if m["type"] != "stats"] == ["started", "error", "end"]
        assert "shutting down" in [m for m in msgs if m["type"] == "error"][0]["message"]
        assert len(out) > 0
        assert s.wait() == 0
        text = "\n".join(s.lines)
        assert "SIGTERM: draining 1 live session" in text and "streamgen serve stopped" in text
        assert "1 sessions ended (1 with errors)" in text
    finally:
        s.stop()


async def test_the_connection_limit_counts_websockets_and_leaves_health_and_metrics_open(bundle_dir):
    """uvicorn's limit skipped WebSocket upgrades (ten opened under --max-connections 2) yet counted them, so
    /healthz and /metrics answered 503 while the WebSockets were open."""
    import logging
    import urllib.request

    from streamgen.serve.app import HttpOptions

    class Kept(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records = []

        def emit(self, record):
            self.records.append(record)

    kept = Kept()
    async with in_process(bundle_dir, serve={"http": HttpOptions(default_task="resynthesis", max_connections=2)}) as srv:
        logging.getLogger("uvicorn.error").addHandler(kept)  # (once uvicorn has set its loggers up; they do not propagate)
        url = f"ws://127.0.0.1:{srv.port}/ws"
        async with websockets.connect(url), websockets.connect(url):
            with pytest.raises(InvalidStatus) as refused:
                await websockets.connect(url)
            assert refused.value.response.status_code == 503
            assert b"limit of 2 connections" in refused.value.response.body

            def get(path):
                with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}{path}", timeout=10) as r:
                    return r.status

            assert await asyncio.to_thread(get, "/healthz") == 200 and await asyncio.to_thread(get, "/metrics") == 200
        assert srv.metrics.refused.labels("connection_limit")._value.get() == 1
        async with websockets.connect(url):  # the places are free again
            pass
    logging.getLogger("uvicorn.error").removeHandler(kept)
    assert not [r.getMessage() for r in kept.records if r.levelno >= logging.ERROR]  # a refusal is the server's answer, not a fault


async def test_a_misspelt_control_field_is_named_not_ignored(server):
    """{"sample_rte": 48000} started a session that read 48 kHz audio as 16 kHz."""
    async with websockets.connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
        await ws.send(json.dumps({"type": "start", "task": "resynthesis", "sample_rte": 48000}))
        msg = await _first_text(ws)
        assert msg == {"type": "error", "message": "start message with unknown field 'sample_rte'; it takes options, sample_rate, task, type"}
        await ws.send(json.dumps({"type": "start", "task": "resynthesis"}))
        assert (await _first_text(ws))["type"] == "started"
        await ws.send(json.dumps({"type": "stop", "now": True}))
        got = [await _first_text(ws) for _ in range(2)]
        assert got[0] == {"type": "error", "message": "stop message with unknown field 'now'; it takes type"}, got


async def test_the_page_files_are_revalidated_and_every_counter_is_there_from_the_start(server):
    """app.js and style.css were cached without revalidation (an upgrade could pair a new page with old
    code); labelled counters had no series until their first event, which increase() then missed."""
    for path in ("/static/app.js", "/static/style.css", "/static/index.html"):
        req = __import__("urllib.request").request.Request(server.url + path)
        with __import__("urllib.request").request.urlopen(req, timeout=10) as r:
            assert r.headers["Cache-Control"] == "no-cache" and "default-src 'self'" in r.headers["Content-Security-Policy"]
    m = server.metrics()
    for name, label, values in (("streamgen_sessions_refused_total", "reason", ("capacity", "draining", "connection_limit", "busy")),
                                ("streamgen_sessions_ended_total", "outcome", ("ok", "error")),
                                ("streamgen_sessions_started_total", "via", ("ws", "mqtt")),
                                ("streamgen_protocol_errors_total", "via", ("ws", "mqtt"))):
        for v in values:
            assert (name, ((label, v),)) in m, (name, v)


async def test_a_server_on_every_address_takes_pages_by_address_or_loopback_name_only(bundle_dir, monkeypatch):
    """0.0.0.0 answers on loopback too, and without a token it took a rebound name's page (DNS rebinding);
    a LAN client reaching it by address still gets in. (The server here listens on loopback, told it does not.)"""
    import streamgen.serve.server as server_module

    monkeypatch.setattr(server_module, "is_loopback", lambda host: False)  # as for --http 0.0.0.0
    async with in_process(bundle_dir) as srv:
        for name, ok in (("rebound.example", False), ("192.168.1.20", True), ("[fe80::1]", True), ("localhost", True)):
            connect = websockets.connect(f"ws://{name}:{srv.port}/ws", host="127.0.0.1", port=srv.port,
                                         origin=f"http://{name}:{srv.port}")
            if ok:
                async with connect:
                    pass
            else:
                with pytest.raises(InvalidStatus):
                    await connect


async def test_the_banner_brackets_an_ipv6_address(bundle_dir):
    async with in_process(bundle_dir, serve={"host": "::1"}) as srv:
        banner = srv.banner()
        assert f"page       http://[::1]:{srv.port}/" in banner and f"ws://[::1]:{srv.port}/ws" in banner


async def test_a_draining_server_refuses_new_connections_with_503_as_its_health_says(bundle_dir):
    """/healthz said 503 while draining, yet new WebSockets were taken (and their starts refused inside): a proxy
    could not pass the handshake to another worker."""
    async with in_process(bundle_dir) as srv:
        url = f"ws://127.0.0.1:{srv.port}/ws"
        srv.hub.accepting = False
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(url)
        assert refused.value.response.status_code == 503 and b"shutting down" in refused.value.response.body
        srv.hub.accepting = True
