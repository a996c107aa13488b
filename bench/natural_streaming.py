"""The log-mel unit stream feeding the source-filter vocoder stream, against whole-utterance encode and
vocode, on a trained bundle: are the units equal, how far apart is the audio, and the real-time factor
of each stream on one thread.

    python bench/natural_streaming.py --bundle /work/runs/natural/bundle_joe --test CORPUS/nat_test_joe.tsv --limit 10
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from streamgen.bundle import load_bundle
from streamgen.io.files import read_audio
from streamgen.pipeline.streams import LogMelUnitStream, SourceFilterStream
from streamgen.train.synth import read_manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--chunk-ms", type=int, default=320)
    args = ap.parse_args()
    torch.set_num_threads(1)
    b = load_bundle(args.bundle)
    chunk = args.chunk_ms * b.sample_rate // 1000
    seconds = t_units = t_voc = max_diff = 0.0
    units_equal = True
    for r in read_manifest(args.test)[: args.limit]:
        wave = read_audio(Path(args.test).parent / r["audio"], b.sample_rate)
        seconds += len(wave) / b.sample_rate
        units, _ = b.encode(wave)
        whole = b.vocode(units)
        t0 = time.perf_counter()
        us = LogMelUnitStream(b.logmel_units)
        pieces = [us.push(wave[i : i + chunk])[0] for i in range(0, len(wave), chunk)] + [us.flush()[0]]
        t1 = time.perf_counter()
        vs = SourceFilterStream(b.source_filter)
        audio = torch.cat([vs.push(p) for p in pieces] + [vs.flush()])
        t2 = time.perf_counter()
        t_units, t_voc = t_units + t1 - t0, t_voc + t2 - t1
        units_equal &= torch.equal(torch.cat(pieces), units)
        if audio.shape != whole.shape:
            raise AssertionError(f"{r['id']}: streamed audio has {audio.numel()} samples, whole-utterance {whole.numel()}")
        max_diff = max(max_diff, float((audio - whole).abs().max()))
    print(f"{seconds:.1f} s of speech in {args.chunk_ms} ms chunks: units equal {units_equal}, audio max |diff| {max_diff:.2e}, "
          f"RTF units {t_units / seconds:.4f}, vocoder {t_voc / seconds:.4f}")


if __name__ == "__main__":
    main()
