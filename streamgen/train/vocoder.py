"""Training a CodeHiFiGAN unit vocoder (HiFi-GAN recipe, light discriminators).

Generator loss  = sum_D mean((1 - D(G(u)))^2) + 2 * feature matching L1 + 45 * mel L1 + duration MSE
Discriminators  = multi-period (periods 2, 3, 5, 7, 11: 2-D convs over the folded waveform) and
                  multi-scale (raw, x2 and x4 average-pooled: 1-D convs); LSGAN losses.
Warm-up         = for the first `mel_warmup` steps the generator learns from the mel L1 and duration
                  losses alone and the discriminators are not run: half the cost of a step, and the
                  spectral envelope (what makes speech intelligible) is learnt before the GAN refines it.
Duration        = MSE between the predictor's output and log(1 + frames) of each de-duplicated unit,
                  as fairseq trains it. Widths are configurable: narrow discriminators keep a step cheap.

Training data: a unit manifest (`streamgen units` output: units, durations) and its audio. Each
example is a random window of `segment_frames` frames with its audio (frame i = samples
[i*hop, (i+1)*hop)).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..atomic_file import write_atomic
from ..bundle import shape_difference
from ..io.files import read_audio
from ..models.vocoder import LRELU_SLOPE, CodeHiFiGAN, VocoderConfig
from ..progress import Progress
from .synth import read_manifest


def mel_filterbank(n_fft: int, n_mels: int, rate: int, fmin: float = 0.0, fmax: float | None = None) -> Tensor:
    """Triangular filters on the HTK mel scale: [n_mels, n_fft // 2 + 1]."""
    fmax = fmax or rate / 2
    mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)
    hz = lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)
    points = torch.tensor([hz(m) for m in torch.linspace(mel(fmin), mel(fmax), n_mels + 2).tolist()])
    freqs = torch.linspace(0, rate / 2, n_fft // 2 + 1)
    lo, mid, hi = points[:-2, None], points[1:-1, None], points[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0)


class LogMel(nn.Module):
    def __init__(self, rate: int = 16000, n_fft: int = 1024, hop: int = 160, n_mels: int = 80):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("fb", mel_filterbank(n_fft, n_mels, rate), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def forward(self, wave: Tensor) -> Tensor:  # [B, T] -> [B, n_mels, frames]
        spec = torch.stft(wave.float(), self.n_fft, self.hop, window=self.window, return_complex=True).abs()
        return torch.log(torch.clamp(self.fb @ spec, min=1e-5))


def _convs_with_features(convs: nn.ModuleList, post: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Run a discriminator's conv stack; return its score and every layer's output (for feature matching)."""
    feats = []
    for conv in convs:
        x = F.leaky_relu(conv(x), LRELU_SLOPE)
        feats.append(x)
    x = post(x)
    feats.append(x)
    return x.flatten(1), feats


class PeriodDiscriminator(nn.Module):
    def __init__(self, period: int, width: int):
        super().__init__()
        self.period = period
        chans = [1, width, 4 * width, 16 * width, 32 * width]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, (5, 1), (3, 1), padding=(2, 0)) for a, b in zip(chans, chans[1:]))
        self.post = nn.Conv2d(chans[-1], 1, (3, 1), padding=(1, 0))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:  # x [B, 1, T]
        B, C, T = x.shape
        if T % self.period:
            x = F.pad(x, (0, self.period - T % self.period), mode="reflect")
        return _convs_with_features(self.convs, self.post, x.view(B, C, -1, self.period))


class ScaleDiscriminator(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        chans = [1, width, 4 * width, 16 * width, 16 * width]
        self.convs = nn.ModuleList(nn.Conv1d(a, b, 15 if i == 0 else 41, 1 if i == 0 else 4, groups=1 if i == 0 else 4, padding=7 if i == 0 else 20)
                                   for i, (a, b) in enumerate(zip(chans, chans[1:])))
        self.post = nn.Conv1d(chans[-1], 1, 3, padding=1)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return _convs_with_features(self.convs, self.post, x)


class Discriminators(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.mpd = nn.ModuleList(PeriodDiscriminator(p, width) for p in (2, 3, 5, 7, 11))
        self.msd = nn.ModuleList(ScaleDiscriminator(width) for _ in range(3))

    def forward(self, wave: Tensor) -> list[tuple[Tensor, list[Tensor]]]:  # wave [B, T]
        x = wave[:, None]
        out = [d(x) for d in self.mpd]
        for i, d in enumerate(self.msd):
            out.append(d(x if i == 0 else F.avg_pool1d(x, 2**i * 2, 2**i, padding=2**i - 1 if i else 0)))
        return out


@dataclass
class VocoderTrainConfig:
    steps: int = 20000
    batch_size: int = 16
    segment_frames: int = 32  # 640 ms windows
    lr: float = 2e-4
    lr_decay: float = 0.999  # per 1000 steps
    mel_weight: float = 45.0
    fm_weight: float = 2.0
    disc_width: int = 8
    mel_warmup: int = 0  # steps without discriminators at the start
    seed: int = 0
    log_every: int = 50
    save_every: int = 1000


class VocoderData:
    """Random (frame units, audio) windows from a unit manifest, with de-duplicated units and durations."""

    def __init__(self, manifest: str | Path, hop: int, sample_rate: int, segment_frames: int, num_units: int | None = None):
        """ValueError, before any audio is read, for a row whose units or durations the vocoder could not take
        (a unit past its `num_units` failed only mid-training, as an index error)."""
        manifest = Path(manifest)
        rows = read_manifest(manifest)
        if not rows or "durations" not in rows[0]:
            raise ValueError(f"{manifest}: needs units and durations columns (run `streamgen units`)")
        parsed = []
        for r in rows:
            try:
                units = torch.tensor([int(u) for u in r["units"].split()], dtype=torch.long)
                durs = torch.tensor([int(d) for d in r["durations"].split()], dtype=torch.long)
            except (ValueError, AttributeError):
                raise ValueError(f"{manifest}: row {r.get('id')!r}: units and durations must be whole numbers") from None
            if len(units) != len(durs):
                raise ValueError(f"{manifest}: row {r.get('id')!r}: {len(units)} units but {len(durs)} durations "
                                 "(one per unit; rerun `streamgen units`)")
            if len(durs) and int(durs.min()) < 1:
                raise ValueError(f"{manifest}: row {r.get('id')!r}: a duration below 1 frame (each unit lasts at least one; "
                                 "rerun `streamgen units`)")
            if num_units is not None and len(units) and not (0 <= int(units.min()) and int(units.max()) < num_units):
                raise ValueError(f"{manifest}: row {r.get('id')!r} has units outside 0..{num_units - 1}, the bundle's "
                                 "inventory: its units come from another unit encoder (rerun `streamgen units` with this bundle)")
            parsed.append((r, units, durs))
        self.items = []
        for r, units, durs in parsed:
            frames = torch.repeat_interleave(units, durs)
            audio = read_audio(manifest.parent / r["audio"], sample_rate)
            n = min(len(frames), len(audio) // hop)
            if n >= segment_frames:
                self.items.append((frames[:n], audio[: n * hop], units, durs))
        if not self.items:
            raise ValueError(f"{manifest}: no utterance is {segment_frames} frames long")
        self.hop, self.seg = hop, segment_frames

    def batch(self, B: int, rng: random.Random) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
        frames, audio, dur = [], [], []
        for _ in range(B):
            f, a, u, d = self.items[rng.randrange(len(self.items))]
            s = rng.randrange(len(f) - self.seg + 1)
            frames.append(f[s : s + self.seg])
            audio.append(a[s * self.hop : (s + self.seg) * self.hop])
            dur.append((u, d))
        return torch.stack(frames), torch.stack(audio), dur


def gan_losses(d_real, d_fake) -> Tensor:
    return sum(torch.mean((1 - r) ** 2) + torch.mean(f**2) for (r, _), (f, _) in zip(d_real, d_fake))


class VocoderTrainer:
    def __init__(self, model: CodeHiFiGAN, cfg: VocoderTrainConfig, out_dir: str | Path, device="cpu", progress: bool = True):
        self.model, self.cfg, self.out = model.to(device), cfg, Path(out_dir)
        self.device = torch.device(device)
        self.disc = Discriminators(cfg.disc_width).to(self.device)
        self.mel = LogMel(model.cfg.sample_rate).to(self.device)
        self.opt_g = torch.optim.AdamW(model.parameters(), cfg.lr, betas=(0.8, 0.99))
        self.opt_d = torch.optim.AdamW(self.disc.parameters(), cfg.lr, betas=(0.8, 0.99))
        self.step, self.history, self.progress = 0, [], progress
        self.rng = random.Random(cfg.seed)

    def duration_loss(self, dur: list[tuple[Tensor, Tensor]]) -> Tensor:
        if self.model.dur_predictor is None:
            return torch.zeros((), device=self.device)
        losses = []
        for units, d in dur:
            pred = self.model.dur_predictor(self.model.dict(units.to(self.device))[None])[0]
            losses.append(F.mse_loss(pred, torch.log1p(d.float().to(self.device))))
        return torch.stack(losses).mean()

    def train_step(self, data: VocoderData) -> dict:
        frames, audio, dur = data.batch(self.cfg.batch_size, self.rng)
        frames, audio = frames.to(self.device), audio.to(self.device)
        self.model.train()
        lr = self.cfg.lr * self.cfg.lr_decay ** (self.step / 1000)
        for opt in (self.opt_g, self.opt_d):
            for g in opt.param_groups:
                g["lr"] = lr
        amp = dict(device_type="cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with torch.autocast(**amp):
            fake = self.model.generate(frames).float()
        mel = F.l1_loss(self.mel(fake), self.mel(audio))
        dur_loss = self.duration_loss(dur)
        if self.step < self.cfg.mel_warmup:
            adv = d_loss = torch.zeros((), device=self.device)
            g_loss = self.cfg.mel_weight * mel + dur_loss
        else:
            with torch.autocast(**amp):  # discriminators: real vs (detached) generated
                d_loss = gan_losses(self.disc(audio), self.disc(fake.detach()))
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
            with torch.autocast(**amp):
                d_real, d_fake = self.disc(audio), self.disc(fake)
                adv = sum(torch.mean((1 - f) ** 2) for f, _ in d_fake)
                fm = sum(F.l1_loss(b, a.detach()) for (_, fa), (_, fb) in zip(d_real, d_fake) for a, b in zip(fa, fb))
            g_loss = adv + self.cfg.fm_weight * fm + self.cfg.mel_weight * mel + dur_loss
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()
        self.step += 1
        return {"step": self.step, **{k: float(v.detach()) for k, v in (("mel", mel), ("dur", dur_loss), ("adv", adv), ("disc", d_loss))}}

    def fit(self, data: VocoderData) -> list[dict]:
        with Progress("vocoder", self.cfg.steps, self.step, enabled=self.progress, mel=float("nan")) as bar:
            while self.step < self.cfg.steps:
                logs = self.train_step(data)
                bar.update(self.step, mel=logs["mel"])
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                    self.history.append(logs)
                if self.step % self.cfg.save_every == 0 or self.step == self.cfg.steps:
                    self.save()
        return self.history

    def save(self) -> None:
        """Each file written under a temporary name and renamed over the last (a kill mid-save leaves the previous
        one whole), the state last."""
        self.out.mkdir(parents=True, exist_ok=True)
        generator = {k: v.detach().float().cpu().contiguous() for k, v in self.model.state_dict().items()}
        write_atomic(self.out / "vocoder.safetensors", lambda f: save_file(generator, f))
        disc = {k: v.detach().cpu().contiguous() for k, v in self.disc.state_dict().items()}
        write_atomic(self.out / "discriminators.safetensors", lambda f: save_file(disc, f))
        meta = json.dumps({"config": self.model.cfg.to_dict(), "train": asdict(self.cfg), "step": self.step}, indent=2)
        write_atomic(self.out / "vocoder.json", lambda f: Path(f).write_text(meta))
        state = {"step": self.step, "history": self.history, "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict()}
        write_atomic(self.out / "vocoder_state.pt", lambda f: torch.save(state, f))

    def resume(self) -> None:
        """Continue from OUT's state; ValueError (one line) when there is none or it is not of this vocoder's shape."""
        try:
            st = torch.load(self.out / "vocoder_state.pt", map_location=self.device, weights_only=True)
            weights = {m: load_file(str(self.out / f"{name}.safetensors"), device=str(self.device))
                       for m, name in ((self.model, "vocoder"), (self.disc, "discriminators"))}
        except (FileNotFoundError, OSError) as e:
            raise ValueError(f"{self.out}: no vocoder training state to resume ({e.strerror or e})") from None
        for m, w in weights.items():
            diff = shape_difference({k: tuple(v.shape) for k, v in m.state_dict().items()}, {k: tuple(v.shape) for k, v in w.items()}, "state")
            if diff is not None:
                raise ValueError(f"{self.out}: its state is of a vocoder of other sizes than this command's (--width, --disc-width, "
                                 f"the bundle's units: {diff}); resume with the same options, or start anew in another --out")
            m.load_state_dict(w)
        self.opt_g.load_state_dict(st["opt_g"])
        self.opt_d.load_state_dict(st["opt_d"])
        self.step, self.history = st["step"], st["history"]
        self.rng = random.Random(self.cfg.seed * 1_000_003 + self.step)


def new_vocoder(num_units: int, width: int = 128, sample_rate: int = 16000) -> CodeHiFiGAN:
    """A small CodeHiFiGAN (hop 320) for `num_units` units."""
    from ..models.vocoder import DurationConfig

    return CodeHiFiGAN(VocoderConfig(num_embeddings=num_units, embedding_dim=width, model_in_dim=width,
                                     upsample_initial_channel=2 * width, dur_predictor_params=DurationConfig(width, width),
                                     sample_rate=sample_rate))
