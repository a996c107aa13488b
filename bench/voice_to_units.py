"""Units for an unseen voice by classification: does a frame classifier that predicts, from any voice's
normalised log-mel, the unit the *training* voice's frame takes at the same point of the same text make
the shipped units survive a new voice? (issue 12, item 2; bench/QUALITY.md)

The shipped units are k-means of piper joe's raw log-mel, and the shipped vocoder speaks them; a new
voice's frames fall to the nearest joe centroid, which is often another sound. Here the TTS engines say
the same texts in several voices with their own phone alignments (`streamgen.train.phones synth`); each
other voice's frames are aligned to joe's by dynamic time warping (a phone mismatch costs 2, plus the
cosine distance of per-utterance standardised log-mel; each frame of the other voice moves joe's
index by 0, 1 or 2), and take the unit of the joe frame they align with; joe's frames keep their own.
A `PhoneNet` (five residual convolutions, 14 frames of look-ahead) with 500 outputs learns them from the
running mean and variance normalised log-mel, with vocal tract length perturbation. Scored like the
resynthesis rows of QUALITY.md: units in the talker's timing -> the bundle's vocoder -> Whisper tiny.en,
on the 40 natural test sentences per voice, beside the bundle's own k-means units and the original.

    python -m streamgen.train.phones synth --texts R/corpus/nat_train.tsv --voices joe awb kal16 slt kal --out RUN/aligned.pt
    python bench/voice_to_units.py targets --run RUN
    python bench/voice_to_units.py train --run RUN --steps 3000
    python bench/voice_to_units.py score --run RUN --corpus R/corpus
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from streamgen import load_bundle
from streamgen.eval.asr import WhisperASR
from streamgen.eval.metrics import wer
from streamgen.io.files import read_audio
from streamgen.models.kmeans import dedup
from streamgen.models.logmel_units import running_normaliser
from streamgen.models.phone_net import PhoneNet, PhoneNetConfig
from streamgen.train.phones import excerpts
from streamgen.train.synth import read_manifest


def align(cost: np.ndarray) -> np.ndarray | None:
    """A monotone path through cost [Tx, Tj] from (0, 0) to the end in which each x frame moves j by
    0, 1 or 2: the j of every x frame (None where no such path exists)."""
    Tx, Tj = cost.shape
    D = np.full((Tx, Tj), np.inf)
    step = np.zeros((Tx, Tj), np.int64)
    D[0, 0] = cost[0, 0]
    cols = np.arange(Tj)
    for i in range(1, Tx):
        p = D[i - 1]
        moves = np.stack([p, np.concatenate([[np.inf], p[:-1]]), np.concatenate([[np.inf, np.inf], p[:-2]])])
        step[i] = moves.argmin(0)
        D[i] = moves[step[i], cols] + cost[i]
    if not np.isfinite(D[-1, -1]):
        return None
    path, j = np.zeros(Tx, np.int64), Tj - 1
    for i in range(Tx - 1, -1, -1):
        path[i] = j
        j -= int(step[i, j])
    return path


def standardised(m: torch.Tensor) -> torch.Tensor:
    return (m - m.mean(0)) / (m.std(0) + 1e-3)


def targets(run: Path, bundle) -> None:
    enc = bundle.logmel_units
    data = torch.load(run / "aligned.pt")
    feats = [enc.features(d["audio"].float() / 32767) for d in data]
    every = torch.cat(feats).double()
    joe = {d["text"]: i for i, d in enumerate(data) if d["voice"] == "joe"}
    joe_units = {j: enc.units_of(feats[j]) for j in joe.values()}  # what enc(wave) gives, each joe utterance once
    units, skipped = [], 0
    for i, d in enumerate(data):
        j = joe[d["text"]]
        uj = joe_units[j]
        if i == j:
            units.append(uj)
            continue
        nx, nj = min(len(feats[i]), len(d["phones"])), min(len(feats[j]), len(data[j]["phones"]))
        cos = 1 - F.normalize(standardised(feats[i])[:nx], dim=1) @ F.normalize(standardised(feats[j])[:nj], dim=1).T
        other = (d["phones"][:nx, None].long() != data[j]["phones"][None, :nj].long()).float()
        path = align((cos + 2.0 * other).numpy())
        if path is None:
            skipped += 1
            units.append(None)
            continue
        y = uj[torch.from_numpy(path).clamp(max=len(uj) - 1)]
        units.append(torch.cat([y, y[-1:].expand(len(feats[i]) - len(y))]))
    keep = [k for k, u in enumerate(units) if u is not None]
    torch.save({"feats": [feats[k] for k in keep], "units": [units[k] for k in keep], "voices": [data[k]["voice"] for k in keep],
                "texts": [data[k]["text"] for k in keep], "prior": every.mean(0).float(), "prior_sq": (every * every).mean(0).float()},
               run / "targets.pt")
    print(f"{len(keep)} utterances with targets, {skipped} without an alignment -> {run / 'targets.pt'}", flush=True)


def train(run: Path, num_units: int, steps: int, batch: int = 16, frames: int = 150, warp: float = 0.15, lr: float = 1e-3) -> None:
    rng = random.Random(0)
    torch.manual_seed(0)
    t = torch.load(run / "targets.pt")
    norm = running_normaliser(t["prior"], t["prior_sq"])
    feats, ys = t["feats"], [u.long() for u in t["units"]]
    xs = [norm.normalise_utterance(m) for m in feats]
    texts = sorted(set(t["texts"]))
    rng.shuffle(texts)
    held = set(texts[: min(40, len(texts) // 5)])  # dev: 40 texts in every voice, never trained on
    dev = [i for i, x in enumerate(t["texts"]) if x in held]
    tr = [i for i, x in enumerate(t["texts"]) if x not in held]
    cfg = PhoneNetConfig(n_mels=xs[0].shape[1], num_phones=num_units)
    net = PhoneNet(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(i, steps) / steps)))

    def accuracy(ids: list[int]) -> float:
        net.eval()
        with torch.no_grad():
            hit = sum((net(xs[i][None])[0].argmax(-1) == ys[i]).sum().item() for i in ids)
        net.train()
        return hit / sum(len(ys[i]) for i in ids)

    start = time.time()
    for k in range(1, steps + 1):
        xb, yb = excerpts(rng, rng.sample(tr, batch), feats, xs, ys, norm, frames, warp)
        loss = F.cross_entropy(net(xb).flatten(0, 1), yb.flatten(), ignore_index=-100, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if k % 250 == 0 or k == steps:
            print(f"step {k}: loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
        if k % 1000 == 0 or k == steps:
            per = {v: round(accuracy([i for i in dev if t["voices"][i] == v]), 3) for v in sorted(set(t["voices"]))}
            print(f"  dev frame accuracy per voice {per}", flush=True)
            torch.save({"cfg": cfg.to_dict(), "state": net.state_dict(), "prior": t["prior"], "prior_sq": t["prior_sq"], "step": k},
                       run / "net.pt")


def score(run: Path, corpus: Path, bundle, voices: list[str]) -> None:
    asr = WhisperASR()
    enc = bundle.logmel_units
    ck = torch.load(run / "net.pt")
    net = PhoneNet(PhoneNetConfig(**ck["cfg"])).eval()
    net.load_state_dict(ck["state"])
    norm = running_normaliser(ck["prior"], ck["prior_sq"])
    hear = lambda wave: asr.transcribe(wave.numpy())
    results = {}
    for v in voices:
        manifest = corpus / f"nat_test_{v}.tsv"
        refs, original, kmeans, classified = [], [], [], []
        for r in read_manifest(manifest):
            wave = read_audio(manifest.parent / r["audio"], bundle.sample_rate)
            refs.append(r["text"])
            original.append(hear(wave))
            feats = enc.features(wave)  # once, for both routes to units
            kmeans.append(hear(bundle.vocode(*dedup(enc.units_of(feats)))))  # = enc.encode(wave)
            with torch.no_grad():
                frame_units = net(norm.normalise_utterance(feats)[None])[0].argmax(-1)
            classified.append(hear(bundle.vocode(*dedup(frame_units))))
        results[v] = {"original": round(wer(refs, original), 3), "k-means (the bundle's)": round(wer(refs, kmeans), 3),
                      "classifier": round(wer(refs, classified), 3)}
        print(v, results[v], flush=True)
    (run / "score.json").write_text(json.dumps({"step": ck["step"], **results}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=["targets", "train", "score"])
    ap.add_argument("--run", required=True, type=Path, help="the run directory (aligned.pt from `streamgen.train.phones synth`)")
    ap.add_argument("--bundle", default=None, help="the bundle whose units and vocoder are used (default: the shipped one)")
    ap.add_argument("--corpus", type=Path, help="score: the natural corpus (nat_test_<voice>.tsv)")
    ap.add_argument("--voices", nargs="+", default=["joe", "rms", "espeak"])
    ap.add_argument("--steps", type=int, default=3000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    bundle = load_bundle(args.bundle)
    if args.stage == "targets":
        targets(args.run, bundle)
    elif args.stage == "train":
        train(args.run, bundle.logmel_units.num_units, args.steps)
    else:
        score(args.run, args.corpus, bundle, args.voices)


if __name__ == "__main__":
    main()
