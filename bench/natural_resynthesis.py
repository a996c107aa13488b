"""Resynthesis of natural held-out sentences, each figure beside Whisper's WER on the original audio.

For every test manifest (the same sentences in the training voice and in voices no model heard):

    original          the test audio itself: what the recogniser gets right at best
    units->GL         log-mel units -> each unit's centroid log-mel -> Griffin-Lim (what the units keep,
                      through a crude inversion; needs no training beyond k-means)
    units->SF (true)  log-mel units with their true frame durations -> source-filter vocoder
    units->SF         de-duplicated units -> the vocoder's own durations -> source-filter vocoder (the chain's path)
    bundle            a streamgen bundle's encode -> vocode (today's default, for comparison)

    python bench/natural_resynthesis.py --encoder RUN/logmel_units --vocoder RUN/vocoder \
        --bundle streamgen/assets/default --test CORPUS/nat_test_joe.tsv CORPUS/nat_test_rms.tsv CORPUS/nat_test_espeak.tsv
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from streamgen.eval.asr import WhisperASR
from streamgen.eval.metrics import normalize, wer
from streamgen.io.files import read_audio, write_audio
from streamgen.models.logmel_units import LogMelUnits
from streamgen.train.source_filter import load_logmel_units, load_vocoder
from streamgen.train.synth import read_manifest


def griffin_lim(logmel: torch.Tensor, enc: LogMelUnits, iters: int = 64) -> torch.Tensor:
    """Log-mel frames [F, n_mels] at hop -> waveform, each frame held for two half-hops (75 % overlap)."""
    c = enc.cfg
    fb = enc.fb
    mag = torch.linalg.lstsq(fb.T @ fb + 1e-4 * torch.eye(fb.shape[1]), fb.T @ logmel.exp().T).solution.clamp(min=0)
    mag = mag.repeat_interleave(2, dim=1)
    hop, window = c.hop // 2, torch.hann_window(c.win)
    phase = torch.exp(2j * torch.pi * torch.rand(mag.shape, generator=torch.Generator().manual_seed(0)))
    for _ in range(iters):
        wave = torch.istft(mag * phase, c.win, hop, window=window)
        spec = torch.stft(wave, c.win, hop, window=window, return_complex=True)[:, : mag.shape[1]]
        phase = spec / spec.abs().clamp(min=1e-8)
    return torch.istft(mag * phase, c.win, hop, window=window)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--vocoder")
    ap.add_argument("--bundle")
    ap.add_argument("--test", nargs="+", required=True)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--no-gl", action="store_true")
    ap.add_argument("--save", help="write the resynthesised audio of the first utterances here")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    enc = load_logmel_units(args.encoder)
    voc = load_vocoder(args.vocoder) if args.vocoder else None
    bundle = None
    if args.bundle:
        from streamgen.bundle import load_bundle

        bundle = load_bundle(args.bundle)
    asr = WhisperASR()
    centroid_mel = enc.quantizer.centroids * enc.std + enc.mean
    results = {}
    for manifest in args.test:
        rows = read_manifest(manifest)[: args.limit or None]
        refs, hyps = [], {}
        for i, r in enumerate(rows):
            wave = read_audio(Path(manifest).parent / r["audio"], enc.cfg.sample_rate)
            refs.append(normalize(r["text"]))
            outs = {"original": wave}
            with torch.no_grad():
                frames = enc(wave)
                if not args.no_gl:
                    outs["units->GL"] = griffin_lim(centroid_mel[frames], enc)
                if voc is not None:
                    outs["units->SF (true durations)"] = voc.generate(frames)
                    outs["units->SF"] = voc(enc.encode(wave)[0])
                if bundle is not None:
                    outs["bundle"] = bundle.vocode(bundle.encode(wave)[0])
            for name, w in outs.items():
                hyps.setdefault(name, []).append(normalize(asr.transcribe(w.numpy())))
                if args.save and i < 3:
                    Path(args.save).mkdir(parents=True, exist_ok=True)
                    write_audio(Path(args.save) / f"{Path(manifest).stem}_{r['id']}_{name.replace('>', '').replace(' ', '_')}.wav", w, 16000)
        results[Path(manifest).stem] = {name: round(wer(refs, h), 4) for name, h in hyps.items()}
        print(Path(manifest).stem, len(rows), json.dumps(results[Path(manifest).stem]), flush=True)
        for ref, h in list(zip(refs, hyps.get("units->SF", hyps["original"])))[:4]:
            print(f"   {ref}  |  {h}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
