"""Session figures people can read: one table per session in rows, every figure defined, the JSON
line written once the session is over, and a compute-aware EndOffset measured from the moment the
input really ended."""

import asyncio
import io
import json

from speech import espeak

from streamgen.io.memory import MemorySink, MemorySource, chunks_of
from streamgen.pipeline.runner import Pipeline, build_stages
from streamgen.pipeline.stats import FIGURES, SessionStats, Stats, figures_help


def finished_session() -> SessionStats:
    s = SessionStats("x", 1000, started_at=10.0, input_samples=2000, input_end_at=10.5)  # 2 s read in 0.5 s
    s.outputs = [(500.0, 10.7, 300), (1000.0, 10.9, 300), (2000.0, 12.5, 1000)]
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


def test_one_table_per_session_in_rows_with_units():
    st = Stats(1000)
    st.sessions["x"] = finished_session()
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
    st.sessions["x"] = finished_session()
    st.close_session("x")
    st.close_session("x")
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    assert [l["event"] for l in lines] == ["session"] and seen == ["x"]
    assert lines[0]["end_offset_ca_ms"] == 3000.0 and lines[0]["compute_ms"] == {"encoder": 200.0, "vocoder": 300.0}


def test_the_json_session_line_agrees_with_the_final_figures(test_bundle):
    """Written after every stage has flushed the session: the vocoder's last output and compute are in it."""
    log, seen = io.StringIO(), []
    st = Stats(16000, log, on_session=lambda s: seen.append(s.session))
    stages = build_stages(test_bundle, "continuation", {"max_units": "20", "min_units": "20"})
    asyncio.run(Pipeline(MemorySource(chunks_of("a", espeak("Say it once."), 1600)), stages, MemorySink(), st).run())
    line = [json.loads(l) for l in log.getvalue().splitlines() if '"event": "session"' in l]
    assert len(line) == 1 and seen == ["a"]
    final = st.sessions["a"].summary()
    assert line[0]["output_s"] == final["output_s"] > 0
    assert line[0]["compute_ms"] == final["compute_ms"] and "vocoder" in final["compute_ms"]
