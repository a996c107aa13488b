"""CodeHiFiGAN unit vocoder (fairseq layout) and exact chunked synthesis.

units [N] -> embedding `dict` -> duration predictor (frames per unit) -> repeat -> HiFi-GAN:
conv_pre(k7) -> per stage: leaky 0.1, transposed conv (x rate), mean of the stage's resblocks
-> leaky 0.01 -> conv_post(k7) -> tanh. One frame = hop = prod(upsample_rates) samples (320: 20 ms).

All convolutions are non-causal with "same" padding, so an output sample depends on a bounded
window of frames (`frame_context`) and a duration on a bounded window of units.
`pipeline.streams.VocoderStream` synthesises each new chunk from just that window and trims the
edges: the concatenated chunks equal whole-utterance synthesis, and each chunk costs
O(chunk + context), never O(everything so far). Padded batches with lengths give every row what it
gives alone (each conv sees zeros past its row's end, like its own zero padding).
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

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x [B, C, T]; mask [B, 1, T] (a padded batch): every conv sees zeros past its row's end,
        as the conv's own zero padding does at the end of an unpadded row."""
        m = (lambda h: h) if mask is None else (lambda h: h * mask)
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + m(c2(m(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))))
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

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x [B, N, C] -> [B, N]; mask [B, N, 1] zeroes what each conv sees past its row's end."""
        m = (lambda h: h) if mask is None else (lambda h: h * mask)
        x = self.drop(self.ln1(self.conv1(m(x).transpose(1, 2)).transpose(1, 2)))
        x = self.drop(self.ln2(self.conv2(m(x).transpose(1, 2)).transpose(1, 2)))
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

    def durations(self, units: Tensor, lengths: Tensor | None = None) -> Tensor:
        """units [N] -> frames per unit [N] (fairseq: clamp(round(exp(x) - 1), min=1)); 1 each without
        a predictor. A right-padded batch [B, N] with lengths [B] gives each row's own durations."""
        if self.dur_predictor is None:
            return torch.ones_like(units)
        x = self.dict(units.view(-1, units.shape[-1]))
        mask = None if lengths is None else (torch.arange(x.shape[1], device=x.device)[None] < lengths[:, None])[..., None].to(x.dtype)
        log_dur = self.dur_predictor(x, mask)
        dur = torch.clamp(torch.round(torch.exp(log_dur) - 1).long(), min=1)
        return dur[0] if units.dim() == 1 else dur

    def generate(self, frames: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Unit id per frame [F] -> waveform [F * hop]; or a batch [B, F] -> [B, F * hop].
        lengths [B]: valid frames per row of a right-padded batch; row b's first lengths[b] * hop
        samples then equal that row synthesised alone (the rest is zero)."""
        x = self.dict(frames.view(-1, frames.shape[-1])).transpose(1, 2)  # [B, C, F]
        mask = None
        if lengths is not None:
            mask = (torch.arange(x.shape[-1], device=x.device)[None] < lengths[:, None])[:, None].to(x.dtype)
        m = (lambda h: h) if mask is None else (lambda h: h * mask)
        x = m(self.conv_pre(m(x)))
        nk = len(self.cfg.resblock_kernel_sizes)
        for i, (up, u) in enumerate(zip(self.ups, self.cfg.upsample_rates)):
            if mask is not None:
                mask = mask.repeat_interleave(u, dim=-1)
            x = m(up(F.leaky_relu(x, LRELU_SLOPE)))
            x = sum(self.resblocks[i * nk + j](x, mask) for j in range(nk)) / nk
        wave = m(torch.tanh(self.conv_post(F.leaky_relu(x))))[:, 0]
        return wave[0] if frames.dim() == 1 else wave

    def forward(self, units: Tensor) -> Tensor:
        """Whole-utterance synthesis: de-duplicated units [N] -> waveform [sum(durations) * hop]."""
        check_units(units, self.cfg.num_embeddings)
        return self.generate(torch.repeat_interleave(units, self.durations(units)))


def check_units(units: Tensor, num_units: int) -> None:
    if units.dim() != 1 or units.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"units must be a 1-D integer tensor, got {units.dtype} {tuple(units.shape)}")
    if units.numel():
        lo, hi = (int(x) for x in torch.aminmax(units))  # (one pass: a check per session and tick)
        if lo < 0 or hi >= num_units:
            raise ValueError(f"units must lie in 0..{num_units - 1}, got {lo}..{hi}")
