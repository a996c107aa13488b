"""CodeHiFiGAN unit vocoder (fairseq layout) and exact chunked synthesis.

units [N] -> embedding `dict` -> duration predictor (frames per unit) -> repeat -> HiFi-GAN:
conv_pre(k7) -> per stage: leaky 0.1, transposed conv (x rate), mean of the stage's resblocks
-> leaky 0.01 -> conv_post(k7) -> tanh. One frame = hop = prod(upsample_rates) samples (320: 20 ms).

All convolutions are non-causal with "same" padding, so an output sample depends on a bounded
window of frames (`frame_context`) and a duration on a bounded window of units. `VocoderStream`
synthesises each new chunk from just that window and trims the edges: the concatenated chunks equal
whole-utterance synthesis, and each chunk costs O(chunk + context), never O(everything so far).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LRELU_SLOPE = 0.1


@dataclass(frozen=True)
class DurationConfig:
    encoder_embed_dim: int = 128
    var_pred_hidden_dim: int = 128
    var_pred_kernel_size: int = 3
    var_pred_dropout: float = 0.5


@dataclass(frozen=True)
class VocoderConfig:
    num_embeddings: int = 1000
    embedding_dim: int = 128
    model_in_dim: int = 128
    upsample_rates: tuple[int, ...] = (5, 4, 4, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (11, 8, 8, 4, 4)
    upsample_initial_channel: int = 512
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5),) * 3
    dur_predictor_params: DurationConfig | None = field(default_factory=DurationConfig)
    sample_rate: int = 16000

    def __post_init__(self):
        if self.model_in_dim != self.embedding_dim:
            raise ValueError(
                f"model_in_dim {self.model_in_dim} != embedding_dim {self.embedding_dim}: "
                "that needs speaker or f0 inputs, which streamgen's vocoder does not take"
            )
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ValueError("upsample_rates and upsample_kernel_sizes differ in length")
        for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes):
            if (k - u) % 2:
                raise ValueError(f"upsample kernel {k} with rate {u}: (k - u) must be even for exact x{u} upsampling")
        if any(k % 2 == 0 for k in self.resblock_kernel_sizes):
            raise ValueError(f"resblock kernel sizes must be odd, got {self.resblock_kernel_sizes}")
        d = self.dur_predictor_params
        if d is not None and d.var_pred_kernel_size != 3:
            # fairseq pads the second conv by 1 whatever the kernel: only k=3 keeps one duration per unit
            raise ValueError(f"var_pred_kernel_size {d.var_pred_kernel_size} is not supported (fairseq's layer needs 3)")

    @property
    def hop(self) -> int:
        return math.prod(self.upsample_rates)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, cfg: dict) -> VocoderConfig:
        """From a streamgen bundle config or a fairseq/speech-resynthesis `config.json`."""
        for key in ("multispkr", "f0", "embedder_params"):
            if cfg.get(key):
                raise ValueError(f"vocoder config sets `{key}`: speaker/f0-conditioned vocoders are not supported")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in cfg.items() if k in names}
        for k in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes"):
            if k in kw:
                kw[k] = tuple(kw[k])
        if "resblock_dilation_sizes" in kw:
            kw["resblock_dilation_sizes"] = tuple(tuple(d) for d in kw["resblock_dilation_sizes"])
        dur = cfg.get("dur_predictor_params")
        kw["dur_predictor_params"] = DurationConfig(**{k: dur[k] for k in asdict(DurationConfig()) if k in dur}) if dur else None
        if "sampling_rate" in cfg and "sample_rate" not in cfg:
            kw["sample_rate"] = cfg["sampling_rate"]
        return cls(**kw)


class ResBlock(nn.Module):
    def __init__(self, ch: int, k: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(ch, ch, k, dilation=d, padding=d * (k - 1) // 2) for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(ch, ch, k, padding=(k - 1) // 2) for _ in dilations)
        self.radius = sum(d * (k - 1) // 2 + (k - 1) // 2 for d in dilations)  # samples each side

    def forward(self, x: Tensor) -> Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class DurationPredictor(nn.Module):
    """(conv -> ReLU -> LayerNorm -> dropout) x 2 -> linear: log(1 + frames) per unit."""

    def __init__(self, cfg: DurationConfig):
        super().__init__()
        k, h = cfg.var_pred_kernel_size, cfg.var_pred_hidden_dim
        self.conv1 = nn.Sequential(nn.Conv1d(cfg.encoder_embed_dim, h, k, padding=(k - 1) // 2), nn.ReLU())
        self.ln1 = nn.LayerNorm(h)
        self.conv2 = nn.Sequential(nn.Conv1d(h, h, k, padding=(k - 1) // 2), nn.ReLU())
        self.ln2 = nn.LayerNorm(h)
        self.proj = nn.Linear(h, 1)
        self.drop = nn.Dropout(cfg.var_pred_dropout)
        self.radius = 2 * ((k - 1) // 2)  # units each side that one prediction depends on

    def forward(self, x: Tensor) -> Tensor:  # x [B, N, C] -> [B, N]
        x = self.drop(self.ln1(self.conv1(x.transpose(1, 2)).transpose(1, 2)))
        x = self.drop(self.ln2(self.conv2(x.transpose(1, 2)).transpose(1, 2)))
        return self.proj(x)[..., 0]


class CodeHiFiGAN(nn.Module):
    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        self.cfg = cfg
        self.dict = nn.Embedding(cfg.num_embeddings, cfg.embedding_dim)
        self.dur_predictor = DurationPredictor(cfg.dur_predictor_params) if cfg.dur_predictor_params else None
        ch = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.model_in_dim, ch, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            c_in, c_out = ch // 2**i, ch // 2 ** (i + 1)
            self.ups.append(nn.ConvTranspose1d(c_in, c_out, k, u, padding=(k - u) // 2))
            for rk, rd in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(ResBlock(c_out, rk, rd))
        self.conv_post = nn.Conv1d(c_out, 1, 7, padding=3)

    @property
    def hop(self) -> int:
        return self.cfg.hop

    def frame_context(self) -> int:
        """Frames each side of a frame that its output samples can depend on (an upper bound),
        walking back from the output through every convolution's reach."""
        nk = len(self.cfg.resblock_kernel_sizes)
        r = 3  # conv_post, in output samples
        for i in reversed(range(len(self.ups))):
            r += max(b.radius for b in self.resblocks[i * nk : (i + 1) * nk])
            u, k = self.cfg.upsample_rates[i], self.cfg.upsample_kernel_sizes[i]
            r = -(-(r + k) // u) + 1  # through the transposed conv, back to its input rate
        return r + 3  # conv_pre

    def durations(self, units: Tensor) -> Tensor:
        """units [N] -> frames per unit [N] (fairseq: clamp(round(exp(x) - 1), min=1)); 1 each without a predictor."""
        if self.dur_predictor is None:
            return torch.ones_like(units)
        log_dur = self.dur_predictor(self.dict(units)[None])[0]
        return torch.clamp(torch.round(torch.exp(log_dur) - 1).long(), min=1)

    def generate(self, frames: Tensor) -> Tensor:
        """Unit id per frame [F] -> waveform [F * hop]; or a batch [B, F] -> [B, F * hop]."""
        x = self.conv_pre(self.dict(frames.view(-1, frames.shape[-1])).transpose(1, 2))
        nk = len(self.cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            x = sum(self.resblocks[i * nk + j](x) for j in range(nk)) / nk
        wave = torch.tanh(self.conv_post(F.leaky_relu(x)))[:, 0]
        return wave[0] if frames.dim() == 1 else wave

    def forward(self, units: Tensor) -> Tensor:
        """Whole-utterance synthesis: de-duplicated units [N] -> waveform [sum(durations) * hop]."""
        check_units(units, self.cfg.num_embeddings)
        return self.generate(torch.repeat_interleave(units, self.durations(units)))


def check_units(units: Tensor, num_units: int) -> None:
    if units.dim() != 1 or units.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"units must be a 1-D integer tensor, got {units.dtype} {tuple(units.shape)}")
    if units.numel() and (int(units.min()) < 0 or int(units.max()) >= num_units):
        raise ValueError(f"units must lie in 0..{num_units - 1}, got {int(units.min())}..{int(units.max())}")


class VocoderStream:
    """Synthesise units as they arrive, in chunks that concatenate to `CodeHiFiGAN.forward(all units)`.

    A unit's duration is final once `dur_predictor.radius` later units are known; a frame's audio once
    `lookahead` later frames are known. With `lookahead` = `frame_context()` (default) the output is
    exact; a smaller look-ahead trades exactness at chunk edges for latency. Memory stays bounded:
    only the context windows are kept.
    """

    def __init__(self, model: CodeHiFiGAN, lookahead: int | None = None):
        self.model = model
        self.context = model.frame_context()
        self.lookahead = self.context if lookahead is None else lookahead
        self.unit_radius = model.dur_predictor.radius if model.dur_predictor is not None else 0
        p = model.dict.weight.device
        self.units = torch.empty(0, dtype=torch.long, device=p)  # units from absolute index u0
        self.u0 = 0
        self.n_units = 0  # units received
        self.n_timed = 0  # units whose durations are final
        self.frames = torch.empty(0, dtype=torch.long, device=p)  # frame unit ids from absolute frame f0
        self.f0 = 0
        self.n_frames = 0
        self.emitted = 0  # frames whose audio has been returned

    @torch.no_grad()
    def push(self, units: Tensor) -> Tensor:
        """Add units [n]; return the audio that is now final (possibly empty)."""
        check_units(units, self.model.cfg.num_embeddings)
        self.units = torch.cat([self.units, units.to(self.units.device).long()])
        self.n_units += units.numel()
        self._time(self.n_units - self.unit_radius)
        return self._emit(self.n_frames - self.lookahead)

    @torch.no_grad()
    def flush(self) -> Tensor:
        """End of stream: return all remaining audio."""
        self._time(self.n_units)
        return self._emit(self.n_frames)

    def _time(self, end: int) -> None:
        """Fix durations of units [n_timed, end) and append their frames."""
        a = self.n_timed
        if end <= a:
            return
        r = self.unit_radius
        lo, hi = max(0, a - r), min(self.n_units, end + r)
        window = self.units[lo - self.u0 : hi - self.u0]
        dur = self.model.durations(window)[a - lo : end - lo]
        new = torch.repeat_interleave(window[a - lo : end - lo], dur)
        self.frames = torch.cat([self.frames, new])
        self.n_frames += new.numel()
        self.n_timed = end
        keep = max(0, end - r)  # left context the next window needs
        self.units, self.u0 = self.units[keep - self.u0 :], keep

    def _emit(self, end: int) -> Tensor:
        """Audio of frames [emitted, end)."""
        a = self.emitted
        if end <= a:
            return torch.empty(0, device=self.frames.device)
        lo, hi = max(0, a - self.context), min(self.n_frames, end + self.lookahead)
        wave = self.model.generate(self.frames[lo - self.f0 : hi - self.f0])
        hop = self.model.hop
        out = wave[(a - lo) * hop : (end - lo) * hop]
        self.emitted = end
        keep = max(0, end - self.context)
        self.frames, self.f0 = self.frames[keep - self.f0 :], keep
        return out
