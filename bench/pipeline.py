"""Streaming pipeline speed at the public model sizes (random weights, real espeak-ng speech).

mHuBERT base cut at layer 11 + k-means 1000 x 768, Unit mBART large (12+12 layers, d=1024) and the
default CodeHiFiGAN (512 channels). Per task and chunk size: compute per stage per second of input,
the real-time factor, and first-audio latency. Compute per second of input is what decides how
many live sessions one device serves.

    python bench/pipeline.py [--device cuda] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from streamgen.io.files import read_audio
from streamgen.io.memory import MemorySink, MemorySource, chunks_of
from streamgen.pipeline.runner import Pipeline, build_engine
from streamgen.testing import public_size_bundle
from streamgen.pipeline.stats import Stats

TEXT = ("Good morning everyone. Today we are going to talk about the weather, the trains that run late, "
        "and what all of it means for the weekend ahead of us.")


def speech(seconds: float) -> torch.Tensor:
    with tempfile.TemporaryDirectory() as d:
        wav = Path(d) / "s.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(wav), TEXT], check=True)
        x = read_audio(wav, 16000)
    reps = int(seconds * 16000 // len(x)) + 1
    return torch.cat([x] * reps)[: int(seconds * 16000)]


def run(bundle, wave, task, options, chunk_ms) -> dict:
    stats, sink = Stats(16000), MemorySink()
    engine = build_engine(bundle, task, options, chunk_ms=chunk_ms)
    t = time.perf_counter()
    asyncio.run(Pipeline(MemorySource(chunks_of("s", wave, 16000 * chunk_ms // 1000)), engine, sink, stats).run())
    wall = time.perf_counter() - t
    st = stats.sessions["s"]
    secs = len(wave) / 16000
    return {"per_stage": {k: 1000 * v / secs for k, v in st.compute.items()}, "rtf": sum(st.compute.values()) / secs,
            "wall_s": wall, "output_s": sum(n for *_, n in st.outputs) / 16000}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    device = torch.device(args.device)
    what = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# pipeline benchmark: {what}, fp32, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    bundle, wave = public_size_bundle().to(device), speech(args.seconds)
    print(f"{args.seconds:.0f} s of input; compute per stage in ms per second of input (stage / input = load)")
    print("| task | chunk (ms) | chunker | encoder | generator | vocoder | RTF | output (s) |\n|---|---|---|---|---|---|---|---|")
    cases = [("resynthesis", {}, 320), ("resynthesis", {}, 640),
             ("continuation", {"max_units": 150, "min_units": 150}, 320)]  # a random decoder would stop at once otherwise
    for task, options, ms in cases:
        r = run(bundle, wave, task, options, ms)
        s = r["per_stage"]
        print(f"| {task} | {ms} | {s.get('chunker', 0):.1f} | {s.get('encoder', 0):.1f} | {s.get('generator', 0):.1f} | "
              f"{s.get('vocoder', 0):.1f} | {r['rtf']:.3f} | {r['output_s']:.2f} |")


if __name__ == "__main__":
    main()
