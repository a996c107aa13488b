"""Training a small unit encoder: HuBERT's iterations, then k-means on a chosen layer.

1. Targets, clustered by k-means (each dimension standardised first):
   - iteration 1: 39-d MFCC (13 cepstra + deltas + delta-deltas) on the HuBERT frame grid (25 ms
     windows, 20 ms hop);
   - later iterations: the features of a trained encoder (the previous iteration, a bundle's hubert
     part, its output layer) on the same frame grid.
2. Masked prediction: the HubertEncoder (the same code the bundle runs) sees its frame embeddings
   with spans replaced by a learned mask vector (span starts with p = 0.08, length 10, as HuBERT)
   and predicts the target cluster of every masked frame (cross-entropy through a linear head).
3. Units: k-means on the trained model's features of `output_layer`; the encoder (cut at that layer)
   and the centroids become the bundle's hubert and kmeans parts.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..atomic_file import write_atomic
from ..io.files import read_audio
from ..models.hubert import HubertConfig, HubertEncoder
from ..models.kmeans import KMeansQuantizer
from ..progress import Progress
from .synth import read_manifest
from .vocoder import mel_filterbank


def mfcc(wave: Tensor, rate: int = 16000, n_mfcc: int = 13, n_mels: int = 40, win: int = 400, hop: int = 320) -> Tensor:
    """[T] -> [F, 39] on the HuBERT frame grid (frame i covers samples [i*hop, i*hop + win))."""
    frames = wave.unfold(0, win, hop)  # [F, win]
    spec = torch.fft.rfft(frames * torch.hann_window(win), n=512).abs() ** 2  # [F, 257]
    logmel = torch.log(torch.clamp(spec @ mel_filterbank(512, n_mels, rate).T, min=1e-8))
    n = torch.arange(n_mels)
    dct = torch.cos(math.pi / n_mels * (n[None, :] + 0.5) * torch.arange(n_mfcc)[:, None])  # DCT-II rows
    c = logmel @ dct.T  # [F, 13]
    d1 = torch.gradient(c, dim=0)[0] if len(c) > 1 else torch.zeros_like(c)
    d2 = torch.gradient(d1, dim=0)[0] if len(c) > 1 else torch.zeros_like(c)
    return torch.cat([c, d1, d2], dim=1)


def kmeans(x: Tensor, k: int, iters: int = 50, seed: int = 0) -> Tensor:
    """Lloyd's k-means with k-means++ seeding, on whatever device x is: centroids [k, D]."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = x.float()
    if len(x) < k:
        raise ValueError(f"{len(x)} vectors cannot make {k} clusters")
    first = int(torch.randint(len(x), (1,), generator=g))
    centers = [x[first]]
    dist = ((x - centers[0]) ** 2).sum(1)
    for _ in range(k - 1):
        i = int(torch.multinomial((dist / dist.sum()).cpu(), 1, generator=g))
        centers.append(x[i])
        dist = torch.minimum(dist, ((x - x[i]) ** 2).sum(1))
    c = torch.stack(centers)
    for _ in range(iters):
        assign = KMeansQuantizer(c)(x)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()[:, None]
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
    return c


KMEANS_FRAMES = 200_000  # k-means is fitted on at most this many frames (a random sample of them)


def at_most(x: Tensor, n: int, seed: int) -> Tensor:
    """x's rows, or a random n of them where it has more."""
    if len(x) <= n:
        return x
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]]


def span_mask(n: int, generator: torch.Generator, p: float = 0.08, length: int = 10) -> Tensor:
    starts = torch.rand(n, generator=generator) < p
    mask = torch.zeros(n, dtype=torch.bool)
    for s in torch.nonzero(starts)[:, 0].tolist():
        mask[s : s + length] = True
    if not mask.any():
        s = int(torch.randint(max(1, n - length), (1,), generator=generator))
        mask[s : s + length] = True
    return mask


@dataclass
class UnitTrainConfig:
    target_clusters: int = 100
    units: int = 100
    steps: int = 5000
    batch_size: int = 8
    segment_s: float = 2.0
    lr: float = 5e-4
    warmup: int = 500
    output_layer: int = 4
    seed: int = 0


class UnitTrainer:
    def __init__(self, cfg: HubertConfig, tcfg: UnitTrainConfig, device="cpu", progress: bool = True):
        with torch.random.fork_rng(devices=[]):  # the same seed, the same initial weights
            torch.manual_seed(tcfg.seed)
            self.model = HubertEncoder(cfg).to(device)
            self.mask_emb = nn.Parameter(torch.randn(cfg.dim).to(device) * 0.1)
            self.head = nn.Linear(cfg.dim, tcfg.target_clusters).to(device)
        self.tcfg, self.device, self.progress = tcfg, torch.device(device), progress
        params = list(self.model.parameters()) + [self.mask_emb] + list(self.head.parameters())
        self.opt = torch.optim.AdamW(params, tcfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
        self.step = 0
        self.history: list[dict] = []

    def load(self, manifest: str | Path, teacher: HubertEncoder | None = None) -> None:
        """The manifest's speech and its targets: MFCC clusters, or with `teacher` (HuBERT's next
        iteration) clusters of the teacher's output features."""
        manifest = Path(manifest)
        cfg = self.model.cfg
        if teacher is not None and (teacher.cfg.hop, teacher.cfg.receptive_field) != (cfg.hop, cfg.receptive_field):
            raise ValueError(f"the teacher's frames (hop {teacher.cfg.hop}, window {teacher.cfg.receptive_field}) differ from "
                             f"the student's (hop {cfg.hop}, window {cfg.receptive_field}): give both the same conv layers")
        self.waves = [w for r in read_manifest(manifest) if len(w := read_audio(manifest.parent / r["audio"], cfg.sample_rate)) >= cfg.receptive_field]
        if not self.waves:
            raise ValueError(f"{manifest} has no utterance as long as the encoder's {cfg.receptive_field}-sample window")
        if teacher is None:
            feats = [mfcc(w, cfg.sample_rate) for w in self.waves]
        else:
            with torch.no_grad():
                teacher = teacher.to(self.device).eval()
                feats = [teacher(w.to(self.device)[None])[0].cpu() for w in self.waves]
        allf = torch.cat(feats)
        self.mean, self.std = allf.mean(0), allf.std(0) + 1e-5
        self.target_centers = kmeans(((at_most(allf, KMEANS_FRAMES, self.tcfg.seed) - self.mean) / self.std).to(self.device),
                                     self.tcfg.target_clusters, seed=self.tcfg.seed)
        q = KMeansQuantizer(self.target_centers)
        self.targets = [q(((f - self.mean) / self.std).to(self.device)).cpu() for f in feats]

    def batch(self, rng: random.Random) -> tuple[Tensor, Tensor]:
        cfg = self.model.cfg
        seg = int(self.tcfg.segment_s * cfg.sample_rate) // cfg.hop * cfg.hop
        n_frames = cfg.num_frames(seg)
        waves, targets = [], []
        for _ in range(self.tcfg.batch_size):
            i = rng.randrange(len(self.waves))
            w, t = self.waves[i], self.targets[i]
            if len(w) < seg:
                w = F.pad(w, (0, seg - len(w)))
                t = F.pad(t, (0, n_frames - len(t)), value=-100)  # padded frames are not predicted
            f0 = rng.randrange((len(w) - seg) // cfg.hop + 1)  # the window stays inside the utterance
            waves.append(w[f0 * cfg.hop : f0 * cfg.hop + seg])
            targets.append(t[f0 : f0 + n_frames])
        return torch.stack(waves), torch.stack(targets)

    def train_step(self, rng: random.Random, g: torch.Generator) -> float:
        waves, targets = self.batch(rng)
        waves, targets = waves.to(self.device), targets.to(self.device)
        for group in self.opt.param_groups:
            group["lr"] = self.tcfg.lr * min(1.0, (self.step + 1) / self.tcfg.warmup)
        self.model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            x = self.model.embed(waves)
            mask = torch.stack([span_mask(x.shape[1], g) for _ in range(len(x))]).to(self.device)
            x = torch.where(mask[..., None], self.mask_emb.to(x.dtype), x)
            logits = self.head(self.model.encode(x, len(self.model.layers)))
        target = torch.where(mask, targets, torch.full_like(targets, -100))
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for grp in self.opt.param_groups for p in grp["params"]], 10.0)
        self.opt.step()
        self.step += 1
        return float(loss.detach())

    def fit(self, state: Path | None = None, save_minutes: float = 10.0) -> list[dict]:
        """Train to `tcfg.steps`. With `state`, resumable: saved there every `save_minutes` and at the
        end, and picked up from there when it exists (the same steps as one uninterrupted run)."""
        rng, g = random.Random(self.tcfg.seed), torch.Generator().manual_seed(self.tcfg.seed)
        if state is not None and Path(state).exists():
            rng_state = self.resume(state, g)
            rng.setstate(rng_state)
        saved = time.monotonic()
        with Progress("unit encoder", self.tcfg.steps, self.step, enabled=self.progress, loss=float("nan")) as bar:
            while self.step < self.tcfg.steps:
                loss = self.train_step(rng, g)
                self.history.append({"step": self.step, "loss": loss})
                bar.update(self.step, loss=loss)
                if state is not None and time.monotonic() - saved >= 60 * save_minutes:
                    self.save(state, rng, g)
                    saved = time.monotonic()
        if state is not None:
            self.save(state, rng, g)
        return self.history

    def save(self, path: Path, rng: random.Random, g: torch.Generator) -> None:
        """Everything a resumed run needs but the targets (recomputed, deterministically, by `load`),
        as tensors and plain values only (read back with weights_only)."""
        version, internal, gauss = rng.getstate()
        state = {"model": self.model.state_dict(), "mask_emb": self.mask_emb.detach(), "head": self.head.state_dict(),
                 "opt": self.opt.state_dict(), "step": self.step, "history": self.history,
                 "rng": list(internal), "rng_version": version, "rng_gauss": gauss, "g": g.get_state()}
        write_atomic(path, lambda f: torch.save(state, f))

    def resume(self, path: Path, g: torch.Generator) -> tuple:
        st = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(st["model"])
        with torch.no_grad():
            self.mask_emb.copy_(st["mask_emb"])
        self.head.load_state_dict(st["head"])
        self.opt.load_state_dict(st["opt"])
        self.step, self.history = st["step"], st["history"]
        g.set_state(st["g"])
        return st["rng_version"], tuple(st["rng"]), st["rng_gauss"]

    @torch.no_grad()
    def units(self) -> tuple[HubertEncoder, KMeansQuantizer]:
        """The encoder cut at the output layer, and k-means on its features."""
        L = self.tcfg.output_layer
        cfg = HubertConfig(**{**self.model.cfg.to_dict(), "conv_layers": self.model.cfg.conv_layers, "layers": L, "output_layer": L})
        enc = HubertEncoder(cfg).to(self.device)
        enc.load_state_dict({k: v for k, v in self.model.state_dict().items() if not k.startswith("layers.") or int(k.split(".")[1]) < L})
        enc.eval()
        feats = torch.cat([enc(w.to(self.device)[None])[0] for w in self.waves])
        feats = at_most(feats, KMEANS_FRAMES, self.tcfg.seed)
        return enc.cpu(), KMeansQuantizer(kmeans(feats, self.tcfg.units, seed=self.tcfg.seed).cpu())
