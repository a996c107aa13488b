"""Every user mistake gets one line that names it (and the fix), exit code 2 for a mistake in the
command and 1 for a failure while running, no traceback, and no file left behind.

The table runs in-process through typer's CliRunner (the same command function, the same exit codes
and messages); the rows whose point is what the real process prints (a missing extra, .mp3 output
that used to end in "Event loop is closed") run the installed `streamgen` command."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

import streamgen.cli as cli
import streamgen.options as options
from streamgen.io.files import FileSink
from streamgen.pipeline.items import AudioOut, End, SessionError
from streamgen.testing import random_bundle

STREAMGEN = str(Path(sys.executable).parent / "streamgen")
runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    random_bundle().save(d / "tiny")
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 2) / 16000
    # a voiced-speech stand-in the speech detector accepts: a 150 Hz buzz in syllables, 4 per second
    syllables = (np.sin(2 * np.pi * 150 * t) * (np.sin(2 * np.pi * 4 * t) > 0) * 0.3).astype(np.float32)
    sf.write(d / "talk.wav", syllables, 16000)
    sf.write(d / "silence.wav", np.zeros(16000 * 5, np.float32), 16000)
    sf.write(d / "hiss.wav", (rng.standard_normal(16000 * 5) * 0.003).astype(np.float32), 16000)
    sf.write(d / "long.wav", np.tile(syllables, 13), 16000)  # 26 s
    (d / "notaudio.wav").write_bytes(b"this is not audio")
    (d / "outdir").mkdir()
    return d


def run_args(files, *extra, inp="talk.wav", out="out.wav"):
    return ["run", "--bundle", str(files / "tiny"), "--in", str(files / inp) if inp != "-" else "-",
            "--out", str(files / out), *extra]


# (extra arguments, input, output, exit code, expected message)
BAD = [
    (["--chunk-ms", "0"], "talk.wav", "out.wav", "--chunk-ms 0: must be from 10 to 10000 ms"),
    (["--chunk-ms", "-100"], "talk.wav", "out.wav", "--chunk-ms -100: must be from 10 to 10000 ms"),
    (["--left-context-ms", "-5"], "talk.wav", "out.wav", "--left-context-ms -5: must be at least 0 ms or -1"),
    (["--lookahead-ms", "-2"], "talk.wav", "out.wav", "--lookahead-ms -2: must be at least 0 ms or -1"),
    (["--vocoder-lookahead", "-3"], "talk.wav", "out.wav", "--vocoder-lookahead -3: must be at least 0 frames or -1"),
    (["--queue-size", "0"], "talk.wav", "out.wav", "--queue-size 0: must be at least 1 items"),
    (["--rate", "0"], "-", "out.wav", "--rate 0: must be from 1000 to 384000 Hz"),
    (["--qos", "3"], "talk.wav", "out.wav", "--qos 3: must be from 0 to 2"),
    (["--duration", "0"], "talk.wav", "out.wav", "--duration 0.0: must be at least 0.1 s"),
    (["--sessions", "0"], "talk.wav", "out.wav", "--sessions 0: must be at least 1"),
    ([], "talk.wav", "talk.wav", "talk.wav is the input file too: writing it would destroy the input as it is read"),
    (["--overflow", "explode"], "talk.wav", "out.wav", "--overflow 'explode': choose one of block, drop-oldest"),
    (["--device", "quantum"], "talk.wav", "out.wav", "--device 'quantum': not a torch device; use cpu or cuda"),
    (["--lm-dtype", "int8"], "talk.wav", "out.wav", "--lm-dtype 'int8': choose float32 (exact, the default) or bfloat16"),
    (["--threads", "0"], "talk.wav", "out.wav", "--threads 0: must be at least 1"),
    (["--opt", "max_units"], "talk.wav", "out.wav", "--opt 'max_units': expected KEY=VALUE"),
    (["--opt", "max_units=-5"], "talk.wav", "out.wav", "task 'continuation': option max_units=-5: must be at least 1"),
    (["--opt", "max_units=lots"], "talk.wav", "out.wav", "option max_units='lots' is not a valid int"),
    (["--opt", "policy=greedy"], "talk.wav", "out.wav", "task 'continuation' has no option policy (it has: emit_every, max_units, min_units)"),
    (["--task", "translation", "--opt", "policy=greedy"], "talk.wav", "out.wav",
     "task 'translation': option policy='greedy': choose one of local-agreement, wait-k"),
    (["--task", "translation", "--opt", "ratio=0"], "talk.wav", "out.wav", "option ratio=0.0: must be from 0.1 to 10.0"),
    (["--task", "translation", "--opt", "lookahead=24"], "talk.wav", "out.wav",
     "option lookahead=24 is for policy=local-agreement (policy=wait-k decodes only what it commits)"),
    (["--task", "inpainting"], "talk.wav", "out.wav", "task 'inpainting' needs the span to fill: --opt mask_start=S --opt mask_end=E"),
    (["--task", "inpainting", "--opt", "mask_start=1.5", "--opt", "mask_end=0.5"], "talk.wav", "out.wav", "needs the span to fill"),
    (["--task", "inpainting", "--opt", "mask_start=1", "--opt", "mask_end=9"], "talk.wav", "out.wav",
     "task 'inpainting': the mask 1.0..9.0 s ends after the input (2.00 s)"),
    (["--task", "inpainting", "--opt", "mask_start=1", "--opt", "mask_end=2"], "long.wav", "out.wav",
     "task 'inpainting' regenerates the whole input within the model's context: at most 20.4 s, this input is 26.0 s"),
    (["--task", "nope"], "talk.wav", "out.wav", "unknown task 'nope'; installed tasks:"),
    ([], "missing.wav", "out.wav", "missing.wav: no such file"),
    ([], "outdir", "out.wav", "outdir is a directory; give an audio file"),
    ([], "notaudio.wav", "out.wav", "notaudio.wav: cannot read audio"),
    ([], "talk.wav", "out.mp3", "cannot write .mp3; write .wav or .flac"),
    ([], "talk.wav", "out", "cannot write a file without an extension; write .wav or .flac"),
    ([], "talk.wav", "nowhere/out.wav", "the directory"),
    ([], "talk.wav", "outdir", "cannot write a file without an extension"),
    ([], "talk.wav", "{session}/out.wav", "{session} may only appear in the file name"),
    (["--stats-json", "/nonexistent-dir/log.jsonl"], "talk.wav", "out.wav",
     "--stats-json /nonexistent-dir/log.jsonl: the directory /nonexistent-dir does not exist; create it first"),
]


@pytest.mark.parametrize("extra, inp, out, message", BAD, ids=[" ".join(r[0]) or r[1] + "->" + r[2] for r in BAD])
def test_a_bad_run_is_one_line_and_exit_code_2(files, extra, inp, out, message):
    r = runner.invoke(cli.app, run_args(files, *extra, inp=inp, out=out))
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and message in r.output, r.output
    assert r.output.count("\n") == 1 and "Traceback" not in r.output
    assert not (files / "nowhere").exists()  # a missing directory is never created
    assert not list(files.glob("out.*")) and not list((files / "outdir").iterdir())


def test_a_bundle_that_is_not_there(files):
    r = runner.invoke(cli.app, ["run", "--bundle", str(files / "nope"), "--in", str(files / "talk.wav"), "--out", str(files / "o.wav")])
    assert r.exit_code == 2 and "not a streamgen bundle" in r.output and r.output.count("\n") == 1


def test_cuda_on_a_machine_without_it_is_named(files):
    r = runner.invoke(cli.app, run_args(files, "--device", "cuda:99"))
    assert r.exit_code == 2 and r.output.count("\n") == 1
    if torch.version.cuda is None:
        assert f"--device cuda:99: this torch build ({torch.__version__}) has no CUDA support; use --device cpu" in r.output
    else:
        assert "--device cuda:99:" in r.output


@pytest.mark.parametrize("inp", ["silence.wav", "hiss.wav"])
def test_an_input_without_speech_says_so_and_writes_nothing(files, inp):
    r = runner.invoke(cli.app, run_args(files, inp=inp))
    assert r.exit_code == 1, r.output
    assert f"{inp}: no speech in its 5.0 s of audio, so task 'continuation' has nothing to work on; nothing written (--allow-silence" in r.output
    assert not (files / "out.wav").exists()


@pytest.mark.parametrize("bf16_cpu", [True, False], ids=["bf16-cpu", "avx2-cpu"])
def test_bfloat16_backbones_run_a_task(files, monkeypatch, bf16_cpu):
    """bfloat16 runs either way; where the CPU has no bfloat16 arithmetic (measured 5-8x slower
    encodes there) one warning line says so and how to avoid it."""
    monkeypatch.setattr(options, "cpu_has_bfloat16_arithmetic", lambda: bf16_cpu)
    r = runner.invoke(cli.app, run_args(files, "--lm-dtype", "bfloat16", "--opt", "max_units=10", "--opt", "min_units=10", out="bf16.wav"))
    assert r.exit_code == 0, r.output
    assert sf.info(str(files / "bf16.wav")).frames > 0
    (files / "bf16.wav").unlink()  # the bad-run tests expect no out.* files
    warned = [line for line in r.output.splitlines() if line.startswith("warning: --lm-dtype bfloat16")]
    assert len(warned) == (0 if bf16_cpu else 1), r.output
    if warned:
        assert "no bfloat16 arithmetic" in warned[0] and "leave --lm-dtype out" in warned[0]


def test_the_bfloat16_warning_is_for_cpus_without_it_only(monkeypatch, tmp_path):
    probe = options.cpu_has_bfloat16_arithmetic
    monkeypatch.setattr(options, "cpu_has_bfloat16_arithmetic", lambda: False)
    assert options.lm_dtype_warning("cpu", None) is None
    assert options.lm_dtype_warning("cpu", torch.float32) is None
    assert options.lm_dtype_warning("cuda", torch.bfloat16) is None
    assert options.lm_dtype_warning("cpu", torch.bfloat16) is not None
    monkeypatch.setattr(options, "cpu_has_bfloat16_arithmetic", lambda: True)
    assert options.lm_dtype_warning("cpu", torch.bfloat16) is None
    info = tmp_path / "cpuinfo"
    for flags, fast in (("fpu sse avx avx2 fma", False), ("avx2 avx512f avx512_bf16", True), ("avx512f amx_bf16 amx_tile", True)):
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert probe(info) is fast


def test_live_engines_run_on_one_thread_unless_told(files, monkeypatch):
    """torch's default (a thread per core) split every small operator of an engine tick and cost latency
    (bench/RESULTS.md): `run` and `serve` use 1, or --threads, or what OMP_NUM_THREADS says."""
    assert options.engine_threads(None, "cpu", environ={}) == 1
    assert options.engine_threads(3, "cpu", environ={}) == 3
    assert options.engine_threads(None, "cpu", environ={"OMP_NUM_THREADS": "4"}) is None  # torch already follows it
    assert options.engine_threads(None, "cuda", environ={}) is None
    with pytest.raises(options.UsageError, match="--threads 0: must be at least 1"):
        options.engine_threads(0, "cpu", environ={})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for extra, want in (((), 1), (("--threads", "2"), 2)):
        torch.set_num_threads(3 - want)
        r = runner.invoke(cli.app, run_args(files, *extra, "--opt", "max_units=10", "--opt", "min_units=10"))
        assert r.exit_code == 0, r.output
        assert torch.get_num_threads() == want
        (files / "out.wav").unlink()


def test_allow_silence_runs_the_task_anyway(files):
    r = runner.invoke(cli.app, run_args(files, "--allow-silence", "--opt", "max_units=10", "--opt", "min_units=10", inp="silence.wav"))
    assert r.exit_code == 0, r.output
    assert sf.info(str(files / "out.wav")).frames > 0
    (files / "out.wav").unlink()


def test_other_commands_name_their_mistakes(files):
    cases = [
        (["info", str(files / "nope")], "not a streamgen bundle"),
        (["demo", "--bundle", str(files / "tiny"), "--out", str(files / "nowhere" / "d.wav")], "the directory"),
        (["demo", "--bundle", str(files / "tiny"), "--out", str(files / "d.mp3")], "cannot write .mp3"),
        (["demo", "--bundle", str(files / "tiny"), "--input", str(files / "missing.wav")], "missing.wav: no such file"),
        (["demo", "--bundle", str(files / "tiny"), "--max-units", "0"], "--max-units 0: must be at least 1"),
    ]
    for args, message in cases:
        r = runner.invoke(cli.app, args)
        assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, (args, r.output)


def test_missing_extras_name_the_package_to_install(files, monkeypatch):
    import importlib

    real = importlib.import_module

    def without(name, *a, **kw):
        if name in ("sounddevice", "silero_vad", "aiomqtt"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **kw)

    monkeypatch.setattr(importlib, "import_module", without)
    for args, message in [
        (["--in", "mic"], "--in mic needs sounddevice, which is not installed: pip install 'streamgen[audio]'"),
        (["--in", str(files / "talk.wav"), "--out", "speaker"], "--out speaker needs sounddevice, which is not installed: pip install 'streamgen[audio]'"),
        (["--in", "-", "--vad"], "--vad needs silero_vad, which is not installed: pip install 'streamgen[vad]'"),
        (["--in", str(files / "talk.wav"), "--out", "mqtt://127.0.0.1:1/x"], "pip install 'streamgen[mqtt]'"),
    ]:
        if "--out" not in args:
            args += ["--out", str(files / "out.wav")]
        r = runner.invoke(cli.app, ["run", *args])
        assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, (args, r.output)


def streamgen(*args, env=None, timeout=120):
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    e.pop("STREAMGEN_DEBUG", None)
    return subprocess.run([STREAMGEN, *args], capture_output=True, text=True, timeout=timeout, env=e)


def test_mqtt_input_without_aiomqtt_says_what_to_install(files, tmp_path):
    """It used to hang silently. aiomqtt is made unimportable for this one process."""
    (tmp_path / "aiomqtt.py").write_text("raise ImportError(\"No module named 'aiomqtt'\")\n")
    r = streamgen("run", "--bundle", str(files / "tiny"), "--in", "mqtt://127.0.0.1:1883/sessions/+/in", "--out", "mqtt://127.0.0.1:1883/out",
                  env={"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr == "error: --in mqtt:// needs aiomqtt, which is not installed: pip install 'streamgen[mqtt]'\n"


def test_serve_without_its_extra_says_what_to_install(files, tmp_path):
    """It used to end in "ModuleNotFoundError: No module named 'starlette'". Made unimportable here."""
    (tmp_path / "starlette.py").write_text("raise ImportError(\"No module named 'starlette'\")\n")
    r = streamgen("serve", "--bundle", str(files / "tiny"),
                  env={"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr == "error: streamgen serve needs starlette, which is not installed: pip install 'streamgen[serve]'\n"


def test_serve_names_a_malformed_task_option(files):
    """serve reads --opt with the same parser as run and eval (an empty key used to pass unnoticed)."""
    for bad in ("k", "=1"):
        r = streamgen("serve", "--bundle", str(files / "tiny"), "--opt", bad, timeout=60)
        assert r.returncode == 2, r.stderr
        assert r.stderr == f"error: --opt {bad!r}: expected KEY=VALUE, e.g. --opt max_units=100\n"
    r = streamgen("serve", "--bundle", str(files / "tiny"), "--lm-dtype", "fp8", timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: --lm-dtype 'fp8': choose float32"), r.stderr
    r = streamgen("serve", "--bundle", str(files / "tiny"), "--threads", "0", timeout=60)
    assert r.returncode == 2 and r.stderr == "error: --threads 0: must be at least 1\n", r.stderr


def test_mp3_output_is_one_line_in_the_real_command(files):
    """It used to end in a traceback, "Event loop is closed" and "coroutine was never awaited"."""
    r = streamgen("run", "--bundle", str(files / "tiny"), "--in", str(files / "talk.wav"), "--out", str(files / "x.mp3"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (f"error: --out {files / 'x.mp3'}: cannot write .mp3; write .wav or .flac "
                        "(convert afterwards, e.g. ffmpeg -i out.wav out.mp3)\n")
    assert not (files / "x.mp3").exists()


def test_chunk_ms_zero_returns_at_once_in_the_real_command(files):
    r = streamgen("run", "--bundle", str(files / "tiny"), "--in", str(files / "talk.wav"), "--out", str(files / "y.wav"), "--chunk-ms", "0",
                  timeout=60)
    assert r.returncode == 2 and r.stderr == "error: --chunk-ms 0: must be from 10 to 10000 ms\n"


def test_an_unforeseen_failure_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    app = cli.App()

    @app.command()
    def boom():
        raise RuntimeError("the disk caught fire")

    monkeypatch.setattr(cli, "DEBUG", False)
    with pytest.raises(SystemExit) as e:
        app([], prog_name="streamgen")
    err = capsys.readouterr().err
    assert e.value.code == 1
    assert err == "error: RuntimeError: the disk caught fire (streamgen --debug ... shows where)\n"
    monkeypatch.setattr(cli, "DEBUG", True)
    with pytest.raises(RuntimeError, match="the disk caught fire"):
        app([], prog_name="streamgen")


def test_debug_flag_reaches_the_commands(files, monkeypatch):
    monkeypatch.setattr(cli, "DEBUG", False)
    r = runner.invoke(cli.app, ["--debug", "info", str(files / "tiny")])
    assert r.exit_code == 0 and cli.DEBUG is True


def test_a_session_that_produced_nothing_leaves_no_file(tmp_path):
    sink = FileSink(tmp_path / "{session}.wav", 16000)

    async def go():
        await sink.write(SessionError("a", "failed"))
        await sink.write(End("a", 0, 0.0))
        await sink.write(AudioOut("b", torch.zeros(160), 0, 0.0))
        await sink.write(End("b", 160, 0.0))
        await sink.close()

    asyncio.run(go())
    assert not (tmp_path / "a.wav").exists()
    assert sf.info(str(tmp_path / "b.wav")).frames == 160


def test_eval_names_its_mistakes_before_loading_anything(files):
    base = ["eval", "--task", "resynthesis", "--manifest", str(files / "m.tsv"), "--out", str(files / "ev"), "--bundle", str(files / "tiny")]
    (files / "m.tsv").write_text("id\taudio\tn_frames\ttext\n")
    for extra, message in [
        (["--chunk-ms", "320,abc"], "--chunk-ms '320,abc': expected sizes in ms separated by commas"),
        (["--chunk-ms", "0"], "--chunk-ms 0: must be from 10 to 10000 ms"),
        (["--opt", "k"], "--opt 'k': expected KEY=VALUE"),
        (["--limit", "0"], "--limit 0: must be at least 1"),
        (["--lm-dtype", "float16"], "--lm-dtype 'float16': choose float32"),
        (["--task", "nope"], "unknown task 'nope'; installed tasks: continuation, inpainting, resynthesis, translation"),
        (["--references", str(files / "refs.tsv")], f"--references {files / 'refs.tsv'}: no such manifest"),
    ]:
        r = runner.invoke(cli.app, base + extra)
        assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, (extra, r.output)
    (files / "m.tsv").unlink()  # a manifest that is not there is named before the bundle loads, after the task
    r = runner.invoke(cli.app, base[:2] + ["nope"] + base[3:])
    assert r.exit_code == 2 and "unknown task 'nope'" in r.output, r.output
    r = runner.invoke(cli.app, base)
    assert r.exit_code == 2 and f"--manifest {files / 'm.tsv'}: no such manifest" in r.output, r.output


@pytest.mark.parametrize("args, message", [
    (["run", "--chunk-ms", "abc"], "error: Invalid value for '--chunk-ms': Input should be a valid integer, unable to parse string as an integer (see streamgen run --help)\n"),
    (["run", "--in", "x.wav", "--bogus"], "error: No such option: --bogus"),
    (["run", "--in", "x.wav"], "error: Missing option '--out'. (see streamgen run --help)\n"),
    (["nonsense"], "error: No such command 'nonsense'. (see streamgen --help)\n"),
])
def test_command_line_syntax_errors_are_one_line_too(args, message):
    r = streamgen(*args, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr


def test_help_still_exits_0():
    r = streamgen("run", "--help", timeout=60)
    assert r.returncode == 0 and "Figures of --stats" in r.stdout


def test_convert_never_writes_over_an_existing_bundle(files, tmp_path):
    """`convert --out` into a bundle that holds parts rewrote its bundle.json with the new part alone: the
    others and the trained prompts were dropped without a word."""
    import shutil

    there = tmp_path / "b"
    shutil.copytree(files / "tiny", there)
    before = (there / "bundle.json").read_text()
    np.save(tmp_path / "c.npy", np.zeros((4, 8), np.float32))
    r = runner.invoke(cli.app, ["convert", "--kmeans", str(tmp_path / "c.npy"), "--out", str(there)])
    assert r.exit_code != 0 and f"--out {there}: not empty; convert writes a new bundle into a new or empty directory" in r.output
    assert (there / "bundle.json").read_text() == before
    r = runner.invoke(cli.app, ["convert", "--kmeans", str(tmp_path / "c.npy"), "--out", str(tmp_path / "new")])
    assert r.exit_code == 0, r.output


def test_a_reader_that_goes_away_ends_the_run_quietly(files):
    """`streamgen run ... --out - | head -c 100`: the closed pipe is the end of the output, exit 0, no
    traceback (it raised BrokenPipeError and exited 1)."""
    args = ["run", "--bundle", str(files / "tiny"), "--in", str(files / "long.wav"), "--out", "-", "--task", "resynthesis"]
    r = subprocess.run(f"'{STREAMGEN}' {' '.join(args)} | head -c 100 > /dev/null; echo \"rc=${{PIPESTATUS[0]}}\"",
                       shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "rc=0", r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_ends_a_run_whose_input_stays_open(files, sig):
    """Raw PCM from a pipe that never ends (a microphone's arecord): the signal ends the run, exit 0,
    its output a whole file (the read blocked in the event loop's executor kept asyncio.run from
    returning until stdin closed, and SIGHUP left a WAV whose header said it held nothing)."""
    out = files / f"held_{sig.name}.wav"
    proc = subprocess.Popen([STREAMGEN, "run", "--bundle", str(files / "tiny"), "--in", "-", "--out", str(out), "--task", "resynthesis"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        talk, _ = sf.read(files / "talk.wav", dtype="int16")
        proc.stdin.write(talk.tobytes())
        proc.stdin.flush()
        deadline = time.monotonic() + 120
        while (not out.exists() or out.stat().st_size < 1000) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)  # stdin is still open
    finally:
        proc.kill()
        proc.stdin.close()
    assert rc == 0, proc.stderr.read().decode()
    audio, rate = sf.read(out)
    assert rate == 16000 and len(audio) > 0


def pending(pipe) -> int:
    """Bytes waiting in a pipe we have not read."""
    import fcntl
    import struct
    import termios

    return struct.unpack("i", fcntl.ioctl(pipe.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def test_a_second_signal_stops_a_run_whose_output_waits_for_ever(files):
    """`--out -` to a reader that stopped reading: draining after the first signal waits on the pipe, so
    the second stops at once (before, neither could: the write blocked the event loop itself)."""
    proc = subprocess.Popen([STREAMGEN, "run", "--bundle", str(files / "tiny"), "--in", str(files / "long.wav"), "--out", "-",
                             "--task", "resynthesis"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while pending(proc.stdout) < 60000 and time.monotonic() < deadline:  # until its output fills the pipe nobody reads
            time.sleep(0.2)
        assert proc.poll() is None and pending(proc.stdout) >= 60000
        proc.send_signal(signal.SIGTERM)
        time.sleep(2)
        assert proc.poll() is None  # draining: the output still waits
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert "stopping now" in proc.stderr.read().decode()


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--stacks", "foo"], "--stacks 'foo': choose one of encoder, decoder"),
    (["--prompt-length", "0"], "--prompt-length 0: must be from 1 to 4096"),
    (["--lr", "-1"], "--lr -1.0: must be from 1e-08 to 10.0"),
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--task", "../evil"], "--task '../evil': a task name is letters, digits, _ . -"),
], ids=["batch", "stacks", "length", "lr", "epochs", "task"])
def test_train_prompt_checks_its_options_before_it_reads_or_trains(files, tmp_path, extra, message):
    """They failed after loading and training had begun (a range() of step 0), or only at the end
    (--into-bundle with a task name that is a path), or not at all (--epochs 0 trained nothing)."""
    args = ["train-prompt", "--bundle", str(files / "tiny"), "--task", "toy", "--train", str(tmp_path / "absent.tsv"),
            "--out", str(tmp_path / "run")]
    r = runner.invoke(cli.app, args + extra)
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "run").exists()


def test_training_commands_never_overwrite_a_run_and_check_their_data(files, tmp_path):
    """Without --resume a run in --out was trained over; --resume with nothing there failed late (exit 1); units
    outside the bundle's inventory trained as <mask>, </s> and padding; train-backbone's --mask-ratio 1.5 hung."""
    from streamgen.train.data import write_pairs, Pair

    write_pairs(tmp_path / "ok.tsv", [Pair(f"p{i}", [1, 2, 3, 4, 5], [5, 6, 7, 8, 9]) for i in range(4)])
    write_pairs(tmp_path / "over.tsv", [Pair("p0", [1, 2], [3, 4]), Pair("p1", [1, 2], [100, 101])])
    base = ["train-prompt", "--bundle", str(files / "tiny"), "--task", "toy", "--epochs", "1", "--batch-size", "2", "--prompt-length", "2"]
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "state.pt").write_bytes(b"a run's state")
    (tmp_path / "afile").write_text("x")
    for extra, message in [
        (["--train", str(tmp_path / "ok.tsv"), "--out", str(tmp_path / "held")], "holds a training run: add --resume to continue it"),
        (["--train", str(tmp_path / "ok.tsv"), "--out", str(tmp_path / "fresh"), "--resume"], "holds no training state (state.pt) to resume"),
        (["--train", str(tmp_path / "ok.tsv"), "--out", str(tmp_path / "afile")], "is a file; give a directory for the checkpoints"),
        (["--train", str(tmp_path / "over.tsv"), "--out", str(tmp_path / "run")], "over.tsv: pair p1: tgt_units has unit 100, outside this model's 0..99"),
    ]:
        r = runner.invoke(cli.app, base + extra)
        assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, (extra, r.output)
    assert (tmp_path / "held" / "state.pt").read_bytes() == b"a run's state" and not (tmp_path / "run").exists()
    r = runner.invoke(cli.app, ["train-backbone", "--bundle", str(files / "tiny"), "--train", str(tmp_path / "ok.tsv"),
                                "--out", str(tmp_path / "bb"), "--mask-ratio", "1.5"])
    assert r.exit_code == 2 and "--mask-ratio 1.5: must be from 0.01 to 0.9" in r.output, r.output


def test_unit_and_vocoder_training_check_their_options_and_the_bundle_they_write_into(files, tmp_path):
    """--steps 0 ended in an IndexError after train-units had written the bundle; new units of another
    inventory went into a bundle whose Unit mBART and vocoder speak 100 (it loaded, and spoke nonsense)."""
    import shutil

    shutil.copytree(files / "tiny", tmp_path / "b")
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    manifest = tmp_path / "m.tsv"
    manifest.write_text("id\taudio\n")
    for args, message in [
        (["train-units", "--manifest", str(manifest), "--bundle", str(tmp_path / "b"), "--steps", "0"], "--steps 0: must be at least 1"),
        (["train-units", "--manifest", str(manifest), "--bundle", str(tmp_path / "b"), "--units", "8"],
         "--units 8: " + str(tmp_path / "b") + "'s Unit mBART speak 100 and vocoder speak 100 units"),
        (["train-units", "--manifest", str(manifest), "--bundle", str(tmp_path / "b"), "--output-layer", "9", "--units", "100"],
         "--output-layer 9: must be from 1 to 4"),
        (["train-vocoder", "--manifest", str(manifest), "--out", str(tmp_path / "v"), "--steps", "0"], "--steps 0: must be at least 1"),
        (["train-vocoder", "--manifest", str(manifest), "--out", str(tmp_path / "v"), "--segment-frames", "0"], "--segment-frames 0: must be at least 1"),
    ]:
        r = runner.invoke(cli.app, args)
        assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, (args, r.output)
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()} == before and not (tmp_path / "v").exists()


@pytest.mark.parametrize("extra, message", [
    (["--idle-timeout", "0"], "--idle-timeout must be at least 1 s, got 0"),
    (["--drain", "-5"], "--drain must be at least 0 s, got -5"),
    (["--status-every", "-1"], "--status-every must be at least 0 s, got -1"),
])
def test_serve_names_timing_options_that_make_no_sense(extra, message):
    """--idle-timeout 0 started a server that closed every connection at once."""
    pytest.importorskip("starlette")
    r = runner.invoke(cli.app, ["serve", *extra])
    assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, r.output


def test_ctrl_c_while_a_command_loads_is_one_line(monkeypatch, capfd):
    """A 48-line KeyboardInterrupt traceback from inside the model's loading, before the server handles signals."""
    pytest.importorskip("starlette")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C, as it lands while the bundle loads

    monkeypatch.setattr(options, "open_bundle", interrupted)
    with pytest.raises(SystemExit) as e:
        cli.app(["serve", "--http", "127.0.0.1:0"])
    assert e.value.code == 130 and capfd.readouterr().err == "interrupted\n"
    # and while the command line itself loads (torch's import: the first seconds), in the command's launcher
    import importlib.abc

    import streamgen.launch as launch

    class Interrupted(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "streamgen.cli":
                raise KeyboardInterrupt  # Ctrl-C, as it lands inside the import
            return None

    import streamgen

    monkeypatch.delitem(sys.modules, "streamgen.cli")
    monkeypatch.setattr(streamgen, "cli", cli)  # (an import below binds a new module there: later tests get this one back)
    monkeypatch.setattr(sys, "meta_path", [Interrupted(), *sys.meta_path])
    with pytest.raises(SystemExit) as e:
        launch.main()
    assert e.value.code == 130 and capfd.readouterr().err == "interrupted\n"

    class Swallowed(importlib.abc.MetaPathFinder):
        """A real Ctrl-C (SIGINT) inside an import that a library's bare `except:` swallows: the import goes on."""

        def find_spec(self, name, path=None, target=None):
            if name == "streamgen.cli":
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(1)  # the handler runs here
                except:  # noqa: E722 (what such a library does)
                    pass
            return None

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(sys, "meta_path", [Swallowed(), *sys.meta_path[1:]])
    with pytest.raises(SystemExit) as e:
        launch.main()
    assert e.value.code == 130 and capfd.readouterr().err == "interrupted\n"
    assert signal.getsignal(signal.SIGINT) is before  # the command's own handling of Ctrl-C comes back


def test_a_command_started_with_ctrl_c_ignored_keeps_ignoring_it(tmp_path):
    """A background job of a script ignores SIGINT: a Ctrl-C the user gives the script while the command loads
    must not end it (the launcher's own handler took over while loading)."""
    code = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "import importlib.abc\n"
            "class Kick(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'streamgen.cli':\n"
            "            os.kill(os.getpid(), signal.SIGINT)\n"
            "        return None\n"
            "sys.meta_path.insert(0, Kick())\n"
            "sys.argv = ['streamgen', '--help']\n"
            "import streamgen.launch\n"
            "streamgen.launch.main()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "interrupted" not in r.stderr and "Usage" in r.stdout, (r.returncode, r.stderr[-2000:])


def test_train_units_refuses_another_inventory_for_a_tasks_own_backbone(tmp_path):
    """Only the shared Unit mBART and the vocoder were asked: a bundle whose translation backbone speaks 100 units
    took 8 new ones and no longer loaded."""
    from streamgen.testing import random_bundle

    b = random_bundle()
    b.backbones["translation"], b.mbart, b.vocoder = b.mbart, None, None
    b.save(tmp_path / "b")
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    manifest = tmp_path / "m.tsv"
    manifest.write_text("id\taudio\n")
    r = runner.invoke(cli.app, ["train-units", "--manifest", str(manifest), "--bundle", str(tmp_path / "b"), "--units", "8"])
    assert r.exit_code == 2 and "--units 8: " + str(tmp_path / "b") + "'s translation backbone speak 100 units" in r.output, r.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()} == before
