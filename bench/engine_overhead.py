"""The engine's own work per session outside its model calls: N sessions of the bundled sample stepped on a
synchronous tick loop (every session gets its next 320 ms chunk each tick, no event loop), each stage's wall
time beside its model calls' (`Engine.compute`). What is left is per-session bookkeeping in Python: a small
share of a CPU tick, but on a GPU, where the model calls of a thousand sessions take milliseconds, it is what
a tick costs. Every figure comes from this run.

    OMP_NUM_THREADS=1 python bench/engine_overhead.py [--task resynthesis] [--sessions 32,128]
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import streamgen
from streamgen.bundle import load_bundle
from streamgen.io.files import read_audio
from streamgen.io.memory import chunks_of
from streamgen.pipeline.engine import build_engine

STAGES = ("_intake", "_encode", "_decide", "_decode", "_vocode")
WARM = 3  # ticks before the timed ones


def measure(bundle, task: str, n: int, wave) -> dict:
    engine = build_engine(bundle, task, chunk_ms=320)
    engine.emit = lambda item: None
    items = [chunks_of(f"s{i}", wave.roll(997 * i), bundle.sample_rate * 320 // 1000) for i in range(n)]
    for i in range(n):
        engine.open(f"s{i}", task)
    wall: collections.Counter = collections.Counter()
    for stage in STAGES:
        def timed(f=getattr(engine, stage), stage=stage):
            t = time.perf_counter()
            f()
            wall[stage] += time.perf_counter() - t
        setattr(engine, stage, timed)
    ticks = min(len(x) for x in items) - 1  # every session's chunks (its End left out)
    for r in range(ticks):
        for i in range(n):
            engine.sessions[f"s{i}"].inbox.append(items[i][r])
        if r == WARM:
            wall.clear()
            compute0 = dict(engine.compute)
        engine.tick()
    timed_ticks = ticks - WARM
    model = {k: v - compute0.get(k, 0.0) for k, v in engine.compute.items()}
    return {"ticks": timed_ticks, "wall_ms": {k: 1e3 * v / timed_ticks for k, v in wall.items()},
            "model_ms": {k: 1e3 * v / timed_ticks for k, v in model.items()},
            "rest_us_per_session": 1e6 * (sum(wall.values()) - sum(model.values())) / timed_ticks / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="resynthesis")
    ap.add_argument("--sessions", default="32,128")
    args = ap.parse_args()
    bundle = load_bundle()
    wave = read_audio(Path(streamgen.__file__).parent / "assets" / "sample.wav", bundle.sample_rate)
    print(f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {args.task}, the bundled sample, 320 ms chunks, a tick per chunk")
    for n in [int(x) for x in args.sessions.split(",")]:
        r = measure(bundle, args.task, n, wave)
        stages = ", ".join(f"{k.strip('_')} {v:.1f}" for k, v in r["wall_ms"].items())
        model = ", ".join(f"{k} {v:.1f}" for k, v in r["model_ms"].items())
        print(f"{n:4d} sessions, {r['ticks']} ticks: per tick (ms) {stages}; model calls {model}; "
              f"the rest {r['rest_us_per_session']:.0f} us per session per tick", flush=True)


if __name__ == "__main__":
    main()
