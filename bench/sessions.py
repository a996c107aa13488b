"""How many live talkers one engine keeps in real time: N sessions paced like people talking
(320 ms chunks, starts staggered over one second), for N = 1, 2, 4, ... per task, through the same
Pipeline and engine that `streamgen run` and `streamgen serve` use.

Per output chunk, its lag is how long after its ideal time it left the engine: the ideal time is when
the input it depended on had been captured (the session's first sample + the chunk's ideal delay,
which already counts the look-ahead the stages wait for), so the lag is queueing and compute only.
Reported per N: p50 / p99 lag over every output chunk (and the p99 of those said while the talkers
talk, without the ones after their input ended), median first-audio latency, sessions completed, the
compute per stage (the generator's "admitting" part: bringing decodes in, i.e. a stream's new source
encoded and prefill), the decoder steps and the rows each advanced on average (how much the sessions'
decodes share steps); and per task the largest N whose p99 lag stays within --max-lag-ms (250).

With --runs R each level runs R times, the modes alternated run by run: on a shared machine one
setting's p99 moves by 100-200 ms from run to run (bench/RESULTS.md), so a single run says little. A
level is then held when its p99 stays within the bound in more than half of its runs, and each
level's line says in how many it did. Before each run a probe times the machine itself (a one-row decoder
step, a 64 MB read), printed at the end of the run's line: runs of different hours compare through it.

The baseline runs in the same invocation: the same engine with --max-batch 1, i.e. every model call
serves one session at a time (what the one-worker-per-stage pipeline did before the engine).

    python bench/sessions.py                               # default bundle, CPU, all three tasks
    python bench/sessions.py --device cuda --dtype bfloat16 --public-random --levels 64,256,1024
    python bench/sessions.py --json out.json
    python bench/sessions.py --tasks translation --pause-s 0.6  # talkers who pause between sentences
    python bench/sessions.py --tasks translation --processes 2  # one engine process per core
    python bench/sessions.py --device cuda --dtype bfloat16 --public-random --processes 8  # eight engines on one GPU
    python bench/sessions.py --tasks translation --levels 16 --runs 8 --modes engine  # held in how many of 8 runs
    python bench/sessions.py --tasks resynthesis,resynthesis:durations=predicted  # task options after colons
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import traceback

import numpy as np
import torch

from streamgen.bundle import load_bundle
from streamgen.io.files import read_audio
from streamgen.io.memory import MemorySink
from streamgen.options import LM_DTYPE_HELP, LM_DTYPES, UsageError, cast_backbones, parse_kv
from streamgen.pipeline.items import AudioChunk, End
from streamgen.pipeline.runner import Pipeline, build_engine
from streamgen.pipeline.stats import Stats

TASK_OPTIONS = {
    "resynthesis": {},
    "translation": {"chunk_ms": 320},  # the task's default policy
    "continuation": {"max_units": 100, "min_units": 50},
}


def task_options(spec: str) -> tuple[str, dict]:
    """A `--tasks` entry, a task name with optional KEY=VALUE overrides after colons
    (`resynthesis:durations=predicted`) -> (task, its options)."""
    name, *pairs = spec.split(":")
    if name not in TASK_OPTIONS:
        raise SystemExit(f"--tasks: unknown task {name!r} (choose from {', '.join(TASK_OPTIONS)})")
    try:
        extra = parse_kv(pairs, flag=f"--tasks {name}:")
    except UsageError as e:
        raise SystemExit(str(e)) from None
    return name, {**TASK_OPTIONS[name], **extra}


def talker_wave(rate: int, seconds: float, pause_s: float = 0.0, path: str | None = None) -> torch.Tensor:
    """What each talker says: the audio file at `path` (default: the bundled English sample) repeated to
    `seconds`, each repetition followed by `pause_s` of microphone-like noise (-60 dBFS) when > 0 (a
    talker who pauses between sentences)."""
    from importlib import resources

    sample = read_audio(path or str(resources.files("streamgen") / "assets" / "sample.wav"), rate)
    if pause_s > 0:
        hiss = torch.randn(int(pause_s * rate), generator=torch.Generator().manual_seed(0)) * 1e-3
        sample = torch.cat([sample, hiss])
    n = int(seconds * rate)
    return sample.repeat(n // len(sample) + 1)[:n]


class Talkers:
    """N sessions, each sending `wave` in chunks at the pace it was spoken."""

    def __init__(self, n: int, wave: torch.Tensor, chunk: int, rate: int, stagger_s: float = 1.0):
        self.n, self.wave, self.chunk, self.rate, self.stagger = n, wave, chunk, rate, stagger_s

    async def __aiter__(self):
        t0 = time.monotonic() + 0.1
        events = []
        for i in range(self.n):
            start = t0 + self.stagger * i / self.n
            for j, s in enumerate(range(0, len(self.wave), self.chunk)):
                piece = self.wave[s : s + self.chunk]
                events.append((start + (s + len(piece)) / self.rate, i, j, s, piece))
            events.append((start + len(self.wave) / self.rate + 1e-6, i, -1, len(self.wave), None))
        events.sort(key=lambda e: e[0])
        for due, i, j, s, piece in events:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic()
            yield End(f"s{i}", s, now) if piece is None else AudioChunk(f"s{i}", j, piece, s, now)


def level(bundle, task: str, n: int, wave: torch.Tensor, chunk_ms: int, max_batch: int, cuda_graphs: bool = True,
          vocoder_lookahead: int | None = None, profile: str | None = None) -> dict:
    """n talkers through one engine: the raw figures (every output chunk's lag), for `summary`. With `profile`
    (a file), the engine's worker thread runs under torch's profiler and its operators' table is written there."""
    rate = bundle.sample_rate
    engine = build_engine(bundle, *task_options(task), chunk_ms=chunk_ms, max_batch=max_batch,
                          max_sessions=max(256, n), cuda_graphs=cuda_graphs, vocoder_lookahead=vocoder_lookahead)
    if profile:
        profile_worker(engine, profile)
    stats, sink = Stats(rate), MemorySink()
    t = time.monotonic()
    asyncio.run(Pipeline(Talkers(n, wave, rate * chunk_ms // 1000, rate), engine, sink, stats).run())
    lags, ends, first, done = [], [], [], 0
    spoken_ms = 1000 * len(wave) / rate
    for st in stats.sessions.values():
        if st.error is None and st.outputs:
            done += 1
            lags += [1000 * (emitted - st.started_at) - ideal for ideal, emitted, _ in st.outputs]
            ends += [ideal >= spoken_ms for ideal, _, _ in st.outputs]  # said after the input ended (the tail)
            first.append(1000 * (st.outputs[0][1] - st.started_at))
    compute = {}
    for stage, seconds in engine.compute.items():
        compute[stage] = seconds
        if stage == "generator":  # the part that brings decodes in: source encoding (a stream's new units), prefill
            compute["generator admitting"] = sum(d.admit_s for d in engine.decoders.values())
    steps = [sum(getattr(d, k) for d in engine.decoders.values()) for k in ("steps", "rows_stepped")]
    return {"sessions": n, "completed": done, "wall_s": time.monotonic() - t, "lags": lags, "ends": ends, "first": first,
            "busy": engine.busy_s / max(1e-9, time.monotonic() - t), "ticks": engine.ticks, "compute_s": compute,
            "decoder_steps": steps}


def profile_worker(engine, path: str) -> None:
    """Run the engine's worker under torch's profiler (which records the thread that starts it) and write the
    operators that took the most host time there: where a tick goes. On a GPU that is each operator's launch,
    and the waits of those that synchronise (CUPTI's device-side tracing must start in the main thread, so
    kernels' own times are not recorded here)."""
    from torch.profiler import ProfilerActivity, profile

    run = engine._run

    def profiled(*args, **kwargs):
        prof = profile(activities=[ProfilerActivity.CPU])
        prof.start()
        try:
            return run(*args, **kwargs)
        finally:
            prof.stop()
            table = prof.key_averages()
            with open(path, "w") as f:
                f.write(f"# {engine.ticks} ticks\n")
                for key in ("self_cpu_time_total", "cpu_time_total"):
                    f.write(f"\n## by {key}\n" + table.table(sort_by=key, row_limit=30) + "\n")

    engine._run = profiled


def machine_probe(bundle, task: str) -> dict | None:
    """How fast the machine is just before a run, so that runs of different hours read side by side (on a
    shared machine one code's figures drift by half within an hour: bench/RESULTS.md): a one-row decoder
    step of the task's backbone (a 120-unit source, 100 tokens cached; median of 40) and the rate of
    reading 64 MB. CPU only (None elsewhere, or without a backbone)."""
    if bundle.device.type != "cpu" or not bundle.has_backbone(task):
        return None
    model = bundle.backbone(task)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, 4 + model.cfg.num_units, (1, 120), generator=g)
    state = model.start(torch.cat([src, torch.full((1, 1), 2)], 1), capacity=128)
    model.step(state, torch.randint(4, 4 + model.cfg.num_units, (1, 100), generator=g))
    token, times = torch.full((1,), 7), []
    for i in range(50):
        t = time.perf_counter()
        model.step_rows(state, [0], token)
        times.append(time.perf_counter() - t)
        state.lengths[0] -= 1
    buf = torch.ones(16 * 1024 * 1024)
    buf.sum()
    t = time.perf_counter()
    for _ in range(4):
        buf.sum()
    return {"step_ms": round(1000 * float(np.median(times[10:])), 2), "read_gb_s": round(4 * 64 / 1024 / (time.perf_counter() - t), 1)}


def summary(parts: list[dict]) -> dict:
    """One level's figures from the raw figures `level` gives for each of its engine processes (one, or one per core)."""
    lags = [x for p in parts for x in p["lags"]]
    ends = [x for p in parts for x in p["ends"]]
    during = [x for x, end in zip(lags, ends) if not end]
    first = [x for p in parts for x in p["first"]]
    compute: dict[str, float] = {}
    for p in parts:
        for k, v in p["compute_s"].items():
            compute[k] = compute.get(k, 0.0) + v
    return {"sessions": sum(p["sessions"] for p in parts), "completed": sum(p["completed"] for p in parts),
            "wall_s": round(max(p["wall_s"] for p in parts), 1),
            "lag_p50_ms": round(float(np.percentile(lags, 50)), 1) if lags else None,
            "lag_p99_ms": round(float(np.percentile(lags, 99)), 1) if lags else None,
            # the same without the chunks said after the input ended: which of the two sets the p99
            "lag_p99_while_talking_ms": round(float(np.percentile(during, 99)), 1) if during else None,
            "first_audio_ms": round(float(np.median(first)), 1) if first else None,
            "engine_busy": round(float(np.mean([p["busy"] for p in parts])), 2), "ticks": sum(p["ticks"] for p in parts),
            # decoder steps and the rows they advanced: sessions whose chunks arrive apart share few steps
            "decoder_steps": sum(p["decoder_steps"][0] for p in parts),
            "decoder_rows_per_step": round(sum(p["decoder_steps"][1] for p in parts) / max(1, sum(p["decoder_steps"][0] for p in parts)), 2),
            "compute_s": {k: round(v, 2) for k, v in compute.items()}, "processes": len(parts)}


def load_models(device: str = "cpu", dtype: str = "float32", bundle: str | None = None, public_random: bool = False,
                streaming_translation: bool = False, lm_dtype: str | None = None, no_cudnn: bool = False,
                no_cudnn_attention: bool = False):
    """The bundle a run measures, from its options (a started engine process loads its own with the same ones)."""
    torch.set_grad_enabled(False)
    torch.backends.cudnn.enabled = not no_cudnn
    if no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if public_random:
        from streamgen.testing import public_size_bundle

        models = public_size_bundle(streaming_translation=streaming_translation).to(device, getattr(torch, dtype))
    else:
        models = load_bundle(bundle, device=device, dtype=getattr(torch, dtype))
    return cast_backbones(models, device, getattr(torch, lm_dtype) if lm_dtype else None)


def _engine_process(conn, models, threads: int | None) -> None:
    """An engine process: its levels' shares, one after the other, until None (`models`: the bundle, forked, or
    the options to load it with)."""
    if threads:
        torch.set_num_threads(threads)
    bundle = load_models(**models) if isinstance(models, dict) else models
    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the bench ended (or was stopped) without saying so
            return
        if job is None:
            return
        try:
            conn.send(("ok", level(bundle, *job)))
        except BaseException:
            conn.send(("failed", traceback.format_exc()))


class EngineProcesses:
    """Engine processes that live for the whole run (as `serve --mqtt` workers do), each given its share of a
    level's talkers at once, so that the host's Python work of a tick (the bound of one engine on a GPU,
    bench/RESULTS.md) spreads over cores. On a CPU they are forked from this process with its bundle, one per
    core; CUDA cannot be forked, so on a GPU (or with start="spawn") each starts anew and loads its own models
    onto the one device they share."""

    def __init__(self, n: int, bundle, spec: dict, start: str):
        import multiprocessing

        ctx = multiprocessing.get_context(start)
        threads = max(1, (os.cpu_count() or 1) // n) if start == "spawn" else None  # (forked: the parent's setting)
        self.conns, self.procs = [], []
        for _ in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_engine_process, args=(child, bundle if start == "fork" else spec, threads), daemon=True)
            proc.start()
            child.close()  # (so that a process that dies reads as the end of its pipe here)
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:  # every one has its models before the first level starts
            self._answer(conn, "ready")

    def _answer(self, conn, expect: str | None = None):
        try:
            got = conn.recv()
        except EOFError:
            raise SystemExit("an engine process died (see its output above)") from None
        if expect is not None:
            if got != expect:
                raise SystemExit(f"an engine process answered {got!r}, not {expect!r}")
            return got
        status, value = got
        if status != "ok":
            raise SystemExit(f"an engine process failed:\n{value}")
        return value

    def level(self, task: str, n: int, *args) -> dict:
        """The level with its talkers split evenly over the processes, each with its own engine and talkers (as
        a cluster of `serve --mqtt` workers shares sessions, without the broker in between)."""
        shares = [n // len(self.conns) + (i < n % len(self.conns)) for i in range(len(self.conns))]
        busy = [conn for conn, k in zip(self.conns, shares) if k]
        for conn, k in zip(busy, [k for k in shares if k]):
            conn.send((task, k, *args))
        return summary([self._answer(conn) for conn in busy])

    def close(self) -> None:
        for conn in self.conns:
            conn.send(None)
        for proc in self.procs:
            proc.join(timeout=30)


def verdict(runs: list[dict], max_lag: float) -> dict:
    """One level over its runs: in how many every session completed with p99 lag <= max_lag, and
    whether that is more than half of them (held)."""
    ok = [r for r in runs if r["completed"] == r["sessions"] and r["lag_p99_ms"] is not None and r["lag_p99_ms"] <= max_lag]
    p99 = sorted(r["lag_p99_ms"] for r in runs if r["lag_p99_ms"] is not None)
    return {"sessions": runs[0]["sessions"], "runs": len(runs), "held_runs": len(ok), "held": 2 * len(ok) > len(runs),
            "p99_ms": p99, "p99_median_ms": float(np.median(p99)) if p99 else None}


def held(verdicts: list[dict]) -> int:
    """The largest level held."""
    return max((v["sessions"] for v in verdicts if v["held"]), default=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=None, help="bundle directory (default: the shipped one)")
    ap.add_argument("--public-random", action="store_true", help="random weights at the public model sizes instead of a bundle")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--lm-dtype", default=None, choices=LM_DTYPES, help=LM_DTYPE_HELP + " The rest stays in --dtype.")
    ap.add_argument("--tasks", default="resynthesis,translation,continuation",
                    help="comma-separated; each a task name with optional :KEY=VALUE option overrides")
    ap.add_argument("--levels", default="1,2,4,8,16,32,64")
    ap.add_argument("--seconds", type=float, default=8.0, help="speech per talker (the talker's audio, repeated)")
    ap.add_argument("--talker", default=None,
                    help="audio file each talker speaks (default: the bundled English sample); translation's own "
                         "language is Spanish, e.g. a few of the travel test set's source sentences")
    ap.add_argument("--chunk-ms", type=int, default=320)
    ap.add_argument("--pause-s", type=float, default=0.0,
                    help="each repetition of the sample followed by this much -60 dBFS noise (talkers who pause)")
    ap.add_argument("--max-lag-ms", type=float, default=250.0)
    ap.add_argument("--modes", default="engine,one-at-a-time", help="engine, one-at-a-time (the baseline), or both")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="on CUDA, eager model calls (no CUDA graphs)")
    ap.add_argument("--profile", metavar="DIR", help="one engine process: run its worker under torch's profiler and write each "
                    "run's table of operators by host time into DIR")
    ap.add_argument("--no-cudnn", action="store_true", help="convolutions without cuDNN (PyTorch's own kernels)")
    ap.add_argument("--no-cudnn-attention", action="store_true",
                    help="attention without cuDNN's kernels (flash or memory-efficient ones instead; on the H200 of "
                         "2026-11-29 each cuDNN attention call spent 5.4 ms of host time planning its shape)")
    ap.add_argument("--vocoder-windows", action="store_true",
                    help="CodeHiFiGAN in exact windows (context recomputed, few large calls, CUDA graphs on a GPU) "
                         "instead of streaming convolutions")
    ap.add_argument("--streaming-translation", action="store_true",
                    help="with --public-random: translation on its own backbone that streams (causal encoder, wait-k 30, "
                         "as the shipped bundle's), where the public Unit mBART re-encodes the source at every decision")
    ap.add_argument("--processes", type=int, default=1,
                    help="split each level's talkers over this many engine processes that live for the whole run: on a CPU "
                         "one per core (1 thread each); on a GPU they share the device, each with its own models")
    ap.add_argument("--start", choices=["fork", "spawn"], default=None,
                    help="how the engine processes start (default: forked with this process's models on a CPU; started "
                         "anew, each loading its own, on a GPU, where CUDA cannot be forked)")
    ap.add_argument("--runs", type=int, default=1,
                    help="run each level this many times, the modes alternated run by run; a level is held when its p99 "
                         "stays within --max-lag-ms in more than half of them")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.runs < 1:
        ap.error(f"--runs must be >= 1, got {args.runs}")
    if args.streaming_translation and not args.public_random:
        ap.error("--streaming-translation builds a public-size backbone: it goes with --public-random")
    if args.profile:
        if args.processes != 1:
            ap.error("--profile records one engine process: leave out --processes")
        os.makedirs(args.profile, exist_ok=True)

    spec = {k: getattr(args, k) for k in ("bundle", "public_random", "streaming_translation", "device", "dtype", "lm_dtype",
                                         "no_cudnn", "no_cudnn_attention")}
    bundle = load_models(**spec)
    start = args.start or ("spawn" if torch.device(args.device).type == "cuda" else "fork")
    engines = EngineProcesses(args.processes, bundle, spec, start) if args.processes > 1 else None
    wave = talker_wave(bundle.sample_rate, args.seconds, args.pause_s, args.talker)
    levels = [int(x) for x in args.levels.split(",")]
    lookahead = bundle.vocoder.frame_context() if args.vocoder_windows else None  # that much look-ahead: exact
    load = os.getloadavg()[0]
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  device {args.device} ({torch.get_num_threads()} threads), "
          f"load average {load:.1f}, {args.seconds:.0f} s per talker, {args.chunk_ms} ms chunks"
          + (f", {args.pause_s:g} s pauses" if args.pause_s else "") + (f", LM in {args.lm_dtype}" if args.lm_dtype else "") + (f", {args.processes} engine processes" if args.processes > 1 else ""))
    report = {"date": time.strftime("%Y-%m-%d"), "device": args.device, "load_average": load, "levels": levels, "tasks": {}}
    modes = [(m, {"engine": 0, "one-at-a-time": 1}[m]) for m in args.modes.split(",")]
    for task in args.tasks.split(","):
        report["tasks"][task] = {m: {"rows": [], "levels": []} for m, _ in modes}
        misses = {m: 0 for m, _ in modes}  # levels in a row not held: two end a mode's series (larger ones only take longer)
        for lv in levels:
            runs: dict[str, list[dict]] = {m: [] for m, _ in modes}
            for i in range(args.runs):
                for mode, max_batch in modes:
                    if misses[mode] >= 2:
                        continue
                    probe = machine_probe(bundle, task_options(task)[0])
                    prof = os.path.join(args.profile, f"{task.replace(':', '_')}_{mode}_N{lv}_run{i + 1}.txt") if args.profile else None
                    job = (task, lv, wave, args.chunk_ms, max_batch, not args.no_cuda_graphs, lookahead)
                    r = engines.level(*job) if engines is not None else summary([level(bundle, *job, prof)])
                    r["run"], r["probe"] = i + 1, probe
                    runs[mode].append(r)
                    report["tasks"][task][mode]["rows"].append(r)
                    ms = lambda k: "     n/a" if r[k] is None else f"{r[k]:8.1f}"
                    print(f"{task:13s} {mode:14s} N={lv:5d}  done {r['completed']:5d}  lag p50 {ms('lag_p50_ms')} ms  "
                          f"p99 {ms('lag_p99_ms')} ms (while talking {ms('lag_p99_while_talking_ms').strip()})  first audio {ms('first_audio_ms')} ms  busy {r['engine_busy']:.2f}  "
                          f"ticks {r['ticks']}  decoder steps {r['decoder_steps']} ({r['decoder_rows_per_step']:.2f} rows each)  " + " ".join(f"{k} {v:.1f}s" for k, v in r["compute_s"].items())
                          + (f"  run {i + 1}/{args.runs}" if args.runs > 1 else "")
                          + (f"  probe: step {probe['step_ms']:.2f} ms, read {probe['read_gb_s']:.0f} GB/s" if probe else ""), flush=True)
            for mode, _ in modes:
                if not runs[mode]:
                    continue
                v = verdict(runs[mode], args.max_lag_ms)
                report["tasks"][task][mode]["levels"].append(v)
                if args.runs > 1:
                    print(f"{task:13s} {mode:14s} N={lv:5d}  p99 <= {args.max_lag_ms:.0f} ms in {v['held_runs']} of {v['runs']} runs "
                          f"(p99 {', '.join(f'{x:.0f}' for x in v['p99_ms'])} ms): {'held' if v['held'] else 'not held'}", flush=True)
                misses[mode] = 0 if v["held"] else misses[mode] + 1
            if all(n >= 2 for n in misses.values()):
                break
        for mode, _ in modes:
            report["tasks"][task][mode]["held"] = held(report["tasks"][task][mode]["levels"])
        h = {m: report["tasks"][task][m]["held"] for m, _ in modes}
        ratio = f", {h['engine'] / h['one-at-a-time']:.1f}x the baseline" if len(h) == 2 and h["one-at-a-time"] else ""
        runs_said = f" in more than half of {args.runs} runs" if args.runs > 1 else ""
        print(f"{task}: sessions held at p99 lag <= {args.max_lag_ms:.0f} ms{runs_said}: " + ", ".join(f"{m} {v}" for m, v in h.items()) + ratio)
    if engines is not None:
        engines.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
