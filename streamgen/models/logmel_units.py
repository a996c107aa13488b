"""Log-mel k-means units: a unit encoder with no network, which keeps the phonetics frame by frame.

Frame i (one unit every `hop` samples, 20 ms at 16 kHz) describes samples [i*hop, (i+1)*hop): a
Hann window of `win` samples centred on that span, zero samples outside the audio,

    x_i    = wave[i*hop + hop/2 - win/2 : i*hop + hop/2 + win/2] * hann
    f_i    = log(max(mel @ |rfft(x_i)|, 1e-5))                      (n_mels log-mel energies)
    unit_i = argmin_k |(f_i - mean) / std - c_k|^2                 (k-means on standardised features)

With `cmn_prior_frames` = n0 > 0, each frame's log-mel first loses a running mean of its utterance
(cepstral mean normalisation, causal so that it streams), which takes speaker and channel out of the
units (bench/QUALITY.md, "Speaker-normalised units"):

    m_i    = (n0 * prior + sum_{j <= i} f_j) / (n0 + i + 1)           (prior: the training mean log-mel)
    f'_i   = f_i - m_i

and with `cvn` also a running standard deviation per band (mean and variance normalisation), its
prior the training log-mel's second moment:

    s_i    = (n0 * prior_sq + sum_{j <= i} f_j^2) / (n0 + i + 1)
    f'_i   = (f_i - m_i) / sqrt(max(s_i - m_i^2, 1e-6))

The sums are kept in fixed point (q = f * 2^16 rounded; sum q and sum q^2 in int64, exact in any
order), so a stream that carries them from chunk to chunk gets the same numbers as the whole utterance.

A wave of T samples has T // hop frames. Frame i needs samples up to (i+1)*hop + (win-hop)/2, so
`pipeline.streams.LogMelUnitStream` gives every unit as soon as that much audio is in, and at the end pads with zeros
exactly as whole-utterance encoding does: streamed units equal `LogMelUnits.forward`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .kmeans import KMeansQuantizer, dedup
from .tables import table


CMN_SCALE = 2**16  # fixed point of the running sums


class NormState(NamedTuple):
    """Running statistics of an utterance's log-mel so far: frames, sum and sum of squares (fixed point)."""
    count: int
    total: Tensor  # [n_mels] int64, sum of round(f * CMN_SCALE)
    total_sq: Tensor  # [n_mels] int64, sum of its squares (kept with cvn only; room for 80 hours of frames)


@dataclass(frozen=True)
class LogMelUnitsConfig:
    num_units: int = 500
    n_mels: int = 80
    hop: int = 320
    win: int = 640
    sample_rate: int = 16000
    cmn_prior_frames: int = 0  # > 0: remove a running mean with this many frames of prior (0: none)
    cvn: bool = False  # with cmn_prior_frames: also divide by a running standard deviation

    def __post_init__(self):
        if self.cmn_prior_frames < 0:
            raise ValueError(f"cmn_prior_frames must be at least 0, got {self.cmn_prior_frames}")
        if self.cvn and not self.cmn_prior_frames:
            raise ValueError("cvn (running variance normalisation) needs cmn_prior_frames > 0: its prior frames")
        if self.win < self.hop or (self.win - self.hop) % 2:
            raise ValueError(f"win {self.win} must be at least hop {self.hop} and differ from it by an even number")

    @property
    def pad(self) -> int:
        """Samples the window reaches beyond its frame's span, on each side."""
        return (self.win - self.hop) // 2

    def num_frames(self, n_samples: int) -> int:
        return n_samples // self.hop

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, cfg: dict) -> LogMelUnitsConfig:
        return cls(**cfg)


def mel_filterbank(n_fft: int, n_mels: int, rate: int) -> Tensor:
    """Triangular filters on the HTK mel scale, 0 Hz to Nyquist: [n_mels, n_fft // 2 + 1]."""
    mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)
    hz = lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)
    points = torch.tensor([hz(m) for m in torch.linspace(0.0, mel(rate / 2), n_mels + 2).tolist()])
    freqs = torch.linspace(0, rate / 2, n_fft // 2 + 1)
    lo, mid, hi = points[:-2, None], points[1:-1, None], points[2:, None]
    return torch.clamp(torch.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), min=0.0)


class LogMelUnits(nn.Module):
    def __init__(self, cfg: LogMelUnitsConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.zeros(cfg.n_mels))
        self.register_buffer("std", torch.ones(cfg.n_mels))
        if cfg.cmn_prior_frames:
            self.register_buffer("prior", torch.zeros(cfg.n_mels))  # the training mean log-mel
        if cfg.cvn:
            self.register_buffer("prior_sq", torch.ones(cfg.n_mels))  # its mean square
        self.quantizer = KMeansQuantizer(torch.zeros(cfg.num_units, cfg.n_mels))
        self.register_buffer("fb", table(lambda: mel_filterbank(cfg.win, cfg.n_mels, cfg.sample_rate)), persistent=False)
        self.register_buffer("window", table(lambda: torch.hann_window(cfg.win, periodic=True)), persistent=False)

    @property
    def num_units(self) -> int:
        return self.cfg.num_units

    def set_codebook(self, mean: Tensor, std: Tensor, centroids: Tensor, prior: Tensor | None = None,
                     prior_sq: Tensor | None = None) -> None:
        """Install the standardisation and the k-means centroids (in standardised units), and with
        running normalisation the prior mean log-mel (and with `cvn` its prior mean square)."""
        if centroids.shape != (self.cfg.num_units, self.cfg.n_mels):
            raise ValueError(f"centroids must be [{self.cfg.num_units}, {self.cfg.n_mels}], got {tuple(centroids.shape)}")
        if (prior is not None) != bool(self.cfg.cmn_prior_frames):
            raise ValueError("a prior mean log-mel goes with cmn_prior_frames > 0, and only then")
        if (prior_sq is not None) != self.cfg.cvn:
            raise ValueError("a prior mean square log-mel goes with cvn, and only then")
        if prior is not None:
            self.prior.copy_(prior)
        if prior_sq is not None:
            self.prior_sq.copy_(prior_sq)
        self.mean.copy_(mean)
        self.std.copy_(std)
        self.quantizer.centroids.copy_(centroids)

    def frame_features(self, padded: Tensor, n_frames: int) -> Tensor:
        """Log-mel of frames 0..n_frames-1 of `padded` ([..., S] samples, its sample 0 = frame 0's window
        start): [..., F, n_mels]."""
        c = self.cfg
        frames = padded.unfold(-1, c.win, c.hop)[..., :n_frames, :] * self.window
        return torch.log(torch.clamp(torch.fft.rfft(frames).abs() @ self.fb.T, min=1e-5))

    def features(self, wave: Tensor) -> Tensor:
        """wave [..., T] -> log-mel features [..., T // hop, n_mels]."""
        c = self.cfg
        n = c.num_frames(wave.shape[-1])
        padded = torch.nn.functional.pad(wave.float(), (c.pad, max(0, n * c.hop + c.pad - wave.shape[-1])))
        return self.frame_features(padded, n)

    def standardise(self, feats: Tensor) -> Tensor:
        """Log-mel frames [..., n_mels] -> the same in the training set's standard units (what the
        k-means centroids live in)."""
        return (feats - self.mean) / self.std

    def quantize(self, feats: Tensor) -> Tensor:
        return self.quantizer(self.standardise(feats))

    def quiet_units(self, below_dbfs: float = -50.0) -> Tensor | None:
        """Which units [num_units] (bool) carry no more energy than white noise of RMS `below_dbfs`
        (re full scale 1.0): what pauses are made of, whatever the noise floor (silence maps to
        several such units, not one). None with running normalisation: its centroids have lost the level."""
        if self.normalises:
            return None
        noise = torch.randn(self.cfg.sample_rate, generator=torch.Generator().manual_seed(0)) * 10 ** (below_dbfs / 20)
        level = torch.logsumexp(self.features(noise.to(self.fb.device)), dim=1).mean()
        centroids = self.quantizer.centroids * self.std + self.mean
        return (torch.logsumexp(centroids, dim=1) <= level).cpu()

    @property
    def normalises(self) -> bool:
        """Whether frames lose running statistics of their utterance before quantisation."""
        return bool(self.cfg.cmn_prior_frames)

    def start_norm(self) -> NormState:
        """The running statistics before an utterance's first frame."""
        zeros = torch.zeros(self.cfg.n_mels, dtype=torch.long, device=self.mean.device)
        return NormState(0, zeros, zeros)

    def normalise(self, feats: Tensor, state: NormState) -> tuple[Tensor, NormState]:
        """Log-mel frames [F, n_mels] following `state` -> (the frames less the running mean, and with
        `cvn` over the running standard deviation; the state after them)."""
        q = torch.round(feats.double() * CMN_SCALE).long()
        sums = state.total + torch.cumsum(q, 0)
        n0 = self.cfg.cmn_prior_frames
        n = n0 + state.count + torch.arange(1, len(feats) + 1, dtype=torch.float64, device=feats.device)[:, None]
        mean = (n0 * self.prior.double() + sums.double() / CMN_SCALE) / n
        out = feats.double() - mean
        sums_sq = state.total_sq
        if self.cfg.cvn:
            sums_sq = state.total_sq + torch.cumsum(q * q, 0)
            second = (n0 * self.prior_sq.double() + sums_sq.double() / CMN_SCALE**2) / n
            out = out / (second - mean * mean).clamp_min(1e-6).sqrt()
        if not len(feats):
            return out.float(), state
        return out.float(), NormState(state.count + len(feats), sums[-1], sums_sq[-1] if self.cfg.cvn else state.total_sq)

    def normalise_utterance(self, feats: Tensor) -> Tensor:
        """An utterance's log-mel frames [F, n_mels] from its start, normalised (`normalise` from
        `start_norm`: what the stream computes chunk by chunk)."""
        return self.normalise(feats, self.start_norm())[0]

    def units_of(self, feats: Tensor) -> Tensor:
        """An utterance's log-mel frames [F, n_mels] (`features`) -> one unit per frame [F] (long)."""
        if self.normalises:
            feats = self.normalise_utterance(feats)
        return self.quantize(feats)

    def forward(self, wave: Tensor) -> Tensor:
        """wave [T] -> one unit per frame [T // hop] (long)."""
        return self.units_of(self.features(wave))

    def encode(self, wave: Tensor) -> tuple[Tensor, Tensor]:
        """wave [T] -> (de-duplicated units, frames per unit)."""
        return dedup(self(wave))


def running_normaliser(prior: Tensor, prior_sq: Tensor | None = None, prior_frames: int = 100) -> LogMelUnits:
    """A front-end whose `normalise` takes each frame less the running mean of its utterance (and,
    given `prior_sq`, over the running standard deviation), starting from `prior_frames` frames at the
    prior mean (and second moment): the normalisation a `LogMelUnits` with `cmn_prior_frames` and
    `cvn` applies, without a codebook."""
    enc = LogMelUnits(LogMelUnitsConfig(n_mels=len(prior), cmn_prior_frames=prior_frames, cvn=prior_sq is not None))
    enc.prior.copy_(prior)
    if prior_sq is not None:
        enc.prior_sq.copy_(prior_sq)
    return enc
