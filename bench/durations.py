"""The vocoder's predicted durations against the talker's, on natural test sentences, in one run.

Every task whose units come from the language model speaks de-duplicated units timed by the
vocoder's duration predictor; resynthesis can hold the talker's own timing. Per test manifest:

    true         each unit held for the frames the encoder gave it (resynthesis' `durations=source`)
    predicted    the vocoder's own durations, round(exp(d) - 1) per unit (what ships)
    cumulative   the same predictions rounded on their running sum, so lengths add up

with Whisper's WER on the original audio beside them, the length against the talker's, and how often
a predicted duration is the talker's exactly.

    OMP_NUM_THREADS=1 python bench/durations.py --test CORPUS/nat_test_joe.tsv [--bundle DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from streamgen import load_bundle
from streamgen.eval.asr import WhisperASR
from streamgen.eval.metrics import normalize, wer
from streamgen.io.files import read_audio
from streamgen.train.synth import read_manifest


def cumulative(frames: torch.Tensor) -> torch.Tensor:
    """Real-valued frames per unit -> integers (at least 1) whose running sum follows theirs."""
    out, total, emitted = [], 0.0, 0
    for f in frames.tolist():
        total += f
        d = max(1, round(total) - emitted)
        emitted += d
        out.append(d)
    return torch.tensor(out)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--test", nargs="+", required=True)
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    b = load_bundle(args.bundle)
    voc, asr = b.unit_vocoder.float(), WhisperASR()
    results = {}
    for manifest in args.test:
        rows = read_manifest(manifest)
        refs, heard = [], {k: [] for k in ("original", "true", "predicted", "cumulative")}
        frames = {k: 0 for k in heard}
        exact = units = ones = 0
        for r in rows:
            wave = read_audio(Path(manifest).parent / r["audio"], b.sample_rate)
            u, d = b.encode(wave)
            pred = voc.durations(u)
            real = (torch.exp(voc.dur_predictor(voc.dict(u[None]))[0]) - 1).clamp(min=1)
            timings = {"true": d, "predicted": pred, "cumulative": cumulative(real)}
            refs.append(normalize(r["text"]))
            heard["original"].append(normalize(asr.transcribe(wave.numpy())))
            frames["original"] += int(d.sum())
            for name, dur in timings.items():
                heard[name].append(normalize(asr.transcribe(b.vocode(u, dur).numpy())))
                frames[name] += int(dur.sum())
            exact += int((pred == d).sum())
            ones += int((d == 1).sum())
            units += len(d)
        name = Path(manifest).stem
        results[name] = {k: {"wer": round(wer(refs, h), 3), "length": round(frames[k] / frames["original"], 3)} for k, h in heard.items()}
        results[name]["predicted_exact"] = round(exact / units, 3)
        results[name]["one_frame_units"] = round(ones / units, 3)
        print(f"{name}: {len(rows)} sentences, {units} units, {ones / units:.1%} of them one frame long; "
              f"predicted durations equal the talker's for {exact / units:.1%}")
        print("| timing | WER | length / talker's |\n|---|---|---|")
        for k in heard:
            print(f"| {k} | {results[name][k]['wer']:.3f} | {results[name][k]['length']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
