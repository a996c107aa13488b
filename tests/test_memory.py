"""Freed memory goes back to the system: a service's RSS must not keep what its ticks freed.

Measured with tests/memory_rounds.py (rounds of 8 short sessions through one engine of the shipped
bundle, RSS after each round, MiB): without trimming 575, 575, 817, 815, 1068; with it 405, 405,
430, 430, 430."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from speech import espeak

from streamgen.io.memory import MemorySink, MemorySource, chunks_of
from streamgen.pipeline.runner import Pipeline, build_engine
from streamgen.pipeline.stats import Stats


def test_an_engine_serving_round_after_round_keeps_its_memory_flat():
    script = Path(__file__).with_name("memory_rounds.py")
    out = subprocess.run([sys.executable, str(script), "10"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    rss = [float(x) for x in out.stdout.split()]
    assert len(rss) == 5 and max(rss) - rss[0] < 100, rss


def test_the_engine_trims_while_it_runs(test_bundle):
    engine = build_engine(test_bundle, "resynthesis", chunk_ms=100, trim_every_s=0.0)
    items = chunks_of("a", espeak("One two three."), 1600)
    asyncio.run(Pipeline(MemorySource(items), engine, MemorySink(), Stats(16000)).run())
    assert engine.trims >= engine.ticks > 0
