"""Units from a phone recogniser trained on real speech: do they survive a voice never trained on?
(issue 12, item 2; bench/QUALITY.md "Units from a phone recogniser trained on real speech")

Every unit candidate measured so far (log-mel k-means, normalised log-mel, phone targets from the TTS
engines' alignments, a second HuBERT iteration, a classifier onto the training voice's units) learnt its
notion of a sound from five to eight synthetic voices, and none brought the unseen voices near 0.45.
`hama` (Apache-2.0, REFERENCE.md) ships a waveform -> IPA phone CTC recogniser whose output frames are
320 samples at 16 kHz, this project's unit hop; `streamgen.models.phone_recogniser` runs it in torch.
Here each 20 ms frame's phone posteriors (the blank dropped and the rest renormalised, square-rooted so
that Euclidean k-means compares them by the Hellinger distance) are clustered on the training voice's
speech, a source-filter vocoder is trained on those units exactly as the shipped one was (recipes/natural.sh
step 3), and resynthesis is scored as QUALITY.md's rows are: units in the talker's timing -> vocoder ->
Whisper tiny.en, 40 natural test sentences per voice, beside the original audio and the shipped bundle's own units and vocoder. With
`--logmel-weight W`, the units are k-means of the posteriors and, beside them, the voice's per-utterance
normalised log-mel scaled to W times their norm.

    pip install hama==1.7.0          # its weight package (a dev dependency, as the port's oracle)
    python bench/phone_posterior_units.py features --manifest R/corpus/nat_train.tsv --out RUN/train.pt
    python bench/phone_posterior_units.py fit --features RUN/train.pt --units 500 --out RUN/units500.pt
    python bench/phone_posterior_units.py prepare --manifest R/corpus/nat_train.tsv --codebook RUN/units500.pt --out RUN/voc_data500.pt
    python -m streamgen.train.source_filter train --data RUN/voc_data500.pt --out RUN/sf500 --steps 4000 --batch-size 8 --segment 32 --units 500
    python bench/phone_posterior_units.py score --corpus R/corpus --codebook RUN/units500.pt --vocoder RUN/sf500 --json RUN/score500.json
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch

from streamgen.models.logmel_units import LogMelUnits, LogMelUnitsConfig
from streamgen.models.phone_recogniser import PhoneRecogniser, posterior_features

RATE, HOP = 16000, 320


def recogniser(weights: Path | None = None) -> PhoneRecogniser:
    """hama's phone recogniser in torch (`streamgen.models.phone_recogniser`), from `weights` or the
    `asr_waveform.hama` that the installed hama package ships."""
    if weights is None:
        try:
            import hama
        except ImportError as e:
            raise SystemExit(f"hama is not installed ({e}): pip install hama==1.7.0, or give --weights asr_waveform.hama") from None
        weights = Path(hama.__file__).parent / "assets" / "asr_waveform.hama"
    return PhoneRecogniser.from_hamapk(weights)


def log_posteriors(model: PhoneRecogniser, wave: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(wave)


@functools.cache
def logmel() -> LogMelUnits:
    return LogMelUnits(LogMelUnitsConfig())


def normalised_logmel(wave: torch.Tensor) -> torch.Tensor:
    """The log-mel of the bundle's unit encoder, less its per-utterance mean, over its standard deviation
    (what a voice's own timbre leaves after the speaker normalisation of QUALITY.md's comparison)."""
    x = logmel().features(wave)
    return (x - x.mean(0)) / x.std(0).clamp_min(1e-3)


def unit_features(log_probs: torch.Tensor, logmel: torch.Tensor, codebook: dict) -> torch.Tensor:
    """Posterior features, and with a log-mel weight w > 0 beside them the normalised log-mel scaled to
    w times their norm (both are about 20 ms frames; the log-mel's are 10 ms later)."""
    x = posterior_features(log_probs, codebook["blank"])
    w = codebook.get("logmel_weight", 0.0)
    if not w:
        return x
    n = min(len(x), len(logmel))
    return torch.cat([x[:n], w * logmel[:n].float() / logmel.shape[1] ** 0.5], dim=1)


def features(manifests: list[str], out: Path, weights: Path | None) -> None:
    from streamgen.io.files import read_audio
    from streamgen.train.synth import read_manifest

    model = recogniser(weights)
    rows = [(Path(m).parent, r) for m in manifests for r in read_manifest(m)]
    data, logmel = {}, {}
    for i, (root, r) in enumerate(rows):
        wave = read_audio(root / r["audio"], RATE)
        data[r["id"]] = log_posteriors(model, wave).half()
        logmel[r["id"]] = normalised_logmel(wave).half()
        if i % 100 == 0:
            print(f"features {i}/{len(rows)}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"blank": model.blank, "log_probs": data, "logmel": logmel}, out)


def fit(features_path: Path, units: int, out: Path, logmel_weight: float = 0.0, max_frames: int = 200_000) -> None:
    from streamgen.train.units import kmeans

    f = torch.load(features_path)
    codebook = {"blank": f["blank"], "logmel_weight": logmel_weight}
    x = torch.cat([unit_features(lp, f["logmel"][k], codebook) for k, lp in f["log_probs"].items()])
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:max_frames]]
    torch.save(codebook | {"centroids": kmeans(x, units, iters=30, seed=0)}, out)
    print(f"{units} units from {len(x)} frames", flush=True)


def assign(log_probs: torch.Tensor, logmel: torch.Tensor, codebook: dict) -> torch.Tensor:
    x = unit_features(log_probs, logmel, codebook)
    return torch.cdist(x, codebook["centroids"]).argmin(1)


def prepare(manifests: list[str], codebook_path: Path, out: Path, weights: Path | None) -> None:
    """The vocoder's training data, written by `streamgen.train.source_filter.prepare` with these units."""
    from streamgen.train.source_filter import prepare as vocoder_data

    model, codebook = recogniser(weights), torch.load(codebook_path)
    vocoder_data(manifests, lambda wave: assign(log_posteriors(model, wave), normalised_logmel(wave), codebook), out, hop=HOP)


def score(corpus: Path, codebook_path: Path, vocoder_path: Path, voices: list[str], json_path: Path | None, weights: Path | None) -> None:
    from streamgen import load_bundle
    from streamgen.eval.asr import WhisperASR
    from streamgen.eval.metrics import wer
    from streamgen.io.files import read_audio
    from streamgen.models.kmeans import dedup
    from streamgen.train.source_filter import load_vocoder
    from streamgen.train.synth import read_manifest

    model, asr, bundle = recogniser(weights), WhisperASR(), load_bundle(None)
    codebook, vocoder = torch.load(codebook_path), load_vocoder(vocoder_path)
    hear = lambda wave: asr.transcribe(wave.numpy())

    def speak(units: torch.Tensor) -> torch.Tensor:  # one unit per frame: the talker's timing
        with torch.no_grad():
            return vocoder.generate(units).float().reshape(-1)

    results = {}
    for v in voices:
        manifest = corpus / f"nat_test_{v}.tsv"
        refs, original, shipped, posterior = [], [], [], []
        for r in read_manifest(manifest):
            wave = read_audio(manifest.parent / r["audio"], RATE)
            refs.append(r["text"])
            original.append(hear(wave))
            shipped.append(hear(bundle.vocode(*dedup(bundle.logmel_units.units_of(bundle.logmel_units.features(wave))))))
            posterior.append(hear(speak(assign(log_posteriors(model, wave), normalised_logmel(wave), codebook))))
        results[v] = {"original": round(wer(refs, original), 3), "shipped units and vocoder": round(wer(refs, shipped), 3),
                      "phone-posterior units": round(wer(refs, posterior), 3)}
        print(v, results[v], flush=True)
    if json_path:
        json_path.write_text(json.dumps(results, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=["features", "fit", "prepare", "score"])
    ap.add_argument("--manifest", nargs="+", default=[])
    ap.add_argument("--features", type=Path)
    ap.add_argument("--units", type=int, default=500)
    ap.add_argument("--logmel-weight", type=float, default=0.0, help="fit: the normalised log-mel beside the posteriors, at this weight (0: none)")
    ap.add_argument("--codebook", type=Path)
    ap.add_argument("--vocoder", type=Path)
    ap.add_argument("--corpus", type=Path)
    ap.add_argument("--voices", nargs="+", default=["joe", "rms", "espeak"])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--weights", type=Path, help="hama's asr_waveform.hama (default: the installed hama package's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.stage == "features":
        features(args.manifest, args.out, args.weights)
    elif args.stage == "fit":
        fit(args.features, args.units, args.out, args.logmel_weight)
    elif args.stage == "prepare":
        prepare(args.manifest, args.codebook, args.out, args.weights)
    else:
        score(args.corpus, args.codebook, args.vocoder, args.voices, args.json, args.weights)


if __name__ == "__main__":
    main()
