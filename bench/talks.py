"""Talks: a translation test set's utterances run together, `--per-talk` at a time in order, their audio
concatenated as it is (no pause added: each file's own trailing silence is the pause) and their reference texts
joined. A live translation that says only a talk's first sentence scores low here, whatever it scores on the
single sentences (bench/QUALITY.md, "Sentences run together").

    python bench/talks.py --src es2en_test_src.tsv --tgt es2en_test_tgt.tsv --per-talk 4 --out talks/
    streamgen eval --task translation --manifest talks/talks_src.tsv --references talks/talks_tgt.tsv --chunk-ms 320 --no-realtime
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import soundfile as sf

from streamgen.train.synth import read_manifest, write_manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="the source-language manifest (id, audio, text)")
    ap.add_argument("--tgt", required=True, help="the target-language manifest of the same ids (the references)")
    ap.add_argument("--per-talk", type=int, default=4)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    (args.out / "audio").mkdir(parents=True, exist_ok=True)
    for side, manifest in (("src", Path(args.src)), ("tgt", Path(args.tgt))):
        rows, talks = read_manifest(manifest), []
        for t in range(len(rows) // args.per_talk):
            group = rows[t * args.per_talk : (t + 1) * args.per_talk]
            waves, rates = zip(*(sf.read(manifest.parent / r["audio"], dtype="float32") for r in group))
            if len(set(rates)) != 1:
                raise SystemExit(f"{manifest}: talk {t} mixes sample rates {sorted(set(rates))}")
            wave = np.concatenate(waves)
            name = f"audio/talk{t:03d}_{side}.flac"
            sf.write(args.out / name, wave, rates[0])
            talks.append({"id": f"talk{t:03d}", "audio": name, "n_frames": str(len(wave)), "text": " ".join(r["text"] for r in group)})
        write_manifest(args.out / f"talks_{side}.tsv", talks)
        print(f"{args.out / f'talks_{side}.tsv'}: {len(talks)} talks of {args.per_talk}")


if __name__ == "__main__":
    main()
