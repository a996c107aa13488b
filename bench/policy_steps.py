"""What a simultaneous translation policy costs the speech LM: decoder steps per decision.

Runs each policy over the first N utterances of a manifest through the engine (unpaced input, one
session at a time), counting the decodes the policy asks for, the decoder row-steps they take (one
unit, or the end, for one session), and the units it commits. Steps are what a live session's
decisions wait on and what the engine's batched steps are made of, so a policy with fewer steps per
committed unit holds more sessions (bench/sessions.py measures how many). Also timed, one session
alone: a decision's source work (a fresh decode's source encode + prefill of the committed units, or
on a streaming backbone a resumed decode's new source units alone), and each decoder step.

    OMP_NUM_THREADS=1 python bench/policy_steps.py --manifest es2en_test_src.tsv --limit 20 --policies policy=wait-k
    OMP_NUM_THREADS=1 python bench/policy_steps.py --bundle OLD ... \
        --policies policy=local-agreement policy=local-agreement:lookahead=24 policy=wait-k:k=30

(local agreement and other k run on a backbone that does not stream, e.g. the bundle shipped before
`856502e`; the shipped one streams under wait-k 30 and refuses them.)
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import torch

from streamgen.bundle import load_bundle
from streamgen.io.files import read_audio
from streamgen.io.memory import MemorySink, MemorySource, chunks_of
from streamgen.models.generation import Decoder
from streamgen.options import UsageError, parse_kv
from streamgen.pipeline.runner import Pipeline, build_engine
from streamgen.pipeline.stats import Stats
from streamgen.train.synth import read_manifest


class Counts:
    def __init__(self):
        self.decodes = self.steps = self.units = self.advances = 0
        self.admit_s = self.advance_s = 0.0  # the decisions' source work (see the module doc), and the steps


def count_steps(counts: Counts):
    """Wrap the Decoder to count decodes and row-steps and time its two kinds of call (a bench: for good)."""
    submit, step, admit, resume, advance = Decoder.submit, Decoder.step, Decoder._admit, Decoder._resume, Decoder._advance

    def counted_submit(self, key, request):
        counts.decodes += 1
        return submit(self, key, request)

    def counted_step(self):
        out = step(self)
        counts.steps += len(out)
        return out

    def timed(f, field):
        def call(self):
            t = time.perf_counter()
            out = f(self)
            setattr(counts, field, getattr(counts, field) + time.perf_counter() - t)
            counts.advances += field == "advance_s"
            return out
        return call

    Decoder.submit, Decoder.step = counted_submit, counted_step
    Decoder._admit, Decoder._resume, Decoder._advance = timed(admit, "admit_s"), timed(resume, "admit_s"), timed(advance, "advance_s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--manifest", required=True, help="translation source manifest (id, audio, ...)")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--chunk-ms", type=int, default=320)
    ap.add_argument("--policies", nargs="+", default=["policy=wait-k"],
                    help="translation options per run, KEY=VALUE pairs joined by colons")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bundle = load_bundle(args.bundle)
    manifest = Path(args.manifest)
    rows = read_manifest(manifest)[: args.limit]
    counts = Counts()
    count_steps(counts)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {len(rows)} utterances of {manifest.name}, {args.chunk_ms} ms chunks")
    print("| options | decodes | decoder steps | steps per decode | units committed | steps per unit | ms of source work per decode | ms per step |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.policies:
        try:
            opts = parse_kv(spec.split(":"), flag="--policies")
        except UsageError as e:
            raise SystemExit(str(e)) from None
        counts.__init__()
        for row in rows:
            try:
                engine = build_engine(bundle, "translation", opts, chunk_ms=args.chunk_ms)
            except ValueError as e:  # e.g. local agreement on a backbone that streams
                raise SystemExit(f"--policies {spec}: {e}") from None
            engine.on_commit = lambda _, units: setattr(counts, "units", counts.units + len(units))
            wave = read_audio(manifest.parent / row["audio"], bundle.sample_rate)
            source = MemorySource(chunks_of(row["id"], wave, bundle.sample_rate * args.chunk_ms // 1000))
            asyncio.run(Pipeline(source, engine, MemorySink(), Stats(bundle.sample_rate)).run())
        c = counts
        print(f"| {spec} | {c.decodes} | {c.steps} | {c.steps / max(c.decodes, 1):.1f} | {c.units} | "
              f"{c.steps / max(c.units, 1):.2f} | {1000 * c.admit_s / max(c.decodes, 1):.1f} | "
              f"{1000 * c.advance_s / max(c.advances, 1):.2f} |", flush=True)


if __name__ == "__main__":
    main()
