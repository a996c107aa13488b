"""Session figures people can read: one table per session in rows, every figure defined, the JSON
line written once the session is over, and a compute-aware EndOffset measured from the moment the
input really ended."""

import asyncio
import io
import json

from speech import espeak

from streamgen.io.memory import MemorySink, MemorySource, chunks_of
from streamgen.pipeline.runner import Pipeline, build_engine
from streamgen.pipeline.stats import FIGURES, SessionStats, Stats, figures_help


def finished_session(s: SessionStats | None = None) -> SessionStats:
    """A session's figures (into `s`, a record of a Stats, if given)."""
    s = s or SessionStats("x", 1000)
    s.started_at, s.input_samples, s.input_end_at = 10.0, 2000, 10.5  # 2 s read in 0.5 s
    for chunk in [(500.0, 10.7, 300), (1000.0, 10.9, 300), (2000.0, 12.5, 1000)]:
        s.add_output(*chunk)
    s.compute = {"encoder": 0.2, "vocoder": 0.3}
    return s


def test_compute_aware_end_offset_counts_from_when_the_input_ended():
    out = finished_session().summary()
    # ideal: SimulEval's (playback ends at 3000 ms, input lasts 2000 ms)
    assert out["start_offset_ms"] == 500.0 and out["end_offset_ms"] == 1000.0
    # wall clock: playback from 700, 900, 2500 ms ends at 3500 ms; the input had ended at 500 ms
    assert out["start_offset_ca_ms"] == 700.0 and out["end_offset_ca_ms"] == 3000.0
    assert out["first_audio_after_input_ms"] == 200.0
    assert out["rtf"] == 0.25


def test_a_long_session_keeps_running_figures_and_bounded_records():
    """An hour of 320 ms chunks: the figures equal those over every chunk, the records stay capped."""
    import random

    rng = random.Random(0)
    chunks, t, ideal = [], 10.0, 0.0
    for _ in range(11_250):
        ideal += 320.0
        t += rng.uniform(0.25, 0.4)
        chunks.append((ideal, t, rng.randint(4000, 6000)))
    full = SessionStats("x", 16000, started_at=10.0, input_samples=int(3600 * 16000), records=len(chunks))
    capped = SessionStats("x", 16000, started_at=10.0, input_samples=int(3600 * 16000), records=100)
    service = SessionStats("x", 16000, started_at=10.0, input_samples=int(3600 * 16000), records=0)
    for c in chunks:
        for s in (full, capped, service):
            s.add_output(*c)
    start, end = full.offsets([d for d, _, _ in chunks])
    aware_start, aware_end = full.offsets([1000 * (e - 10.0) for _, e, _ in chunks])
    for s in (full, capped, service):
        out = s.summary()
        assert out["start_offset_ms"] == round(start, 1) and out["end_offset_ms"] == round(end, 1)
        assert out["start_offset_ca_ms"] == round(aware_start, 1) and out["end_offset_ca_ms"] == round(aware_end, 1)
        assert out["output_s"] == round(sum(n for *_, n in chunks) / 16000, 3)
    assert len(capped.outputs) == 100 and capped.outputs == chunks[:100] and service.outputs == []


def test_services_keep_no_per_chunk_records():
    stats = Stats(16000, chunk_records=0)
    stats.session("a").add_output(100.0, 1.0, 320)
    assert stats.sessions["a"].outputs == [] and stats.sessions["a"].output_chunks == 1


def test_one_table_per_session_in_rows_with_units():
    st = Stats(1000)
    finished_session(st.session("x"))
    st.algorithmic_ms = {"chunker": 100.0}
    table = st.report("x").splitlines()
    assert table[0] == "session x"
    rows = {line[2:].rsplit("  ", 2)[0].strip(): line.split()[-1] for line in table[1:]}
    assert rows["StartOffset"] == "ms" and rows["real-time factor"] == "x" and rows["input"] == "s"
    assert any(line.startswith("  EndOffset, compute-aware") and "3000.0  ms" in line for line in table)
    assert any(line.startswith("  compute, vocoder") and "300.0  ms" in line for line in table)
    assert any(line.startswith("  algorithmic latency, chunker") for line in table)


def test_every_figure_in_the_table_is_defined_in_help():
    text = figures_help()
    for _, name, unit, _ in FIGURES:
        assert f"{name} ({unit}):" in text or f"{name}:" in text
    assert "compute, STAGE" in text and "algorithmic latency, STAGE" in text


def test_close_session_writes_the_json_line_once_and_reports_it():
    log, seen = io.StringIO(), []
    st = Stats(1000, log, on_session=lambda s: seen.append(s.session))
    finished_session(st.session("x"))
    st.close_session("x")
    st.close_session("x")
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    assert [l["event"] for l in lines] == ["session"] and seen == ["x"]
    assert lines[0]["end_offset_ca_ms"] == 3000.0 and lines[0]["compute_ms"] == {"encoder": 200.0, "vocoder": 300.0}


def test_the_json_session_line_agrees_with_the_final_figures(test_bundle):
    """Written after every stage has flushed the session: the vocoder's last output and compute are in it."""
    log, seen = io.StringIO(), []
    st = Stats(16000, log, on_session=lambda s: seen.append(s.session))
    stages = build_engine(test_bundle, "continuation", {"max_units": "20", "min_units": "20"})
    asyncio.run(Pipeline(MemorySource(chunks_of("a", espeak("Say it once."), 1600)), stages, MemorySink(), st).run())
    line = [json.loads(l) for l in log.getvalue().splitlines() if '"event": "session"' in l]
    assert len(line) == 1 and seen == ["a"]
    final = st.sessions["a"].summary()
    assert line[0]["output_s"] == final["output_s"] > 0
    assert line[0]["compute_ms"] == final["compute_ms"] and "vocoder" in final["compute_ms"]


def test_a_service_prints_each_session_as_it_ends(tmp_path):
    """`streamgen run --stats` over MQTT: a session's table comes out when it ends, while the service
    goes on serving the next one."""
    import queue
    import subprocess
    import sys
    import threading
    import time
    from pathlib import Path

    from mqtt_helpers import client, session_messages
    from services import Mosquitto

    from streamgen.testing import random_bundle

    random_bundle().save(tmp_path / "tiny")
    broker = Mosquitto(tmp_path)
    broker.start()
    url = f"mqtt://127.0.0.1:{broker.port}"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "streamgen"), "--debug", "run", "--bundle", str(tmp_path / "tiny"), "--task", "resynthesis",
                             "--in", f"{url}/s/+/in", "--out", f"{url}/s/{{session}}/out", "--stats", "--sessions", "2",
                             "--client-id", "stats-service"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout], daemon=True).start()
    connected, log = threading.Event(), []

    def read_log():
        for line in proc.stderr:
            log.append(line)
            if "connected to 127.0.0.1" in line:  # (--debug shows this info line) subscribed, ready for sessions
                connected.set()

    threading.Thread(target=read_log, daemon=True).start()

    def table_of(session: str, timeout: float = 60) -> list[str]:
        deadline, got = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            try:
                got.append(lines.get(timeout=0.5).rstrip("\n"))
            except queue.Empty:
                continue
            if got[-1] == f"session {session}":
                return got
        raise AssertionError(f"no table for session {session}: {got}")

    try:
        assert connected.wait(60), "".join(log)
        wave = espeak("One session at a time.")
        asyncio.run(client(broker.port, session_messages("alice", wave), "alice"))
        table_of("alice")
        assert proc.poll() is None  # printed while the service is still running
        asyncio.run(client(broker.port, session_messages("bob", wave), "bob"))
        table_of("bob")
        assert proc.wait(timeout=60) == 0, "".join(log)
        time.sleep(0.5)
        rest = [lines.get_nowait() for _ in range(lines.qsize())]
        assert not [l for l in rest if l.startswith("session ")], rest  # each table once
    finally:
        proc.kill()
        broker.stop()
