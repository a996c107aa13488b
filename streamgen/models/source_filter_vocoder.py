"""Source-filter unit vocoder: a frame-rate network predicts F0, voicing, a spectral envelope and
aperiodicity; harmonic-plus-noise synthesis in torch makes the waveform (DDSP / neural homomorphic
vocoder style). The network never produces samples, so spectral losses alone make it intelligible.

units [N] -> durations (frames per unit) -> unit id per 20 ms frame -> embedding -> residual conv
stack -> per parameter frame (`sub` per unit frame, `h` = hop / sub samples apart):

    f0       = exp(log_f0)                          Hz
    v        = sigmoid(voicing logit)               probability the frame is voiced
    E(f)     = exp(envelope), piecewise linear in log-magnitude on a mel-spaced grid of `bands` points
    a(f)     = sigmoid(aperiodicity logit), on the same grid
    p(f)     = v * (1 - a(f))                       the periodic share of the energy at f

Synthesis on the parameter sequence P'_0..P'_M (the frames with the first and last repeated): segment
s (h samples) lies between P'_s and P'_{s+1}, whose values it interpolates linearly, so

    harmonics  x_h(n) = sum_k A_k(n) sin(k phi(n)),  A_k(n) linear across the segment,  A_k = E(k f0) sqrt(p(k f0)) sqrt(2 f0 / (sr / 2)),  k f0 < sr / 2
               phi(n) = phi(segment start) + sum of 2 pi f0(m) / sr over the segment's earlier samples
    noise      x_n    = overlap-add (Hann, 2h long, one per P'_m centred on segment boundary m) of
                        white noise z filtered by E(f) sqrt(1 - p(f))
    output     x_h + x_n, without the first and last h/2 samples (the repeated frames' halves)

E is relative to unit-variance white noise: a harmonic of amplitude A carries the power that E gives
a band f0 wide. Segment phases are accumulated as 32-bit fixed-point turns (exact integer sums in any
order) and the noise is a hash of the absolute sample index, so `SourceFilterStream` (chunks carry
the phase) equals whole-utterance synthesis.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vocoder import DurationConfig, DurationPredictor, check_units

TURN = 2**32  # fixed-point phase: one turn


@dataclass(frozen=True)
class SourceFilterConfig:
    num_units: int = 500
    dim: int = 192  # unit embedding and conv width
    layers: int = 6
    kernel: int = 5
    hop: int = 320  # samples per unit frame
    sub: int = 2  # parameter frames per unit frame
    bands: int = 48  # envelope / aperiodicity grid points (mel-spaced, 0 Hz .. sr / 2)
    harmonics: int = 80
    f0_ref: float = 120.0  # log_f0 is predicted around log(f0_ref)
    dur_predictor_params: DurationConfig | None = field(default_factory=lambda: DurationConfig(192, 192))
    sample_rate: int = 16000

    def __post_init__(self):
        if self.hop % (2 * self.sub):
            raise ValueError(f"hop {self.hop} must split into {self.sub} parameter frames of an even number of samples")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel {self.kernel} must be odd")

    @property
    def h(self) -> int:
        return self.hop // self.sub

    @property
    def n_params(self) -> int:
        return 2 + 2 * self.bands

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, cfg: dict) -> SourceFilterConfig:
        kw = dict(cfg)
        dur = kw.get("dur_predictor_params")
        kw["dur_predictor_params"] = DurationConfig(**dur) if dur else None
        return cls(**kw)


def hash_noise(index: Tensor) -> Tensor:
    """Deterministic white noise of unit variance at integer sample indices (any shape, int64)."""
    x = (index * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) & 0xFFFFFFFF
    x = ((x ^ (x >> 13)) * 0xC2B2AE35) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    return (x.double() / TURN * 2.0 - 1.0).float() * math.sqrt(3.0)


class Block(nn.Module):
    """x + conv1x1(GELU(conv_k(LayerNorm(x)))): each layer sees (kernel - 1) / 2 frames each side."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2)
        self.mix = nn.Conv1d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, F]
        return x + self.mix(F.gelu(self.conv(self.norm(x.transpose(1, 2)).transpose(1, 2))))


class SourceFilterVocoder(nn.Module):
    def __init__(self, cfg: SourceFilterConfig):
        super().__init__()
        self.cfg = cfg
        self.dict = nn.Embedding(cfg.num_units, cfg.dim)
        self.dur_predictor = DurationPredictor(cfg.dur_predictor_params) if cfg.dur_predictor_params else None
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.kernel) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.sub * cfg.n_params)
        sr, h = cfg.sample_rate, cfg.h
        self.mel_top = 2595.0 * math.log10(1.0 + sr / 2 / 700.0)
        self.register_buffer("bins_pos", self.grid_position(torch.linspace(0, sr / 2, h + 1)), persistent=False)
        self.register_buffer("ramp", torch.arange(h, dtype=torch.float64) / h, persistent=False)
        self.register_buffer("window", torch.hann_window(2 * h, periodic=True), persistent=False)
        self.register_buffer("k", torch.arange(1, cfg.harmonics + 1, dtype=torch.float32), persistent=False)

    @property
    def hop(self) -> int:
        return self.cfg.hop

    def frame_context(self) -> int:
        """Unit frames each side that one frame's parameters depend on."""
        return self.cfg.layers * (self.cfg.kernel // 2)

    def grid_position(self, freq: Tensor) -> Tensor:
        """Frequencies (Hz) -> fractional index on the mel-spaced band grid."""
        return 2595.0 * torch.log10(1.0 + freq / 700.0) / self.mel_top * (self.cfg.bands - 1)

    # --- the network --------------------------------------------------------------------------

    def durations(self, units: Tensor) -> Tensor:
        if self.dur_predictor is None:
            return torch.ones_like(units)
        log_dur = self.dur_predictor(self.dict(units)[None])[0]
        return torch.clamp(torch.round(torch.exp(log_dur) - 1).long(), min=1)

    def params(self, frames: Tensor) -> Tensor:
        """Unit id per frame [B, F] -> raw parameters [B, F * sub, 2 + 2 * bands]:
        (log f0 offset, voicing logit, log envelope [bands], aperiodicity logit [bands])."""
        x = self.dict(frames).transpose(1, 2)
        for b in self.blocks:
            x = b(x)
        y = self.head(self.norm(x.transpose(1, 2)))
        B, n = frames.shape
        return y.view(B, n * self.cfg.sub, self.cfg.n_params)

    # --- synthesis ----------------------------------------------------------------------------

    def at(self, grid: Tensor, pos: Tensor) -> Tensor:
        """Linear interpolation of grid values [..., bands] at fractional positions pos [..., n]."""
        pos = pos.clamp(0, self.cfg.bands - 1)
        lo = pos.floor().long().clamp(max=self.cfg.bands - 2)
        w = pos - lo
        return torch.gather(grid, -1, lo) * (1 - w) + torch.gather(grid, -1, lo + 1) * w

    def render(self, p: Tensor, f0: Tensor, voiced: Tensor, s0: int = 0, turns0: int = 0) -> tuple[Tensor, int]:
        """Synthesise the segments between consecutive frames of a padded parameter sequence.

        p [B, M+1, n_params] raw parameters (only the envelope and aperiodicity are read), f0 [B, M+1]
        in Hz, voiced [B, M+1] in [0, 1]; s0 = absolute index of the first segment (noise position),
        turns0 = fixed-point phase at its start. Returns (samples [B, M * h], phase after the last
        segment, fixed point, for batch row 0)."""
        cfg, h = self.cfg, self.cfg.h
        sr = cfg.sample_rate
        env, ap = p[..., 2 : 2 + cfg.bands], torch.sigmoid(p[..., 2 + cfg.bands :])
        B, M1 = f0.shape
        M = M1 - 1
        # noise: one 2h-long filtered frame per parameter frame, centred on its segment boundary
        pos = self.bins_pos.expand(B, M1, -1)
        periodic_bins = voiced[..., None] * (1 - self.at(ap, pos))
        gain = torch.exp(self.at(env, pos)) * torch.sqrt((1 - periodic_bins).clamp(min=1e-6))
        idx = (torch.arange(M1, device=p.device)[:, None] + s0) * h - h + torch.arange(2 * h, device=p.device)
        z = hash_noise(idx)[None].expand(B, -1, -1)
        frames = torch.fft.irfft(torch.fft.rfft(z) * gain, n=2 * h) * self.window
        noise = (frames[:, :-1, h:] + frames[:, 1:, :h]).reshape(B, M * h)
        # harmonics: amplitudes per frame, interpolated across each segment with f0
        kf = f0[..., None] * self.k  # [B, M+1, K]
        periodic = voiced[..., None] * (1 - self.at(ap, self.grid_position(kf)))
        amp = torch.exp(self.at(env, self.grid_position(kf))) * torch.sqrt(periodic.clamp(min=1e-6) * 2 * f0[..., None] / (sr / 2))
        amp = amp * (kf < sr / 2)
        f0_n = f0[:, :-1, None].double() * (1 - self.ramp) + f0[:, 1:, None].double() * self.ramp  # [B, M, h]
        omega = 2 * math.pi * f0_n / sr
        within = torch.cumsum(omega, -1) - omega  # phase from the segment's start
        total = torch.round((within[..., -1] + omega[..., -1]) / (2 * math.pi) * TURN).long()  # [B, M]
        starts = (turns0 + torch.cumsum(total, -1) - total) % TURN
        phi = (starts.double() / TURN * 2 * math.pi)[..., None] + within
        waves = torch.sin(phi.float()[..., None] * self.k)  # [B, M, h, K]
        t = self.ramp.float()
        harm = ((1 - t) * (waves @ amp[:, :-1, :, None])[..., 0] + t * (waves @ amp[:, 1:, :, None])[..., 0]).reshape(B, M * h)
        end_turns = int((turns0 + total[0].sum()) % TURN) if M else turns0
        return harm + noise, end_turns

    def source(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """Predicted (f0 Hz, voicing probability) from raw parameters [..., n_params]."""
        return self.cfg.f0_ref * torch.exp(p[..., 0]), torch.sigmoid(p[..., 1])

    def synthesize(self, p: Tensor, f0: Tensor | None = None, voiced: Tensor | None = None) -> Tensor:
        """Whole sequences of parameter frames [B, P, n_params] -> waveform [B, P * h]. f0 / voiced
        [B, P] replace the predicted source (teacher forcing in training)."""
        pf0, pv = self.source(p)
        f0 = pf0 if f0 is None else f0
        voiced = pv if voiced is None else voiced
        pad = lambda x: torch.cat([x[:, :1], x, x[:, -1:]], 1)  # P'_0 = P_0 and P'_{P+1} = P_{P-1}
        wave, _ = self.render(pad(p), pad(f0), pad(voiced))
        h = self.cfg.h
        return wave[:, h // 2 : wave.shape[1] - h // 2]

    def generate(self, frames: Tensor) -> Tensor:
        """Unit id per frame [F] -> waveform [F * hop]."""
        return self.synthesize(self.params(frames[None]))[0]

    def forward(self, units: Tensor) -> Tensor:
        """Whole-utterance synthesis: de-duplicated units [N] -> waveform [sum(durations) * hop]."""
        check_units(units, self.cfg.num_units)
        return self.generate(torch.repeat_interleave(units, self.durations(units)))


class SourceFilterStream:
    """Synthesise units as they arrive; the concatenated chunks equal `SourceFilterVocoder.forward`.
    Same interface as `VocoderStream`: push(units) returns the audio that is now final, flush() the rest.

    A duration is final once `dur_predictor.radius` later units are known, a frame's parameters once
    `frame_context()` later frames are, and a segment's samples once the parameter frame after it is.
    """

    def __init__(self, model: SourceFilterVocoder):
        self.model = model
        self.context = model.frame_context()
        self.unit_radius = model.dur_predictor.radius if model.dur_predictor is not None else 0
        dev = model.dict.weight.device
        self.units = torch.empty(0, dtype=torch.long, device=dev)
        self.u0 = self.n_units = self.n_timed = 0
        self.frames = torch.empty(0, dtype=torch.long, device=dev)  # unit id per frame from absolute frame f0
        self.f0 = self.n_frames = self.n_param_frames = 0  # frames whose parameters are computed
        self.pending: Tensor | None = None  # padded parameter frames not yet past their last segment [1, m, n_params]
        self.segment = 0  # absolute index of pending's first segment
        self.turns = 0
        self.started = False

    @torch.no_grad()
    def push(self, units: Tensor) -> Tensor:
        check_units(units, self.model.cfg.num_units)
        self.units = torch.cat([self.units, units.to(self.units.device).long()])
        self.n_units += units.numel()
        self._time(self.n_units - self.unit_radius)
        self._params(self.n_frames - self.context)
        return self._render(final=False)

    @torch.no_grad()
    def flush(self) -> Tensor:
        self._time(self.n_units)
        self._params(self.n_frames)
        return self._render(final=True)

    def _time(self, end: int) -> None:
        a, r = self.n_timed, self.unit_radius
        if end <= a:
            return
        lo, hi = max(0, a - r), min(self.n_units, end + r)
        window = self.units[lo - self.u0 : hi - self.u0]
        new = torch.repeat_interleave(window[a - lo : end - lo], self.model.durations(window)[a - lo : end - lo])
        self.frames = torch.cat([self.frames, new])
        self.n_frames += new.numel()
        self.n_timed = end
        keep = max(0, end - r)
        self.units, self.u0 = self.units[keep - self.u0 :], keep

    def _params(self, end: int) -> None:
        a, c = self.n_param_frames, self.context
        if end <= a:
            return
        lo, hi = max(0, a - c), min(self.n_frames, end + c)
        p = self.model.params(self.frames[lo - self.f0 : hi - self.f0][None])[:, (a - lo) * self.model.cfg.sub : (end - lo) * self.model.cfg.sub]
        if self.pending is None:
            p = torch.cat([p[:, :1], p], 1)  # P'_0 = P_0
        self.pending = p if self.pending is None else torch.cat([self.pending, p], 1)
        self.n_param_frames = end
        keep = max(0, end - c)
        self.frames, self.f0 = self.frames[keep - self.f0 :], keep

    def _render(self, final: bool) -> Tensor:
        empty = torch.zeros(0, device=self.frames.device)
        if self.pending is None:
            return empty
        p = torch.cat([self.pending, self.pending[:, -1:]], 1) if final else self.pending  # P'_{P+1} = P_{P-1}
        if p.shape[1] < 2:
            return empty
        f0, voiced = self.model.source(p)
        wave, self.turns = self.model.render(p, f0, voiced, s0=self.segment, turns0=self.turns)
        wave = wave[0]
        h = self.model.cfg.h
        if not self.started:
            wave, self.started = wave[h // 2 :], True
        if final:
            wave = wave[: len(wave) - h // 2]
        self.segment += p.shape[1] - 1
        self.pending = p[:, -1:]
        return wave
