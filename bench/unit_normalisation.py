"""Speaker-normalised log-mel units: does taking each utterance's mean log-mel out before k-means make
the units keep the phonetics of a voice the codebook never heard? (issue 12, item 2)

For each variant, k-means (K = 500) is fitted on the normalised log-mel of the training voice (piper
joe, `nat_train`; `+voices` adds flite awb, kal16 and slt from `nat_voices`), and every test sentence
is encoded and inverted the same way: each unit -> the mean *raw* log-mel of the joe training frames
that took it (what a vocoder trained on joe would learn to say) -> Griffin-Lim -> Whisper tiny.en.

    raw            log-mel as the shipped encoder uses it
    cmn            minus the utterance's mean log-mel (needs the whole utterance: not streamable)
    cmvn           the same, also divided by the utterance's standard deviation per band
    cmn_causalN    minus a running mean from the utterance's start, with a prior of N frames at the
                   training mean (streamable: frame i needs frames 0..i only; `LogMelUnits` with
                   cmn_prior_frames=N computes it)
    cmvn_causalN   the same, also divided by a running standard deviation (prior: the training
                   log-mel's second moment; `LogMelUnits` with cvn)
    X_lifterN      any of these, then only its first N cepstral coefficients (pitch harmonics out)
    X_stackN       any of these, each frame beside its N - 1 neighbours (N odd; (N - 1) / 2 frames of look-ahead)
    phones         the hidden layer of a frame phone classifier trained on the TTS engines' own alignments
                   in four training voices (`streamgen.train.phones`; --phone-net DIR), on cmvn_causal100
    phones_post    that classifier's log phone posteriors
    phones_cat     cmvn_causal100 beside the log phone posteriors (each dimension standardised before k-means)
    X_vtln         any of these with vocal tract length normalisation of each test utterance: its log-mel
                   warped by the alpha in 0.80-1.20 (steps of 0.025) whose frames lie nearest the
                   codebook (mean distance to the nearest centroid), the codebook fitted unwarped
    hubertI_L      layer L of the I-th `--hubert` bundle's unit encoder (HuBERT iterations: `streamgen
                   train-units`, with --teacher for the second), on the waveform; each HuBERT frame
                   stands beside the log-mel frame of the same 20 ms (2.5 ms later), the last one repeated
                   where the log-mel has one frame more

    python bench/unit_normalisation.py --corpus /work/runs/natural/corpus --encoder /work/runs/natural/units_joe \
        --variants raw cmn cmn+voices cmn_causal50 --json out.json
    # the vocoder check: relabel the joe vocoder data with a variant's units, train, score it (with the
    # codebook saved in DIR at relabelling)
    python bench/unit_normalisation.py ... --variants cmn_causal50 --vocoder-data RUN/voc_data.pt (the joe data) --out DIR
    python -m streamgen.train.source_filter train --data DIR/voc_data.pt --out DIR/sf --steps 4000 --batch-size 8 --segment 32
    python bench/unit_normalisation.py ... --variants cmn_causal50 --out DIR --vocoder DIR/sf
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from natural_resynthesis import griffin_lim
from streamgen.eval.asr import WhisperASR
from streamgen.eval.metrics import normalize, wer
from streamgen.io.files import read_audio
from streamgen import load_bundle
from streamgen.models.kmeans import dedup
from streamgen.models.logmel_units import running_normaliser
from streamgen.train.phones import PhoneFeatures, warp_mels
from streamgen.train.source_filter import load_logmel_units, load_vocoder
from streamgen.train.synth import read_manifest
from streamgen.train.units import kmeans

VOICES = ("joe", "rms", "espeak")
ALPHAS = [0.8 + 0.025 * i for i in range(17)]


def normaliser(variant: str, prior: tuple[torch.Tensor, torch.Tensor], phone_net: str | None = None):
    """The variant's features from one utterance's log-mel frames [F, n_mels] (prior: the training
    log-mel's mean and second moment). A `_lifterN` suffix keeps the first N cepstral coefficients
    (the DCT of the normalised log-mel): the spectral envelope without the pitch harmonics."""
    if "_stack" in variant:  # each frame with its neighbours: frames t - n//2 .. t + n//2 side by side
        base, n = variant.rsplit("_stack", 1)
        norm, r = normaliser(base, prior), int(n) // 2

        def stacked(m):
            x = norm(m)
            padded = torch.cat([x[:1].expand(r, -1), x, x[-1:].expand(r, -1)])
            return torch.cat([padded[i : i + len(x)] for i in range(2 * r + 1)], dim=1)
        return stacked
    if "_lifter" in variant:
        base, n = variant.rsplit("_lifter", 1)
        norm, n = normaliser(base, prior), int(n)
        bands = len(prior[0])
        k = torch.arange(bands, dtype=torch.float64)
        dct = torch.cos(torch.pi / bands * (k[None, :] + 0.5) * k[:n, None]).float()  # DCT-II rows [n, bands]
        return lambda m: norm(m) @ dct.T
    if variant == "raw":
        return lambda m: m
    if variant in ("phones", "phones_post", "phones_cat"):
        if not phone_net:
            raise SystemExit(f"{variant} needs --phone-net DIR (python -m streamgen.train.phones train)")
        net = PhoneFeatures(phone_net)
        if variant == "phones_cat":
            acoustic = normaliser("cmvn_causal100", prior)
            return lambda m: torch.cat([acoustic(m), net(m, posteriors=True)], dim=1)
        return lambda m: net(m, posteriors=variant == "phones_post")
    if variant == "cmn":
        return lambda m: m - m.mean(0)
    if variant == "cmvn":
        return lambda m: (m - m.mean(0)) / m.std(0).clamp_min(1e-3)
    for name, cvn in (("cmn_causal", False), ("cmvn_causal", True)):  # the encoder's own running statistics
        if variant.startswith(name):
            enc = running_normaliser(prior[0].float(), prior[1].float() if cvn else None, int(variant[len(name):]))
            return enc.normalise_utterance
    raise SystemExit(f"unknown variant {variant!r}: raw, cmn, cmvn, cmn_causalN, cmvn_causalN (N frames of prior), phones, phones_post, phones_cat or hubertI_L")


def log_mels(enc, manifest: Path) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(normalised text, log-mel [F, n_mels], wave) per utterance."""
    rows = []
    for r in read_manifest(manifest):
        wave = read_audio(manifest.parent / r["audio"], 16000)
        rows.append((normalize(r["text"]), enc.features(wave), wave))
    return rows


def hubert_features(bundle: str, layer: int):
    """(log-mel [F, n_mels], wave) -> layer `layer` of the bundle's unit encoder on the wave, one row per log-mel frame."""
    encoder = load_bundle(bundle).need("hubert").eval()

    @torch.no_grad()
    def features(m, wave):
        x = encoder(wave[None], layer=layer)[0][: len(m)]
        return torch.cat([x, x[-1:].expand(len(m) - len(x), -1)])
    return features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="the natural corpus (nat_train.tsv, nat_voices.tsv, nat_test_*.tsv)")
    ap.add_argument("--encoder", required=True, help="a log-mel unit encoder directory (its front-end is used)")
    ap.add_argument("--variants", nargs="+", default=["raw", "cmn", "cmn+voices", "cmn_causal50"])
    ap.add_argument("--vocoder-data", help="vocoder training data (streamgen.train.source_filter prepare) to relabel")
    ap.add_argument("--vocoder", help="score this vocoder, trained on the relabelled data, instead of Griffin-Lim")
    ap.add_argument("--out", help="where the codebook and relabelled data go (one variant)")
    ap.add_argument("--phone-net", help="a trained phone classifier (the phones variants)")
    ap.add_argument("--hubert", nargs="+", default=[], help="bundles with a unit encoder (the hubertI_L variants)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    corpus, enc = Path(args.corpus), load_logmel_units(args.encoder)
    train = log_mels(enc, corpus / "nat_train.tsv")
    every = torch.cat([m for _, m, _ in train]).double()
    prior = (every.mean(0), (every * every).mean(0))  # the training log-mel's mean and second moment
    need_voices = any(v.endswith("+voices") for v in args.variants)
    voices = log_mels(enc, corpus / "nat_voices.tsv") if need_voices else []
    tests = {v: log_mels(enc, corpus / f"nat_test_{v}.tsv") for v in VOICES}
    asr = WhisperASR()
    results = {}
    for name in args.variants:
        vtln = "_vtln" in name
        variant = name.removesuffix("+voices").replace("_vtln", "")
        if variant.startswith("hubert"):
            if vtln:
                raise SystemExit(f"{name}: vocal tract warping acts on the log-mel, which the HuBERT variants do not read")
            which, layer = variant.removeprefix("hubert").split("_")
            feature = hubert_features(args.hubert[int(which) - 1], int(layer))
        else:
            norm = normaliser(variant, prior, args.phone_net)
            feature = lambda m, wave: norm(m)
        feats = [feature(m, w) for _, m, w in train + (voices if name.endswith("+voices") else [])]
        saved = Path(args.out or "-") / "codebook.pt"
        if args.vocoder and saved.exists():  # score the vocoder with the very units it was trained on
            book = torch.load(saved)
            mean, std, centroids = book["mean"], book["std"], book["centroids"]
        else:
            x = torch.cat(feats)
            x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:150_000]]
            mean, std = x.mean(0), x.std(0)
            centroids = kmeans((x - mean) / std, 500, iters=25, seed=0)
        assign = lambda f: torch.cdist((f - mean) / std, centroids).argmin(1)
        units = lambda m, wave: assign(feature(m, wave))

        def warped(m, wave):  # a test utterance warped by the vocal tract factor whose frames fit the codebook best
            fits = [(torch.cdist((feature(warp_mels(m, a), wave) - mean) / std, centroids).min(1).values.mean().item(), a)
                    for a in ALPHAS]
            return units(warp_mels(m, min(fits)[1]), wave)
        heard = warped if vtln else units  # the codebook's own (training) frames are never warped
        raw = torch.cat([m for _, m, _ in train])
        u = torch.cat([assign(f) for f in feats[: len(train)]])  # the training frames' features, computed above
        table = torch.zeros(500, raw.shape[1]).index_add_(0, u, raw) / torch.bincount(u, minlength=500).clamp_min(1)[:, None]
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            if not (args.vocoder and saved.exists()):
                torch.save({"variant": variant, "prior": prior[0], "prior_sq": prior[1], "mean": mean, "std": std,
                            "centroids": centroids}, out / "codebook.pt")
        if args.vocoder_data:  # relabel the vocoder data (its audio is int16) with this variant's units
            data = torch.load(args.vocoder_data)
            for d in data:
                wave = d["audio"].float() / 32767
                d["frames"] = units(enc.features(wave), wave).short()
            torch.save(data, Path(args.out) / "voc_data.pt")
            print(f"{name}: relabelled {len(data)} utterances -> {Path(args.out) / 'voc_data.pt'}", flush=True)
            continue
        voc = load_vocoder(args.vocoder) if args.vocoder else None
        results[name] = {}
        for v, rows in tests.items():
            refs = [t for t, _, _ in rows]
            if voc is None:
                hyps = [normalize(asr.transcribe(griffin_lim(table[heard(m, w)], enc).numpy())) for _, m, w in rows]
                results[name][v] = round(wer(refs, hyps), 4)
                continue
            with torch.no_grad():
                true = [normalize(asr.transcribe(voc.generate(heard(m, w)).numpy())) for _, m, w in rows]
                own = [normalize(asr.transcribe(voc(dedup(heard(m, w))[0]).numpy())) for _, m, w in rows]
            results[name][v] = {"true durations": round(wer(refs, true), 4), "own durations": round(wer(refs, own), 4)}
        print(name, json.dumps(results[name]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
