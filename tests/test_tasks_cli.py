"""Task plugins through entry points, the VAD, and `streamgen run` / `tasks` from the command line."""

import asyncio
import importlib.metadata
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf
import torch
from speech import espeak
from typer.testing import CliRunner

from streamgen.cli import app
from streamgen.io.memory import MemorySink, MemorySource, chunks_of
from streamgen.pipeline.items import End
from streamgen.pipeline.runner import Pipeline, build_engine
from streamgen.pipeline.stats import Stats
from streamgen.pipeline.tasks import UnknownTask, available_tasks, load_task

runner = CliRunner()


@pytest.fixture
def echo_plugin(tmp_path, monkeypatch):
    """A test-only task registered the way installed packages register theirs: a dist-info
    directory on sys.path whose entry_points.txt names it."""
    pkg = tmp_path / "echo_task.py"
    pkg.write_text(textwrap.dedent('''
        from streamgen.pipeline.policies import Policy
        from streamgen.pipeline.tasks import TaskPlugin

        class Echo(Policy):
            """Speaks back the source units, `repeat` times each, once the input ends."""
            def __init__(self, decoder, repeat=1):
                super().__init__(decoder)
                self.repeat = repeat
            def on_end(self):
                return self.speak(self.source.repeat_interleave(self.repeat))

        plugin = TaskPlugin("echo", "Repeat the input units (test plugin).", Echo, options={"repeat": 1})
    '''))
    dist = tmp_path / "streamgen_echo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: streamgen-echo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[streamgen.tasks]\necho = echo_task:plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path


def test_builtin_plugins_are_installed():
    assert {"continuation", "translation", "inpainting"} <= set(available_tasks())
    with pytest.raises(UnknownTask, match="unknown task 'nope'; installed tasks: .*continuation"):
        load_task("nope")


def test_installed_tasks_are_read_once_per_import_path(monkeypatch, tmp_path):
    """A service checks a client's task on every start message: scanning every installed distribution
    for entry points each time (3.5 ms) let a client flooding starts stall the event loop every session's
    audio goes through. They are read again only when the import path changes (a plugin added to it)."""
    from streamgen.pipeline import tasks

    reads = []
    real = tasks.entry_points
    monkeypatch.setattr(tasks, "entry_points", lambda **kw: reads.append(kw) or real(**kw))
    monkeypatch.setattr(tasks, "_installed", [None, {}])
    for _ in range(3):
        assert load_task("inpainting").name == "inpainting"
        with pytest.raises(UnknownTask):
            load_task("nope")
    assert len(reads) == 1
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "translation" in available_tasks() and len(reads) == 2


def test_a_plugin_registered_through_entry_points_is_found_and_runs(echo_plugin, test_bundle):
    assert "echo" in available_tasks()
    r = runner.invoke(app, ["tasks"])
    assert "echo" in r.output and "Repeat the input units" in r.output
    wave = espeak("Echo this.")
    sink = MemorySink()
    stages = build_engine(test_bundle, "echo", {"repeat": "2"}, left_context_ms=None, lookahead_ms=None)  # units as offline
    asyncio.run(Pipeline(MemorySource(chunks_of("a", wave, 1600)), stages, sink, Stats(16000)).run())
    units, _ = test_bundle.encode(wave)
    expected = test_bundle.vocode(units.repeat_interleave(2))
    assert torch.allclose(sink.wave("a"), expected, atol=1e-5)  # the plugin's policy decided the output


def test_vad_ends_the_input_after_trailing_silence(test_bundle):
    speech = espeak("Hello there, how are you?")
    stream = torch.cat([torch.zeros(8000), speech, torch.zeros(16000 * 2), speech])

    class EndSink(MemorySink):
        async def write(self, item):
            if isinstance(item, End):
                self.end_at = item.source_samples / 16000
            await super().write(item)

    sink = EndSink()
    engine = build_engine(test_bundle, "resynthesis", chunk_ms=100, vad=True)
    asyncio.run(Pipeline(MemorySource(chunks_of("mic", stream, 1600)), engine, sink, Stats(16000)).run())
    assert sink.ended == ["mic"]
    speech_end = (8000 + len(speech)) / 16000
    # 700 ms of silence as the VAD judges it (it hears the last word fade out a little early)
    assert speech_end + 0.2 < sink.end_at < speech_end + 1.5
    # later input is ignored: the output is no longer than the input up to the end the VAD found
    assert len(sink.wave("mic")) / 16000 <= sink.end_at + 0.1


def test_run_file_to_file_and_stats(tmp_path):
    sf.write(tmp_path / "in.flac", espeak("Testing the command line.", rate=22050).numpy(), 22050)
    log = tmp_path / "log.jsonl"
    r = runner.invoke(app, ["run", "--in", str(tmp_path / "in.flac"), "--out", str(tmp_path / "out.wav"),
                            "--opt", "max_units=30", "--stats", "--stats-json", str(log)])
    assert r.exit_code == 0, r.output
    audio, rate = sf.read(tmp_path / "out.wav")
    assert rate == 16000 and len(audio) > 0
    assert "session file" in r.output and "StartOffset, compute-aware" in r.output and "real-time factor" in r.output
    assert "algorithmic latency, chunker  " in r.output and "algorithmic latency, encoder" in r.output
    lines = log.read_text().splitlines()
    # the JSON lines carry the encoder's algorithmic latency the summary prints (the bundle's: 10 ms of
    # log-mel window past a frame for the shipped one, 105 ms for a HuBERT encoder with 5 frames of look-ahead)
    printed = float(re.search(r"algorithmic latency, encoder +([0-9.]+) +ms", r.output).group(1))
    assert printed > 0
    assert any('"event": "stage"' in l and '"stage": "encoder"' in l and f'"algorithmic_ms": {printed}' in l for l in lines)
    assert any('"event": "session"' in l for l in lines)


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "unknown task 'nope'; installed tasks:"),
    (["--bundle", "/nonexistent"], "not a streamgen bundle"),
    (["--task", "translation", "--opt", "speed=3"], "no option speed"),
    (["--opt", "max_units"], "expected KEY=VALUE"),
])
def test_run_errors_are_named(tmp_path, args, message):
    sf.write(tmp_path / "in.wav", np.zeros(1600, np.float32), 16000)
    r = runner.invoke(app, ["run", "--in", str(tmp_path / "in.wav"), "--out", str(tmp_path / "o.wav"), *args])
    assert r.exit_code == 2 and message in r.output


def test_unreadable_input_file_is_named(tmp_path):
    (tmp_path / "in.wav").write_bytes(b"not audio")
    r = runner.invoke(app, ["run", "--in", str(tmp_path / "in.wav"), "--out", str(tmp_path / "o.wav")])
    assert r.exit_code == 2 and "cannot read audio" in r.output


def test_raw_pcm_stdin_to_stdout_pipeline():
    pcm = (espeak("Pipe me through.", rate=8000).numpy() * 32767).astype("<i2").tobytes()
    r = subprocess.run([sys.executable, "-m", "streamgen.cli", "run", "--in", "-", "--out", "-", "--rate", "8000",
                        "--opt", "max_units=30", "--opt", "min_units=30"], input=pcm, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    out = np.frombuffer(r.stdout, "<i2")
    assert len(out) >= 30 * 320 and np.abs(out).max() > 0
