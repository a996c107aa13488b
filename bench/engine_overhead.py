"""The engine's own work per session outside its model calls: N sessions of the bundled sample stepped on a
synchronous tick loop (every session gets its next 320 ms chunk each tick, no event loop), each stage's wall
time beside its model calls' (`Engine.compute`). What is left is per-session bookkeeping in Python: a small
share of a CPU tick, but on a GPU, where the model calls of a thousand sessions take milliseconds, it is what
a tick costs. A tick's whole time against the chunk's 320 ms says how many sessions one engine keeps up with
(below 1: every session's chunk is answered before the next one comes), without the pacing of a live run; the
loop runs in the main thread, so torch's profiler can record it on a GPU (`--profile`). Every figure comes from
this run.

    OMP_NUM_THREADS=1 python bench/engine_overhead.py [--task resynthesis] [--sessions 32,128]
    python bench/engine_overhead.py --device cuda --dtype bfloat16 --public-random --sessions 256,1024 --seconds 12 --warm 12
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import torch

import streamgen
from streamgen.io.files import read_audio
from streamgen.io.memory import chunks_of
from streamgen.pipeline.engine import build_engine
from sessions import load_models, talker_wave, task_options  # (bench/ is on the path when a bench script runs)

STAGES = ("_intake", "_encode", "_decide", "_decode", "_vocode")
CHUNK_MS = 320


def measure(bundle, task: str, n: int, wave, warm: int = 3, profile: str | None = None, **engine_kw) -> dict:
    engine = build_engine(bundle, *task_options(task), chunk_ms=CHUNK_MS, max_sessions=max(256, n), **engine_kw)
    engine.emit = lambda item: None
    items = [chunks_of(f"s{i}", wave.roll(997 * i), bundle.sample_rate * CHUNK_MS // 1000) for i in range(n)]
    for i in range(n):
        engine.open(f"s{i}", *task_options(task))
    cuda = bundle.device.type == "cuda"
    wall: collections.Counter = collections.Counter()
    for stage in STAGES:
        def timed(f=getattr(engine, stage), stage=stage):
            t = time.perf_counter()
            f()
            if cuda:  # (what a stage queued on the device is its time too)
                torch.cuda.synchronize()
            wall[stage] += time.perf_counter() - t
        setattr(engine, stage, timed)
    ticks = min(len(x) for x in items) - 1  # every session's chunks (its End left out)
    if ticks <= warm:
        raise SystemExit(f"{ticks} ticks of speech, {warm} of them warming up: give --seconds more")
    prof = None
    for r in range(ticks):
        for i in range(n):
            engine.sessions[f"s{i}"].inbox.append(items[i][r])
        if r == warm:
            wall.clear()
            compute0 = dict(engine.compute)
            if profile:
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                              + ([torch.profiler.ProfilerActivity.CUDA] if cuda else []))
                prof.__enter__()
        engine.tick()
    if prof is not None:
        prof.__exit__(None, None, None)
        with open(profile, "w") as f:
            for key in ("self_cpu_time_total",) + (("self_cuda_time_total",) if cuda else ()):
                f.write(f"## by {key}\n{prof.key_averages().table(sort_by=key, row_limit=40)}\n")
    timed_ticks = ticks - warm
    model = {k: v - compute0.get(k, 0.0) for k, v in engine.compute.items()}
    return {"ticks": timed_ticks, "wall_ms": {k: 1e3 * v / timed_ticks for k, v in wall.items()},
            "model_ms": {k: 1e3 * v / timed_ticks for k, v in model.items()},
            "rest_us_per_session": 1e6 * (sum(wall.values()) - sum(model.values())) / timed_ticks / n,
            "tick_per_chunk": sum(wall.values()) / timed_ticks / (CHUNK_MS / 1000)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="resynthesis", help="a task of bench/sessions.py's (its options there)")
    ap.add_argument("--sessions", default="32,128")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--public-random", action="store_true", help="random weights at the public model sizes, not the bundle")
    ap.add_argument("--vocoder-windows", action="store_true", help="a CodeHiFiGAN in exact windows, not streaming convolutions")
    ap.add_argument("--seconds", type=float, default=0, help="each session's speech: the sample repeated (0: the sample once)")
    ap.add_argument("--warm", type=int, default=3, help="ticks before the timed ones")
    ap.add_argument("--profile", metavar="PREFIX", help="write each level's operators under torch's profiler to PREFIX_N.txt")
    args = ap.parse_args()
    bundle = load_models(args.device, args.dtype, public_random=args.public_random)
    if args.seconds:
        wave = talker_wave(bundle.sample_rate, args.seconds)
    else:
        wave = read_audio(Path(streamgen.__file__).parent / "assets" / "sample.wav", bundle.sample_rate)
    kw = {"vocoder_lookahead": bundle.vocoder.frame_context()} if args.vocoder_windows else {}
    print(f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {args.task}, device {args.device} ({args.dtype}"
          f"{', public sizes, random weights' if args.public_random else ''}{', vocoder in exact windows' if kw else ''}), "
          f"the bundled sample ({len(wave) / bundle.sample_rate:.1f} s), {CHUNK_MS} ms chunks, a tick per chunk")
    for n in [int(x) for x in args.sessions.split(",")]:
        r = measure(bundle, args.task, n, wave, args.warm, args.profile and f"{args.profile}_{n}.txt", **kw)
        stages = ", ".join(f"{k.strip('_')} {v:.1f}" for k, v in r["wall_ms"].items())
        model = ", ".join(f"{k} {v:.1f}" for k, v in r["model_ms"].items())
        print(f"{n:4d} sessions, {r['ticks']} ticks: per tick (ms) {stages}; model calls {model}; "
              f"the rest {r['rest_us_per_session']:.0f} us per session per tick; a tick is {r['tick_per_chunk']:.2f}x "
              f"its {CHUNK_MS} ms chunk", flush=True)


if __name__ == "__main__":
    main()
