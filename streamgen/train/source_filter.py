"""Training the log-mel unit encoder (k-means) and the source-filter vocoder.

    python -m streamgen.train.source_filter units   --manifest A.tsv [B.tsv ...] --out RUN/logmel_units --units 500
    python -m streamgen.train.source_filter prepare --manifest nat_train.tsv --encoder RUN/logmel_units --out RUN/voc_data.pt
    python -m streamgen.train.source_filter train   --data RUN/voc_data.pt --out RUN/vocoder --steps 6000   (resumable: rerun it)
    python -m streamgen.train.source_filter bundle  --encoder RUN/logmel_units --vocoder RUN/vocoder --out BUNDLE

Vocoder loss (per random window of `segment` unit frames):

    multi-resolution STFT: sum over FFT sizes of  L1(log|S| - log|S^|) + ||S - S^||_F / ||S||_F
                           on the waveform rendered with the analysed F0 and voicing (teacher-forced source),
    + L1 on log F0 (all frames; unvoiced frames carry the F0 interpolated across them)
    + binary cross-entropy on voicing
    + MSE on log(1 + frames) of each de-duplicated unit (the duration predictor, as fairseq trains it).

F0 and voicing come from `f0_track`: normalised cross-correlation per 10 ms frame (30 ms window,
60-400 Hz), the shortest lag within 15 % of the best correlation (no octave-down errors), parabolic
refinement, voiced where the correlation exceeds 0.6 and the frame is not silent.
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..atomic_file import write_atomic
from ..models.kmeans import dedup
from ..models.logmel_units import LogMelUnits, LogMelUnitsConfig
from ..models.source_filter_vocoder import SourceFilterConfig, SourceFilterVocoder
from ..models.vocoder import DurationConfig
from ..progress import Progress

# Training itself needs only torch and numpy (it also runs on a bare GPU machine); reading the corpus
# (soundfile, soxr) and k-means are imported where they are used.

RATE = 16000


def f0_track(wave: np.ndarray, h: int = 160, rate: int = RATE, fmin: float = 60.0, fmax: float = 400.0,
             threshold: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """F0 (Hz, interpolated across unvoiced frames) and voicing (0/1) at frame centres m*h + h/2,
    for len(wave) // h frames."""
    x = np.asarray(wave, dtype=np.float64)
    n, W = len(x) // h, int(0.03 * rate)
    lmin, lmax = int(rate / fmax), int(math.ceil(rate / fmin))
    padded = np.concatenate([np.zeros(W // 2), x, np.zeros(W + lmax + h)])
    starts = np.arange(n) * h + h // 2  # in padded coordinates: centre - W/2 + W/2
    seg = padded[starts[:, None] + np.arange(W + lmax)[None]]  # [n, W + lmax]
    a = seg[:, :W]
    ea = (a * a).sum(1)
    sq = np.concatenate([np.zeros((n, 1)), np.cumsum(seg * seg, 1)], 1)
    lags = np.arange(lmin, lmax + 1)
    r = np.empty((n, len(lags)))
    for j, L in enumerate(lags):
        eb = sq[:, L + W] - sq[:, L]
        r[:, j] = (a * seg[:, L : L + W]).sum(1) / np.sqrt(ea * eb + 1e-12)
    best = r.max(1)
    peak = np.zeros_like(r, dtype=bool)
    peak[:, 1:-1] = (r[:, 1:-1] >= r[:, :-2]) & (r[:, 1:-1] >= r[:, 2:])
    ok = peak & (r >= 0.85 * best[:, None])
    j = np.where(ok.any(1), ok.argmax(1), r.argmax(1)).clip(1, len(lags) - 2)
    rows = np.arange(n)
    y0, y1, y2 = r[rows, j - 1], r[rows, j], r[rows, j + 1]
    shift = 0.5 * (y0 - y2) / np.where(np.abs(y0 - 2 * y1 + y2) > 1e-9, y0 - 2 * y1 + y2, 1e-9)
    f0 = rate / (lags[j] + np.clip(shift, -1, 1))
    rms = np.sqrt(ea / W)
    voiced = (best > threshold) & (rms > 0.02 * (rms.max() + 1e-9))
    log_f0 = np.log(f0)
    if voiced.sum() >= 3:  # median of 3 over voiced frames, then interpolate across unvoiced ones
        v = np.nonzero(voiced)[0]
        lv = log_f0[v]
        lv[1:-1] = np.median(np.stack([lv[:-2], lv[1:-1], lv[2:]]), 0)
        log_f0 = np.interp(np.arange(n), v, lv)
    else:
        log_f0 = np.full(n, math.log(120.0))
    return np.exp(log_f0).astype(np.float32), voiced.astype(np.float32)


# --- the unit encoder ---------------------------------------------------------------------------

def fit_logmel_units(manifests: list[str], out: str | Path, num_units: int = 500, iters: int = 30, max_frames: int = 200_000,
                     seed: int = 0, progress: bool = True, cmn_prior_frames: int = 0, cvn: bool = False) -> LogMelUnits:
    """k-means on the log-mel of every utterance of the manifests; with `cmn_prior_frames`, on the
    log-mel less its running mean (the prior: these utterances' mean log-mel), with `cvn` also over
    its running standard deviation (the prior: their mean square log-mel)."""
    from ..io.files import read_audio
    from .synth import read_manifest
    from .units import kmeans

    enc = LogMelUnits(LogMelUnitsConfig(num_units=num_units, cmn_prior_frames=cmn_prior_frames, cvn=cvn))
    feats = []
    rows = [(Path(m).parent, r) for m in manifests for r in read_manifest(m)]
    with Progress("log-mel features", len(rows), enabled=progress) as bar, torch.no_grad():
        for root, r in rows:
            feats.append(enc.features(read_audio(root / r["audio"], RATE)))
            bar.update(advance=1)
    prior = prior_sq = None
    if cmn_prior_frames:
        every = torch.cat(feats).double()
        prior = every.mean(0).float()
        enc.prior.copy_(prior)
        if cvn:
            prior_sq = (every * every).mean(0).float()
            enc.prior_sq.copy_(prior_sq)
        feats = [enc.normalise_utterance(f) for f in feats]
    x = torch.cat(feats)
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_frames]]
    mean, std = x.mean(0), x.std(0).clamp(min=1e-3)
    enc.set_codebook(mean, std, kmeans((x - mean) / std, num_units, iters=iters, seed=seed), prior, prior_sq)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, out / "logmel_units.safetensors")
    (out / "config.json").write_text(json.dumps(enc.cfg.to_dict(), indent=2))
    return enc


def load_logmel_units(path: str | Path) -> LogMelUnits:
    path = Path(path)
    enc = LogMelUnits(LogMelUnitsConfig.from_dict(json.loads((path / "config.json").read_text())))
    enc.load_state_dict(load_file(path / "logmel_units.safetensors"))
    return enc.eval()


# --- vocoder data ---------------------------------------------------------------------------------

def prepare(manifests: list[str], encoder: Callable[[Tensor], Tensor], out: str | Path, hop: int | None = None,
            progress: bool = True) -> Path:
    """Per utterance: unit id per frame, analysed F0 and voicing per parameter frame (h = hop / 2), int16 audio.
    `encoder` maps a 16 kHz waveform to one unit per `hop` samples (a `LogMelUnits`, whose hop is the
    default, or any other unit type's frame function); frames past the audio's end are dropped."""
    from ..io.files import read_audio
    from .synth import read_manifest

    hop = hop or encoder.cfg.hop
    data = []
    rows = [(Path(m).parent, r) for m in manifests for r in read_manifest(m)]
    with Progress("vocoder data", len(rows), enabled=progress) as bar, torch.no_grad():
        for root, r in rows:
            wave = read_audio(root / r["audio"], RATE)
            frames = encoder(wave)
            n = min(len(frames), len(wave) // hop)
            f0, voiced = f0_track(wave[: n * hop].numpy(), hop // 2)
            audio = (wave[: n * hop].clamp(-1, 1) * 32767).round().short()
            data.append({"id": r["id"], "frames": frames[:n].short(), "f0": torch.from_numpy(f0), "voiced": torch.from_numpy(voiced), "audio": audio})
            bar.update(advance=1)
    torch.save(data, out)
    return Path(out)


# --- vocoder training -----------------------------------------------------------------------------

def stft_loss(x: Tensor, y: Tensor, sizes=(2048, 1024, 512, 256, 128)) -> Tensor:
    total = x.new_zeros(())
    for n in sizes:
        w = torch.hann_window(n, device=x.device)
        X = torch.stft(x, n, n // 4, window=w, return_complex=True).abs()
        Y = torch.stft(y, n, n // 4, window=w, return_complex=True).abs()
        total = total + (torch.log(X + 1e-5) - torch.log(Y + 1e-5)).abs().mean() + torch.linalg.norm(X - Y) / torch.linalg.norm(Y).clamp(min=1e-5)
    return total / len(sizes)



def batch(data: list[dict], rng: random.Random, size: int, segment: int, hop: int, sub: int):
    frames, f0, voiced, audio = [], [], [], []
    for _ in range(size):
        d = data[rng.randrange(len(data))]
        n = len(d["frames"])
        s = rng.randrange(max(1, n - segment + 1))
        fr = d["frames"][s : s + segment].long()
        pad = segment - len(fr)
        frames.append(F.pad(fr, (0, pad)))
        f0.append(F.pad(d["f0"][s * sub : (s + segment) * sub], (0, pad * sub), value=120.0))
        voiced.append(F.pad(d["voiced"][s * sub : (s + segment) * sub], (0, pad * sub)))
        audio.append(F.pad(d["audio"][s * hop : (s + segment) * hop].float() / 32767, (0, pad * hop)))
    return torch.stack(frames), torch.stack(f0), torch.stack(voiced), torch.stack(audio)


def duration_batch(data: list[dict], rng: random.Random, size: int) -> tuple[Tensor, Tensor]:
    units, durs = [], []
    for _ in range(size):
        u, d = dedup(data[rng.randrange(len(data))]["frames"].long())
        units.append(u)
        durs.append(d)
    U = torch.nn.utils.rnn.pad_sequence(units, batch_first=True)
    D = torch.nn.utils.rnn.pad_sequence(durs, batch_first=True)
    return U, D


def train(data_path: str | Path, out: str | Path, cfg: SourceFilterConfig, steps: int, batch_size: int = 8, segment: int = 32,
          lr: float = 1e-3, seed: int = 0, log_every: int = 50, save_every: int = 250, device: str = "cpu",
          minutes: float = 0.0, keep_every: int = 0) -> SourceFilterVocoder:
    """Resumable (rerun with the same `out`). With `minutes`, the step count is cut after 20 steps to
    what that much time allows at the measured speed (the learning-rate schedule follows it); with
    `keep_every`, the weights at every such step are kept beside the latest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with (lzma.open(data_path) if str(data_path).endswith(".xz") else open(data_path, "rb")) as f:
        data = torch.load(f, weights_only=True)
    model = SourceFilterVocoder(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = lambda step: min(1.0, step / 200) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)) * 0.9 + 0.1
    step, ckpt = 0, out / "checkpoint.pt"
    if ckpt.is_file():  # resume
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"resumed at step {step}", flush=True)
    start = step
    rng = random.Random(seed + step)
    torch.manual_seed(seed + step)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    log = (out / "log.tsv").open("a")
    t0, acc = time.time(), {}
    model.train()
    while step < steps:
        for g in opt.param_groups:
            g["lr"] = lr * sched(step)
        frames, f0, voiced, audio = (x.to(device) for x in batch(data, rng, batch_size, segment, cfg.hop, cfg.sub))
        p = model.params(frames)
        wave = model.synthesize(p, f0=f0, voiced=voiced)
        loss_stft = stft_loss(wave, audio)
        loss_f0 = (p[..., 0] - torch.log(f0 / cfg.f0_ref)).abs().mean()
        loss_v = F.binary_cross_entropy_with_logits(p[..., 1], voiced)
        U, D = (x.to(device) for x in duration_batch(data, rng, batch_size))
        mask = D > 0
        log_d = model.dur_predictor(model.dict(U))
        loss_dur = ((log_d - torch.log1p(D.float())) ** 2)[mask].mean()
        loss = loss_stft + loss_f0 + 0.5 * loss_v + loss_dur
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {float(loss)}")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if minutes and step == start + 20:  # past the warm-up (a GPU's first steps are slow)
            t20 = time.time()
        if minutes and step == start + 120:
            steps = min(steps, step + max(0, int((minutes * 60 - (time.time() - t0)) * 100 / (time.time() - t20))))
            print(f"time budget of {minutes} min: {steps} steps", flush=True)
        if keep_every and step % keep_every == 0:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out / f"source_filter_{step}.safetensors")
        for k, v in (("stft", loss_stft), ("f0", loss_f0), ("voicing", loss_v), ("dur", loss_dur)):
            acc[k] = acc.get(k, 0.0) + float(v.detach())
        if step % log_every == 0:
            line = "\t".join([str(step), f"{time.time() - t0:.0f}"] + [f"{k}={v / log_every:.4f}" for k, v in acc.items()])
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()
            acc = {}
        if step % save_every == 0 or step == steps:
            write_atomic(ckpt, lambda f: torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, f))
            weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            write_atomic(out / "source_filter.safetensors", lambda f: save_file(weights, f))
    return model.eval()


def load_vocoder(path: str | Path) -> SourceFilterVocoder:
    path = Path(path)
    m = SourceFilterVocoder(SourceFilterConfig.from_dict(json.loads((path / "config.json").read_text())))
    m.load_state_dict(load_file(path / "source_filter.safetensors"))
    return m.eval()


def into_bundle(encoder: str | Path, vocoder: str | Path, out: str | Path) -> Path:
    """Put the unit encoder and the vocoder into a bundle directory (created, or their parts replaced)."""
    from ..bundle import Bundle, save_part

    enc, voc, out = load_logmel_units(encoder), load_vocoder(vocoder), Path(out)
    if (out / "bundle.json").is_file():
        save_part(out, "logmel_units", enc)
        save_part(out, "source_filter", voc)
    else:
        Bundle(logmel_units=enc, source_filter=voc).save(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("units")
    u.add_argument("--manifest", nargs="+", required=True)
    u.add_argument("--out", required=True)
    u.add_argument("--units", type=int, default=500)
    u.add_argument("--cmn-prior-frames", type=int, default=0,
                   help="remove each utterance's running mean log-mel, with this many frames of prior (0: none)")
    u.add_argument("--cvn", action="store_true", help="with --cmn-prior-frames: also divide by the running standard deviation")
    p = sub.add_parser("prepare")
    p.add_argument("--manifest", nargs="+", required=True)
    p.add_argument("--encoder", required=True)
    p.add_argument("--out", required=True)
    b = sub.add_parser("bundle", help="put the encoder and the vocoder into a bundle directory")
    b.add_argument("--encoder", required=True)
    b.add_argument("--vocoder", required=True)
    b.add_argument("--out", required=True)
    t = sub.add_parser("train")
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=6000)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--segment", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--dim", type=int, default=192)
    t.add_argument("--layers", type=int, default=6)
    t.add_argument("--harmonics", type=int, default=80)
    t.add_argument("--units", type=int, default=500)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--device", default="cpu")
    t.add_argument("--minutes", type=float, default=0.0, help="time budget: fewer steps if they would take longer")
    t.add_argument("--keep-every", type=int, default=0)
    args = ap.parse_args()
    if args.cmd == "units":
        if args.cvn and not args.cmn_prior_frames:
            ap.error("--cvn needs --cmn-prior-frames N (N > 0): the running deviation starts from N frames of prior")
        fit_logmel_units(args.manifest, args.out, args.units, cmn_prior_frames=args.cmn_prior_frames, cvn=args.cvn)
    elif args.cmd == "bundle":
        print(into_bundle(args.encoder, args.vocoder, args.out))
    elif args.cmd == "prepare":
        prepare(args.manifest, load_logmel_units(args.encoder), args.out)
    else:
        torch.set_num_threads(args.threads)
        cfg = SourceFilterConfig(num_units=args.units, dim=args.dim, layers=args.layers, harmonics=args.harmonics,
                                 dur_predictor_params=DurationConfig(args.dim, args.dim))
        train(args.data, args.out, cfg, args.steps, args.batch_size, args.segment, args.lr, device=args.device, minutes=args.minutes, keep_every=args.keep_every)


if __name__ == "__main__":
    main()
