"""What one batched step of the streaming vocoders costs as the number of streams grows: the CodeHiFiGAN
generator on streams (`StreamingGenerator`, the public checkpoints' vocoder) and the source-filter vocoder's
parameter network (`StreamingParams`, the shipped bundle's), N streams in steady state each given a ragged
piece of new frames per step (12-20 frames: about 320 ms of speech), as the engine's vocoder stage calls them.

Per N: the step's time (median, and per stream), the operators it dispatches (each a kernel launch on a GPU)
and the values it reads back from the device (each a host synchronisation on a GPU; on a GPU the column counts
every synchronisation CUDA reports, a blocking copy to the device included). On CUDA the CodeHiFiGAN's steps in
which no stream ends are static and, once a shape has been met twice, replayed as a CUDA graph: its operators
then launch as one and the column counts those outside it (`--no-cuda-graphs`: every one eager). On a GPU a step is bound
by launches and synchronisations long before it is bound by arithmetic, so the counts say what a CPU's clock
cannot: a step whose operators grow with N, or that reads counts back per layer, stalls a GPU however fast it
computes. Every figure comes from this run.

    OMP_NUM_THREADS=1 python bench/streaming_vocoder.py                    # tiny CodeHiFiGAN + the shipped bundle's
    python bench/streaming_vocoder.py --device cuda --sizes public --levels 16,64,256,1024 --dtypes float32,bfloat16

A CodeHiFiGAN's step runs in each of `--dtypes` (the engine's vocoder takes the bundle's dtype: bfloat16 in a GPU
service); the source-filter vocoder's streams compute in float64 whatever is asked, so it runs once.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from streamgen.models.streaming_conv import StreamingGenerator, StreamingParams
from streamgen.models.vocoder import CodeHiFiGAN, VocoderConfig
from streamgen.testing import TINY_VOCODER


class Counts(TorchDispatchMode):
    """Operators dispatched that compute (views, which launch nothing, left out) and values read back to
    the host while active."""

    READS = {"aten::_local_scalar_dense", "aten::equal"}

    def __init__(self):
        super().__init__()
        self.ops = self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
        self.ops += not view
        self.reads += func._schema.name in self.READS
        return func(*args, **(kwargs or {}))


def pieces(rng: random.Random, n: int, units: int) -> list[torch.Tensor]:
    """Each stream's new frames: 12-20 unit ids."""
    return [torch.tensor([rng.randrange(units) for _ in range(rng.randint(12, 20))]) for _ in range(n)]


def measure(graph, units: int, n: int, device, repeats: int) -> dict:
    rng = random.Random(n)
    streams = [graph.new_stream() for _ in range(n)]
    ended = [False] * n
    for _ in range(3):  # fill every layer's state: steady state
        graph.step(streams, pieces(rng, n, units), ended)
    steps = [pieces(rng, n, units) for _ in range(repeats + 1)]
    counts = Counts()
    with counts, warnings.catch_warnings(record=True) as syncs:
        warnings.simplefilter("always")
        if device.type == "cuda":  # every synchronisation with the device warns, whatever its cause
            torch.cuda.set_sync_debug_mode("warn")
        try:
            graph.step(streams, steps[0], ended)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    sync_warnings = sum("called a synchronizing CUDA operation" in str(w.message) for w in syncs)
    tolist = [0]
    original = torch.Tensor.tolist

    def counted(self):
        tolist[0] += 1
        return original(self)

    times = []
    torch.Tensor.tolist = counted
    try:
        for p in steps[1:]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            graph.step(streams, p, ended)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    finally:
        torch.Tensor.tolist = original
    ms = statistics.median(times) * 1e3
    reads = sync_warnings if device.type == "cuda" else counts.reads + tolist[0] // len(times)
    return {"sessions": n, "ms": ms, "ms_per_session": ms / n, "ops": counts.ops, "reads": reads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="tiny,bundle", help="comma-separated: tiny (CodeHiFiGAN), public (CodeHiFiGAN), bundle (the shipped source-filter vocoder)")
    ap.add_argument("--levels", default="1,4,16,64,256")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-cuda-graphs", action="store_true", help="on CUDA, the CodeHiFiGAN's steps eager (not replayed as graphs)")
    ap.add_argument("--dtypes", default="float32", help="comma-separated: the CodeHiFiGAN's weights in each (float32, bfloat16, float16)")
    args = ap.parse_args()
    dtypes = [getattr(torch, name, None) for name in args.dtypes.split(",")]
    if not all(isinstance(d, torch.dtype) and d.is_floating_point for d in dtypes):
        ap.error(f"--dtypes takes floating-point torch dtypes (float32, bfloat16, float16), got {args.dtypes!r}")
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, device {device}, torch threads {torch.get_num_threads()}")
    print("| vocoder | dtype | streams | step (ms) | per stream (ms) | operators per step | "
          + ("synchronisations" if device.type == "cuda" else "host reads") + " per step |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        for dtype in dtypes if size != "bundle" else [torch.float64]:
            if size == "bundle":
                from streamgen.bundle import load_bundle
                voc = load_bundle(device=device).unit_vocoder
                graph, units = StreamingParams(voc), voc.cfg.num_units
            else:
                cfg = TINY_VOCODER if size == "tiny" else VocoderConfig()
                voc = CodeHiFiGAN(cfg).to(device=device, dtype=dtype).eval()
                graph, units = StreamingGenerator(voc, graphs=not args.no_cuda_graphs), cfg.num_embeddings
            for n in [int(x) for x in args.levels.split(",")]:
                r = measure(graph, units, n, device, args.repeats)
                print(f"| {size} | {str(dtype).removeprefix('torch.')} | {n} | {r['ms']:.2f} | {r['ms_per_session']:.3f} | {r['ops']} "
                      f"| {r['reads']} |", flush=True)


if __name__ == "__main__":
    main()
