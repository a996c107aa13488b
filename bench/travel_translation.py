"""Spanish -> English translation on the travel-domain test set (`streamgen/train/travel.py`), offline,
ASR-BLEU beside the recogniser on the original English audio.

Whole utterances, not the streaming pipeline (`streamgen eval` did not yet run a bundle whose vocoder is
the source-filter one when this was written). Rows, each scored by Whisper tiny.en against the English
reference text:

    original            the piper English audio of the reference (what the recogniser gets right at best)
    target units        its units -> the bundle's vocoder (the ceiling any translation on these units has)
    prompt              Spanish units -> the Unit mBART with the prompt (greedy) -> the bundle's vocoder
    model               with --mbart and no --prompt: Spanish units -> those weights (a train-prompt --full run)
    bundle              with neither: the bundle's own translation (its prompt, on the task's own backbone
                        where it has one)
    no prompt           the same without a prompt (the unprompted shared backbone; --no-prompt-row)

    python bench/travel_translation.py --bundle RUN/bundle_joe --prompt RUN/travel_prompt/best_prompt.safetensors \
        --pairs RUN/travel/tr_test.tsv --target RUN/travel/es2en_test_tgt.tsv --limit 100 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from streamgen.bundle import load_bundle
from streamgen.eval.asr import WhisperASR
from streamgen.eval.metrics import bleu, normalize, wer
from streamgen.io.files import read_audio
from streamgen.models.prompt import load_prompt
from streamgen.train.data import read_tsv
from streamgen.train.synth import read_manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--prompt", help="a prompt file (best_prompt.safetensors of a train-prompt run)")
    ap.add_argument("--mbart", help="Unit mBART weights replacing the bundle's (a train-prompt --full run)")
    ap.add_argument("--pairs", required=True, help="translation pairs TSV (streamgen data pairs --task translation)")
    ap.add_argument("--target", required=True, help="the English manifest of the same ids (original audio)")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--no-prompt-row", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    b = load_bundle(args.bundle)
    mbart = b.need("mbart")
    if args.mbart:
        from safetensors.torch import load_file

        mbart.load_state_dict(load_file(args.mbart))
    prompt = load_prompt(args.prompt, mbart.cfg) if args.prompt else None
    target = {r["id"]: r for r in read_manifest(args.target)}
    rows = read_tsv(args.pairs)[: args.limit or None]
    asr = WhisperASR()
    refs, hyps, examples = [], {}, []
    t0 = time.time()
    for r in rows:
        src = torch.tensor([int(u) for u in r["src_units"].split()])
        tgt = torch.tensor([int(u) for u in r["tgt_units"].split()])
        ref = target[r["id"]]["text"]
        refs.append(ref)
        max_units = min(2 * len(tgt) + 20, mbart.cfg.max_positions - 1)  # room to spare, bounded by the model
        outs = {"original": read_audio(Path(args.target).parent / target[r["id"]]["audio"], b.sample_rate),
                "target units": b.vocode(tgt)}
        if prompt is not None or args.mbart:
            outs["prompt" if prompt is not None else "model"] = b.vocode(b.generate(src, prompt, max_units=max_units))
        elif "translation" in b.prompts or "translation" in b.backbones:
            outs["bundle"] = b.vocode(b.generate(src, "translation", max_units=max_units))
        if args.no_prompt_row:
            outs["no prompt"] = b.vocode(b.generate(src, None, max_units=max_units))
        heard = {name: asr.transcribe(w.float().numpy()) if len(w) else "" for name, w in outs.items()}
        for name, h in heard.items():
            hyps.setdefault(name, []).append(h)
        if len(examples) < 6:
            examples.append({"source": r.get("src_text", ""), "reference": ref, **heard})
    results = {"n": len(rows), "seconds": round(time.time() - t0, 1),
               "asr_bleu": {name: round(bleu(refs, h), 2) for name, h in hyps.items()},
               "wer": {name: round(wer(refs, h), 4) for name, h in hyps.items()}, "examples": examples}
    print(json.dumps(results, indent=2, ensure_ascii=False))
    for e in examples:
        print(f"   {normalize(e['reference'])}  |  " + "  |  ".join(f"{k}: {normalize(v)}" for k, v in e.items()
                                                              if k not in ("source", "reference", "original")))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
