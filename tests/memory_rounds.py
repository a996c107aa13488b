"""Run by tests/test_memory.py in a fresh process: rounds of short resynthesis sessions through one
engine of the shipped bundle; prints the process's RSS (MiB) after each round."""

import asyncio
import sys
from importlib import resources

import torch

from streamgen.bundle import load_bundle
from streamgen.io.files import read_audio
from streamgen.io.memory import MemorySink, MemorySource, chunks_of
from streamgen.pipeline.runner import Pipeline, build_engine
from streamgen.pipeline.stats import Stats


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def main(trim_every_s: float, rounds: int = 5, sessions: int = 8) -> None:
    torch.set_grad_enabled(False)
    bundle = load_bundle(None)
    wave = read_audio(str(resources.files("streamgen") / "assets" / "sample.wav"), bundle.sample_rate)[: 2 * bundle.sample_rate]
    stats = Stats(bundle.sample_rate, chunk_records=0)
    engine = build_engine(bundle, "resynthesis", chunk_ms=320, stats=stats, trim_every_s=trim_every_s)
    k = 0
    for _ in range(rounds):
        items, names = [], []
        for _ in range(sessions):
            items += chunks_of(f"s{k}", wave, 5120)
            names.append(f"s{k}")
            k += 1
        sink = MemorySink()
        asyncio.run(Pipeline(MemorySource(items), engine, sink, stats).run())
        assert not sink.errors and all(len(sink.wave(n)) > 0 for n in names), "a round was not served"
        print(f"{rss_mib():.1f}", flush=True)


if __name__ == "__main__":
    if sys.argv[2:] == ["--no-trim"]:  # what the engine did before it trimmed
        import streamgen.pipeline.engine as engine_module

        engine_module.release_freed_memory = lambda: False
    main(float(sys.argv[1]))
