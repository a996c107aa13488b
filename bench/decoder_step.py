"""One incremental decoder step of a bundle's backbone at several batch sizes, for comparing bundles (e.g. a
shallow decoder against the shipped one, bench/RESULTS.md), as the engine steps on a CPU (`UnitMBart.step_rows`).
Each row's cache holds a 120-unit source and up to 120 generated units in a 512-slot pool (no growth while timed);
median of 5 runs of 20 steps, one thread.

A streaming backbone (wait-k) pays a second cost per live chunk besides its decoder steps: the chunk's new
source units go through the causal encoder and into every decoder layer's cross-attention keys and values
(`UnitMBart.extend_source`, what `Decoder` does when a stream resumes). `--chunk-units N` times that for N new
units per row (16: a 320 ms chunk at 50 units per second) on a 120-unit source, median of 5 runs of 4 chunks.

    python bench/decoder_step.py --bundle A --bundle B [--task translation] [--batches 1,8,16] [--chunk-units 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from streamgen import load_bundle
from streamgen.models.unit_mbart import units_to_source


def step_ms(model, batch: int) -> float:
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, model.cfg.num_units, (batch, 120), generator=g)
    with torch.inference_mode():
        state = model.start(torch.stack([units_to_source(s) for s in src]), capacity=512)
        token, rows = torch.full((batch,), 2), list(range(batch))
        for _ in range(20):  # warm-up
            model.step_rows(state, rows, token)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(20):
                model.step_rows(state, rows, token)
            times.append((time.perf_counter() - t) / 20)
    return 1000 * statistics.median(times)


def chunk_ms(model, batch: int, units: int) -> float:
    g = torch.Generator().manual_seed(1)
    src = torch.randint(0, model.cfg.num_units, (batch, 120), generator=g)
    rows, counts = torch.arange(batch), torch.full((batch,), units)
    with torch.inference_mode():
        times = []
        for _ in range(6):  # the first is the warm-up
            state = model.start(torch.stack([units_to_source(s)[:-1] for s in src]), capacity=8)  # no </s>: the source goes on
            state.grow_source(120 + 4 * units)
            t = time.perf_counter()
            for _ in range(4):
                model.extend_source(state, rows, torch.randint(4, 4 + model.cfg.num_units, (batch, units), generator=g), counts)
            times.append((time.perf_counter() - t) / 4)
    return 1000 * statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", action="append", required=True, help="a bundle directory (repeat to compare)")
    ap.add_argument("--task", default="translation", help="whose backbone (the task's own, else the shared one)")
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--rounds", type=int, default=2, help="the bundles alternate this many times")
    ap.add_argument("--chunk-units", type=int, default=0, help="also time a stream's source growing by this many units (0: not)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    models = {b: load_bundle(b).backbone(args.task).float().eval() for b in args.bundle}
    batches = [int(x) for x in args.batches.split(",")]
    for r in range(args.rounds):
        for name, m in models.items():
            cells = ", ".join(f"batch {n}: {step_ms(m, n):.2f} ms" for n in batches)
            if args.chunk_units and m.cfg.streams:
                cells += "; source +%d units: " % args.chunk_units + ", ".join(f"batch {n}: {chunk_ms(m, n, args.chunk_units):.2f} ms" for n in batches)
            print(f"round {r + 1}  {name} ({len(m.decoder.layers)} decoder layers): {cells}", flush=True)


if __name__ == "__main__":
    main()
