"""What an engine keeps once a burst of sessions has ended: N sessions of the bundled sample (each rolled
differently, 320 ms chunks, all at once) through one Pipeline, then the process's resident memory before them,
once they have all ended (the engine idle, as a service between bursts) and at its peak, and the decoder pools
the engine still holds. Every figure comes from this run.

    OMP_NUM_THREADS=1 python bench/idle_memory.py [--task translation] [--sessions 32]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from pathlib import Path

import streamgen
from streamgen.bundle import load_bundle
from streamgen.io.files import read_audio
from streamgen.io.memory import MemorySink, MemorySource, chunks_of
from streamgen.pipeline.engine import build_engine
from streamgen.pipeline.runner import Pipeline
from streamgen.pipeline.stats import Stats


def rss_mb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="translation")
    ap.add_argument("--sessions", type=int, default=32)
    args = ap.parse_args()
    bundle = load_bundle()
    wave = read_audio(Path(streamgen.__file__).parent / "assets" / "sample.wav", bundle.sample_rate)
    engine = build_engine(bundle, args.task, chunk_ms=320)
    block = bundle.sample_rate * 320 // 1000
    talkers = [chunks_of(f"s{i}", wave.roll(997 * i), block) for i in range(args.sessions)]
    items = [talker[k] for k in range(max(map(len, talkers))) for talker in talkers if k < len(talker)]  # round-robin
    before = rss_mb()
    sink = MemorySink()
    asyncio.run(Pipeline(MemorySource(items), engine, sink, Stats(bundle.sample_rate)).run())
    pools = sum(d.pool is not None for d in engine.decoders.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {args.task}, {args.sessions} sessions of the bundled sample, "
          f"{len(sink.ended)} ended")
    print(f"RSS {before} MB before them, {rss_mb()} MB once they had all ended, peak {peak} MB; decoder pools kept: {pools}")


if __name__ == "__main__":
    main()
