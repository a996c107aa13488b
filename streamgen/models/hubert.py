"""HuBERT / mHuBERT base encoder (fairseq layout), returning the features of one layer.

wave [B, T] at 16 kHz
  -> conv feature extractor (7 convs, GroupNorm on the first only, GELU)  [B, 512, F], F ~ T/320
  -> LayerNorm(512) -> post_extract_proj (only when 512 != d)              [B, F, d]
  -> + GELU(conv positional embedding, kernel 128, 16 groups, even kernel trimmed by one)
  -> LayerNorm -> post-norm transformer layers; "layer n" is the output of the n-th layer.

Padded batches: with `lengths` (valid samples per row) every row gives exactly what it gives alone.
Three places would otherwise see the padding: the first conv's GroupNorm (statistics over time,
taken here over the row's valid frames only), the positional conv (padded frames are zeroed, as the
conv's own zero padding does at the end of an unpadded row) and self-attention (padded keys masked).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Attention


def _base_conv_layers() -> list[tuple[int, int, int]]:
    return [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2


@dataclass(frozen=True)
class HubertConfig:
    conv_layers: list[tuple[int, int, int]] = field(default_factory=_base_conv_layers)  # (channels, kernel, stride)
    conv_bias: bool = False
    dim: int = 768
    ffn_dim: int = 3072
    heads: int = 12
    layers: int = 12  # layers kept; a bundle keeps only those up to its output layer
    conv_pos: int = 128
    conv_pos_groups: int = 16
    normalize_wave: bool = False  # layer-norm the waveform first (fairseq task.normalize)
    output_layer: int = 11  # 1-based layer whose output `forward` returns
    sample_rate: int = 16000

    def __post_init__(self):
        if not 1 <= self.output_layer <= self.layers:
            raise ValueError(f"output_layer {self.output_layer} is outside 1..{self.layers}")

    @property
    def hop(self) -> int:
        """Input samples per output frame (320 for the base extractor: 50 Hz at 16 kHz)."""
        h = 1
        for _, _, s in self.conv_layers:
            h *= s
        return h

    @property
    def receptive_field(self) -> int:
        """Input samples one frame of the conv extractor sees (400 for the base extractor)."""
        rf, jump = 1, 1
        for _, k, s in self.conv_layers:
            rf += (k - 1) * jump
            jump *= s
        return rf

    def num_frames(self, n_samples: int | Tensor, layers: int | None = None) -> int | Tensor:
        """Frames out of the conv extractor (or its first `layers` convs) for n samples (an int or
        a tensor of lengths)."""
        n = n_samples
        for _, k, s in self.conv_layers[:layers]:
            n = (n - k) // s + 1
        return n.clamp_min(0) if isinstance(n, Tensor) else max(n, 0)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["conv_layers"] = [list(c) for c in self.conv_layers]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> HubertConfig:
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "conv_layers" in d:
            d["conv_layers"] = [tuple(c) for c in d["conv_layers"]]
        return cls(**d)


class ConvFeatureExtractor(nn.Module):
    """fairseq "default" mode: conv -> (GroupNorm with one group per channel, first layer only) -> GELU."""

    def __init__(self, cfg: HubertConfig):
        super().__init__()
        layers, c_in = [], 1
        for i, (c, k, s) in enumerate(cfg.conv_layers):
            block = [nn.Conv1d(c_in, c, k, stride=s, bias=cfg.conv_bias), nn.Dropout(0.0)]
            if i == 0:
                block.append(nn.GroupNorm(c, c, affine=True))
            block.append(nn.GELU())
            layers.append(nn.Sequential(*block))  # keeps fairseq's names: conv_layers.N.0 / .N.2
            c_in = c
        self.conv_layers = nn.ModuleList(layers)

    def forward(self, wave: Tensor, valid: Tensor | None = None) -> Tensor:
        """wave [B, T] -> [B, C, F]; valid [B, F0] marks the first conv's frames that lie inside each row."""
        x = wave[:, None, :]  # [B, 1, T]
        for i, block in enumerate(self.conv_layers):
            if i == 0 and valid is not None:
                conv, _, norm, act = block
                x = act(_standardize(conv(x), valid[:, None], norm.eps) * norm.weight[:, None] + norm.bias[:, None])
            else:
                x = block(x)
        return x


def _standardize(x: Tensor, valid: Tensor, eps: float) -> Tensor:
    """Zero mean, unit variance along the last axis, the statistics over the valid entries only:
    GroupNorm with a group per channel (x [B, C, F]) or the waveform's layer norm (x [B, T]) on
    a padded batch. valid: bool, broadcastable to x."""
    m = valid.to(x.dtype)
    n = m.sum(-1, keepdim=True).clamp_min(1)
    mean = (x * m).sum(-1, keepdim=True) / n
    var = ((x - mean) ** 2 * m).sum(-1, keepdim=True) / n
    return (x - mean) * torch.rsqrt(var + eps)


class PositionalConv(nn.Module):
    """Grouped conv over time (weight norm folded in at load), minus the extra sample of an even kernel."""

    def __init__(self, dim: int, kernel: int, groups: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        self.trim = 1 if kernel % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:  # x [B, F, d]
        y = self.conv(x.transpose(1, 2))
        if self.trim:
            y = y[:, :, : -self.trim]
        return F.gelu(y).transpose(1, 2)


class EncoderLayer(nn.Module):
    """Post-norm transformer layer (fairseq layer_norm_first=False)."""

    def __init__(self, cfg: HubertConfig):
        super().__init__()
        self.self_attn = Attention(cfg.dim, cfg.heads)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.dim)
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim)
        self.final_layer_norm = nn.LayerNorm(cfg.dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # mask [B, 1, 1, F]: visible keys
        x = self.self_attn_layer_norm(x + self.self_attn(x, *self.self_attn.kv(x), mask))
        return self.final_layer_norm(x + self.fc2(F.gelu(self.fc1(x))))


class HubertEncoder(nn.Module):
    def __init__(self, cfg: HubertConfig):
        super().__init__()
        self.cfg = cfg
        conv_dim = cfg.conv_layers[-1][0]
        self.feature_extractor = ConvFeatureExtractor(cfg)
        self.layer_norm = nn.LayerNorm(conv_dim)
        self.post_extract_proj = nn.Linear(conv_dim, cfg.dim) if conv_dim != cfg.dim else None
        self.pos_conv = PositionalConv(cfg.dim, cfg.conv_pos, cfg.conv_pos_groups)
        self.encoder_layer_norm = nn.LayerNorm(cfg.dim)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))

    def embed(self, wave: Tensor, lengths: Tensor | None = None) -> Tensor:
        """wave [B, T] -> frame embeddings [B, F, d] entering the transformer (where HuBERT training
        replaces masked frames). lengths [B]: valid samples per row of a padded batch."""
        valid = None
        if lengths is not None:
            samples = torch.arange(wave.shape[-1], device=wave.device)[None] < lengths[:, None]  # [B, T]
            wave = torch.where(samples, wave, 0.0)  # padding holds whatever it holds
            first = self.cfg.num_frames(lengths, layers=1)  # frames of the first conv, per row
            valid = torch.arange(self.cfg.num_frames(wave.shape[-1], layers=1), device=wave.device)[None] < first[:, None]
        if self.cfg.normalize_wave:
            wave = F.layer_norm(wave, wave.shape[-1:]) if lengths is None else _standardize(wave, samples, 1e-5)
        x = self.layer_norm(self.feature_extractor(wave, valid).transpose(1, 2))
        return x if self.post_extract_proj is None else self.post_extract_proj(x)

    def encode(self, x: Tensor, layer: int, frames: Tensor | None = None) -> Tensor:
        """Frame embeddings [B, F, d] -> output of transformer layer `layer` (1-based).
        frames [B]: valid frames per row of a padded batch (the rest are neither seen nor meaningful)."""
        if not 1 <= layer <= len(self.layers):
            raise ValueError(f"layer {layer} is outside 1..{len(self.layers)}")
        mask = None
        if frames is not None:
            valid = torch.arange(x.shape[1], device=x.device)[None] < frames[:, None]  # [B, F]
            x = torch.where(valid[..., None], x, 0.0)
            mask = valid[:, None, None, :]
        x = self.encoder_layer_norm(x + self.pos_conv(x))
        for block in self.layers[:layer]:
            x = block(x, mask)
        return x

    def forward(self, wave: Tensor, layer: int | None = None, lengths: Tensor | None = None) -> Tensor:
        """wave [B, T] -> features [B, F, d] of `layer` (default cfg.output_layer). With lengths [B]
        (a padded batch), row b's first `cfg.num_frames(lengths)[b]` frames equal that row encoded alone."""
        frames = None if lengths is None else self.cfg.num_frames(lengths)
        return self.encode(self.embed(wave, lengths), layer or self.cfg.output_layer, frames)

