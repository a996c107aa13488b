"""The shapes a GPU would plan, counted on a CPU. cuDNN plans every new shape of a convolution or an attention
call on the host (2.3 and 5.4 ms a call on the H200 of 2026-11-29, where every step was a new shape), so a
live engine whose calls change shape tick by tick is bound by planning, whatever its GPU. This runs N live
talkers at a time through the engine (each says 3-10 s, another takes the place of one who ends, chunks
jittered by a tick as through a network) on the tiny random bundle (the public models' architecture:
HuBERT + k-means, Unit mBART, CodeHiFiGAN), first with each call's exact shapes, then with the shapes a GPU
uses (`streamgen.models.shapes.gpu_shapes`: rows and widths on a grid; the decoder takes its GPU path in both),
and counts the convolution and attention calls a tick, the distinct shapes seen by the end of each third of
the run, and the new shapes a tick in its last third (each a planning stall on a GPU; a grid that bounds the
shapes makes them die out).
Every figure comes from this run.

    OMP_NUM_THREADS=1 python bench/shapes.py [--sessions 16,64] [--tasks resynthesis,translation] [--ticks 90]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import streamgen
from streamgen.io.files import read_audio
from streamgen.io.memory import chunks_of
from streamgen.models.shapes import gpu_shapes
from streamgen.models.unit_mbart import EOS
from streamgen.pipeline.engine import build_engine
from streamgen.testing import random_bundle

PLANNED = {torch.conv1d: "conv", F.conv1d: "conv", torch.conv_transpose1d: "conv", F.conv_transpose1d: "conv",
           F.scaled_dot_product_attention: "attention"}


class Shapes(TorchFunctionMode):
    """Every convolution and attention call while active: its kind and the shapes of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = PLANNED.get(func)
        if kind is not None:
            tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
            self.calls.append((kind, *(tuple(t.shape) for t in tensors)))
        return func(*args, **(kwargs or {}))


def run(bundle, task: str, n: int, wave: torch.Tensor, ticks: int, chunk_ms: int = 320, seed: int = 0) -> list[list[tuple]]:
    """n talkers at a time for `ticks` ticks: each says 3-10 s of `wave` (looped, from a random point), the first
    ones starting over four ticks, and as one ends another takes its place; a chunk reaches the engine in the
    tick it is due with probability 0.7, else with the next one that comes (as through a network), so the
    sessions ready in a tick and their lengths vary as in a live run. The conv and attention calls of each tick."""
    rng = random.Random(seed)
    engine = build_engine(bundle, task, chunk_ms=chunk_ms)
    engine.emit = lambda item: None
    # the decoder's GPU path in both modes: static steps of a power of two of rows (CUDA graphs there, eager here),
    # and for rows of mixed prompts one masked step of a block of rows (a CPU's own path attends row by row)
    engine.graphs = True
    decoder_for = engine.decoder_for

    def gpu_decoder(task: str):
        decoder = decoder_for(task)
        decoder.masked_steps = True
        return decoder

    engine.decoder_for = gpu_decoder
    block, sr = bundle.sample_rate * chunk_ms // 1000, bundle.sample_rate
    looped = wave.repeat(-(-10 * sr // len(wave)) + 1)
    made = 0

    def talker(start: int) -> dict:
        nonlocal made
        made += 1
        a, seconds = rng.randrange(len(wave)), rng.uniform(3.0, 10.0)
        name = f"s{made}"
        return {"name": name, "items": chunks_of(name, looped[a : a + int(seconds * sr)], block), "start": start, "sent": 0}

    talkers = [talker(rng.randrange(4)) for _ in range(n)]
    calls: list[list[tuple]] = []
    for t in range(ticks):
        for i, k in enumerate(talkers):
            due = min(len(k["items"]), t - k["start"] + 1)
            if due <= k["sent"] or (rng.random() > 0.7 and due < len(k["items"])):
                continue
            if k["sent"] == 0:
                engine.open(k["name"], task)
            for item in k["items"][k["sent"] : due]:
                engine.sessions[k["name"]].inbox.append(item)
            k["sent"] = due
            if due == len(k["items"]):  # its End is sent: the next talker starts next tick
                talkers[i] = talker(t + 1)
        with Shapes() as seen:
            engine.tick()
        calls.append(seen.calls)
    return calls


def summary(ticks: list[list[tuple]]) -> dict:
    """Distinct shapes seen by each third of the run, and the new ones per tick in its last third (steady state:
    the sessions come and go at the same rate throughout)."""
    seen: set = set()
    new = []
    for calls in ticks:
        fresh = {c for c in calls if c not in seen}
        new.append(len(fresh))
        seen |= fresh
    third = len(ticks) // 3
    by = [sum(new[: (i + 1) * third]) for i in range(2)] + [len(seen)]
    kinds = {k: len({c for c in seen if c[0] == k}) for k in ("conv", "attention")}
    return {"calls": sum(map(len, ticks)) / len(ticks), "by_third": by, **kinds,
            "late": sum(new[2 * third :]) / (len(ticks) - 2 * third)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", default="16,64")
    ap.add_argument("--tasks", default="resynthesis,translation")
    ap.add_argument("--ticks", type=int, default=90, help="ticks per run (320 ms of speech each)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    bundle = random_bundle()
    with torch.no_grad():  # an untrained decoder ends at once; a zero </s> embedding keeps it talking (as bench/sessions.py)
        bundle.mbart.embed_tokens.weight[EOS].zero_()
    wave = read_audio(Path(streamgen.__file__).parent / "assets" / "sample.wav", bundle.sample_rate)
    print(f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, torch {torch.__version__}, the tiny random bundle "
          f"(HuBERT + k-means, Unit mBART, CodeHiFiGAN), {args.ticks} ticks of 320 ms chunks, N talkers at a time saying "
          "3-10 s of the bundled sample each, chunks jittered by a tick\n")
    print("| task | sessions | shapes | conv + attention calls a tick | distinct shapes by the end of each third of the run "
          "(conv, attention) | new shapes a tick in the last third |")
    print("|---|---|---|---|---|---|")
    for task in args.tasks.split(","):
        for n in [int(x) for x in args.sessions.split(",")]:
            for label, ctx in (("exact", contextlib.nullcontext), ("GPU grid", gpu_shapes)):
                with ctx():
                    s = summary(run(bundle, task, n, wave, args.ticks))
                print(f"| {task} | {n} | {label} | {s['calls']:.0f} | {' / '.join(map(str, s['by_third']))} ({s['conv']}, "
                      f"{s['attention']}) | {s['late']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
