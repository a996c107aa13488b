"""The benchmark scripts a GPU run depends on: a device is lent for minutes, so the commands `bench/gpu.sh` runs
must take the options it gives them, and the sessions bench must run every task in both modes and write the
report `bench/RESULTS.md` is made from, here on a CPU with a tiny bundle."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gpu_commands() -> list[tuple[str, list[str]]]:
    """(script, its options) for every `python3 bench/NAME.py ...` the GPU script runs, its commands held in
    variables (`S="python3 ..."`, used as `$S ...`) expanded."""
    text = (ROOT / "bench" / "gpu.sh").read_text().replace("\\\n", " ")
    variables = dict(re.findall(r'^ *([A-Z]+)="(python3 .*)"$', text, re.M))
    out = []
    for line in text.splitlines():
        if re.match(r' *[A-Z]+="python3 ', line):
            continue
        for name, command in variables.items():
            line = line.replace(f"${name} ", f"{command} ")
        for m in re.finditer(r"python3 (bench/\w+\.py)(.*?)(?:2>&1|\||$)", line):
            out.append((m.group(1), re.findall(r"(?<!\S)--[a-z][a-z-]*", m.group(2))))
    return out


def test_the_gpu_scripts_commands_take_the_options_it_gives_them():
    commands = gpu_commands()
    assert {script for script, _ in commands} == {"bench/decode.py", "bench/sessions.py", "bench/streaming_vocoder.py",
                                                  "bench/engine_overhead.py"}
    assert len(commands) >= 8 and sum(script == "bench/engine_overhead.py" for script, _ in commands) == 2
    helps = {}
    for script, options in commands:
        if script not in helps:
            r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            helps[script] = set(re.findall(r"--[a-z][a-z-]*", r.stdout))
        assert set(options) <= helps[script], (script, set(options) - helps[script])


def test_the_sessions_bench_runs_every_task_in_both_modes_and_writes_its_report(tmp_path):
    from streamgen.testing import random_bundle

    random_bundle(seed=1).save(tmp_path / "tiny")
    report = tmp_path / "sessions.json"
    r = subprocess.run([sys.executable, "bench/sessions.py", "--bundle", str(tmp_path / "tiny"), "--levels", "1", "--seconds", "1",
                        "--tasks", "resynthesis,translation,continuation", "--modes", "engine,one-at-a-time", "--json", str(report)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    got = json.loads(report.read_text())
    assert set(got["tasks"]) == {"resynthesis", "translation", "continuation"}
    for task, modes in got["tasks"].items():
        assert set(modes) == {"engine", "one-at-a-time"}, task
        for mode, figures in modes.items():
            (row,) = figures["rows"]
            assert row["sessions"] == 1 and row["processes"] == 1 and row["ticks"] > 0, (task, mode)
            assert figures["held"] in (0, 1) and figures["levels"][0]["runs"] == 1
    resynthesis = got["tasks"]["resynthesis"]["engine"]["rows"][0]
    assert resynthesis["completed"] == 1 and resynthesis["lag_p99_ms"] is not None and resynthesis["first_audio_ms"] > 0
    assert re.search(r"^resynthesis: sessions held at p99 lag <= 250 ms: engine \d, one-at-a-time \d", r.stdout, re.M), r.stdout


def test_the_sessions_bench_splits_a_level_over_engine_processes_that_load_their_own_models(tmp_path):
    """`--processes` on a GPU: CUDA cannot be forked, so each engine process starts anew and loads its models
    (`--start spawn`, the default there; tried here on the CPU). Every talker of a level is served, by both."""
    from streamgen.testing import random_bundle

    random_bundle(seed=1).save(tmp_path / "tiny")
    report = tmp_path / "sessions.json"
    r = subprocess.run([sys.executable, "bench/sessions.py", "--bundle", str(tmp_path / "tiny"), "--levels", "1,3", "--seconds", "1",
                        "--tasks", "resynthesis", "--modes", "engine", "--processes", "2", "--start", "spawn", "--json", str(report)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "2 engine processes" in r.stdout.splitlines()[0]
    rows = json.loads(report.read_text())["tasks"]["resynthesis"]["engine"]["rows"]
    assert [(x["sessions"], x["completed"], x["processes"]) for x in rows] == [(1, 1, 1), (3, 3, 2)]
    assert all(x["ticks"] > 0 and x["lag_p99_ms"] is not None for x in rows)


def test_the_sessions_bench_profiles_the_engines_worker(tmp_path):
    from streamgen.testing import random_bundle

    random_bundle(seed=1).save(tmp_path / "tiny")
    cmd = [sys.executable, "bench/sessions.py", "--bundle", str(tmp_path / "tiny"), "--levels", "1", "--seconds", "1",
           "--tasks", "resynthesis", "--modes", "engine", "--profile", str(tmp_path / "prof")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "prof" / "resynthesis_engine_N1_run1.txt").read_text()
    ticks = int(re.match(r"# (\d+) ticks", table).group(1))
    assert ticks > 0 and "## by self_cpu_time_total" in table and "aten::conv1d" in table  # the worker's own operators
    r = subprocess.run(cmd + ["--processes", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "--profile records one engine process" in r.stderr


def test_the_streaming_vocoder_bench_counts_a_steps_operators_and_host_reads():
    r = subprocess.run([sys.executable, "bench/streaming_vocoder.py", "--sizes", "tiny", "--levels", "1,3", "--repeats", "1",
                        "--dtypes", "float32,bfloat16"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    rows = re.findall(r"^\| tiny \| (\w+) \| (\d+) \| [\d.]+ \| [\d.]+ \| (\d+) \| (\d+) \|$", r.stdout, re.M)
    assert [(d, n) for d, n, _, _ in rows] == [("float32", "1"), ("float32", "3"), ("bfloat16", "1"), ("bfloat16", "3")], r.stdout
    assert all(int(ops) > 0 and reads == "0" for _, _, ops, reads in rows), r.stdout


def test_the_option_check_reads_the_commands_as_the_shell_runs_them(monkeypatch, tmp_path):
    """(So that an option the script no longer takes is caught, also behind `$S` and a continued line.)"""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "gpu.sh").write_text('S="python3 bench/sessions.py --levels 1"\ntimeout 9 $S \\\n  --nope 2>&1 | tee x\n')
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert gpu_commands() == [("bench/sessions.py", ["--levels", "--nope"])]


def test_engine_calls_lists_the_largest_lags_and_draws_the_run(tmp_path):
    from streamgen.testing import random_bundle

    random_bundle(seed=1).save(tmp_path / "tiny")
    for task in ("continuation", "translation"):  # (the tiny bundle's translation says nothing: a plot without chunks)
        png = tmp_path / f"{task}.png"
        r = subprocess.run([sys.executable, "bench/engine_calls.py", "--bundle", str(tmp_path / "tiny"), "--task", task,
                            "--sessions", "2", "--seconds", "1", "--worst", "3", "--plot", str(png)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", task
        if task == "continuation":  # each of the largest lags with the decode its units came from
            worst = re.findall(r"^ +\d+ ms +s[01] +at +[\d.]+ s: a decode of up to \d+ units begun \d+ ms before", r.stdout, re.M)
            assert len(worst) == 3, r.stdout


def test_the_engine_overhead_bench_splits_each_stage_from_its_model_calls():
    r = subprocess.run([sys.executable, "bench/engine_overhead.py", "--sessions", "2"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    m = re.search(r"^   2 sessions, (\d+) ticks: per tick \(ms\) intake [\d.]+, encode [\d.]+, decide [\d.]+, decode [\d.]+, vocode [\d.]+; "
                  r"model calls encoder [\d.]+, vocoder [\d.]+; the rest (-?\d+) us per session per tick; a tick is ([\d.]+)x "
                  r"its 320 ms chunk$", r.stdout, re.M)
    assert m and int(m.group(1)) > 5 and int(m.group(2)) > 0 and float(m.group(3)) > 0, r.stdout


def test_the_shapes_bench_counts_the_shapes_a_gpu_would_plan_with_and_without_the_grid():
    r = subprocess.run([sys.executable, "bench/shapes.py", "--sessions", "3", "--tasks", "resynthesis", "--ticks", "24"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    rows = re.findall(r"^\| resynthesis \| 3 \| (exact|GPU grid) \| (\d+) \| (\d+) / (\d+) / (\d+) \((\d+), (\d+)\) \| ([\d.]+) \|$",
                      r.stdout, re.M)
    assert [row[0] for row in rows] == ["exact", "GPU grid"], r.stdout
    for _, calls, a, b, c, conv, attention, _ in rows:
        assert int(calls) > 0 and int(a) <= int(b) <= int(c) == int(conv) + int(attention)
    assert int(rows[1][4]) < int(rows[0][4])  # the grid repeats shapes that exact calls do not


def test_the_idle_memory_bench_reports_what_an_idle_engine_keeps():
    r = subprocess.run([sys.executable, "bench/idle_memory.py", "--task", "translation", "--sessions", "2"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert re.search(r", translation, 2 sessions of the bundled sample, 2 ended$", r.stdout, re.M), r.stdout
    m = re.search(r"^RSS (\d+) MB before them, (\d+) MB once they had all ended, peak (\d+) MB; decoder pools kept: (\d+)$", r.stdout, re.M)
    assert m and 0 < int(m.group(1)) <= int(m.group(3)) and int(m.group(2)) <= int(m.group(3)) and m.group(4) == "0", r.stdout
