"""A phone recogniser trained on real speech, for units that survive a new voice: hama's waveform -> IPA
phone CTC Conformer (the `hama` package 1.7, Apache-2.0), in torch, read from its `.hama` weight package.

    log-mel  reflect-pad 200 samples, STFT (n_fft 400, hop 160, the package's windowed kernels), power,
             the package's 80-band mel filterbank, log(max(., 1e-10)), rounded to float16 (the exported
             graph's cast; the rest runs in float32 on the float16 weights, as hama's engine does)
    stem     conv 80 -> d (kernel 3, stride 2, padding 1): one frame per 320 samples (20 ms), GELU
    blocks   Conformer (Gulati et al. 2020, arXiv 2005.08100), no positional encoding:
                 x = x + FFN1(x) / 2
                 x = x + MHSA(LN(x))
                 x = x + Conv(x)      Conv: LN, pointwise d -> 2d, GLU, depthwise (batch norm folded), SiLU, pointwise
                 x = x + FFN2(x) / 2  FFN: LN, d -> 4d, SiLU, 4d -> d
                 x = LN(x)
    output   d -> V tokens (blank among them), log-softmax

Every frame sees the whole utterance (self-attention, and the depthwise convolution +-15 frames), so a
stream's frames depend on how much audio follows them; `bench/phone_posterior_units.py` measures units
made from these posteriors (bench/QUALITY.md "Units from a phone recogniser trained on real speech").
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tables import table

MAGIC = b"HAMAPK"
_DTYPES = {0: np.float32, 1: np.float16}


def read_hamapk(path: str | Path) -> dict[str, Tensor]:
    """A `.hama` weight package: b"HAMAPK", a version (2 bytes), the tensor count (u32), per tensor its
    name (u16 length + UTF-8), dtype (u8: 0 float32, 1 float16), rank (u8), dims (u32 each), offset and
    byte count (u64 each) into the data blob, which starts at the next multiple of 16 bytes. Plain
    arrays only: nothing in the file is executed."""
    b = Path(path).read_bytes()
    if b[:6] != MAGIC:
        raise ValueError(f"{path}: not a hama weight package (no {MAGIC!r} header)")
    (count,) = struct.unpack_from("<I", b, 8)
    pos, entries = 12, []
    for _ in range(count):
        (n,) = struct.unpack_from("<H", b, pos)
        name = b[pos + 2 : pos + 2 + n].decode()
        pos += 2 + n
        dtype, rank = b[pos], b[pos + 1]
        dims = struct.unpack_from(f"<{rank}I", b, pos + 2)
        offset, nbytes = struct.unpack_from("<QQ", b, pos + 2 + 4 * rank)
        pos += 2 + 4 * rank + 16
        entries.append((name, dtype, dims, offset, nbytes))
    base = (pos + 15) // 16 * 16
    out = {}
    for name, dtype, dims, offset, nbytes in entries:
        if dtype not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype code {dtype}; float32 (0) and float16 (1) are supported")
        np_dtype = np.dtype(_DTYPES[dtype])
        if nbytes != int(np.prod(dims, dtype=np.int64)) * np_dtype.itemsize or base + offset + nbytes > len(b):
            raise ValueError(f"{path}: tensor {name} {tuple(dims)} does not fit its {nbytes} bytes at offset {offset}")
        a = np.frombuffer(b, dtype=np_dtype, count=nbytes // np_dtype.itemsize, offset=base + offset)
        out[name] = torch.from_numpy(a.reshape(dims).copy())
    return out


@dataclass(frozen=True)
class PhoneRecogniserConfig:
    dim: int = 144
    layers: int = 4
    heads: int = 4
    kernel: int = 31
    vocab: int = 191  # hama's IPA tokens, then word boundary and the CTC blank (the last)
    n_fft: int = 400
    hop: int = 160  # STFT hop; the stem halves the frame rate


class FeedForward(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1(self.norm(x))))


class ConvModule(nn.Module):
    def __init__(self, d: int, kernel: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.pointwise1 = nn.Conv1d(d, 2 * d, 1)
        self.depthwise = nn.Conv1d(d, d, kernel, padding=kernel // 2, groups=d)
        self.pointwise2 = nn.Conv1d(d, d, 1)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, d]
        h = F.glu(self.pointwise1(self.norm(x).transpose(1, 2)), dim=1)
        return self.pointwise2(F.silu(self.depthwise(h))).transpose(1, 2)


class ConformerBlock(nn.Module):
    def __init__(self, cfg: PhoneRecogniserConfig):
        super().__init__()
        d = cfg.dim
        self.heads = cfg.heads
        self.ffn1, self.ffn2 = FeedForward(d), FeedForward(d)
        self.attn_norm = nn.LayerNorm(d)
        self.in_proj, self.out_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.conv = ConvModule(d, cfg.kernel)
        self.norm = nn.LayerNorm(d)

    def attention(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in self.in_proj(x).split(d, dim=-1))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + 0.5 * self.ffn1(x)
        x = x + self.attention(self.attn_norm(x))
        x = x + self.conv(x)
        x = x + 0.5 * self.ffn2(x)
        return self.norm(x)


def stft_kernels(n_fft: int) -> tuple[Tensor, Tensor]:
    """The STFT as two convolutions [n_fft // 2 + 1, 1, n_fft]: a periodic Hann window times cos and -sin of
    2 pi k n / n_fft, in float32 (hama's kernels to within one float32 step)."""
    angle = 2 * math.pi * torch.arange(n_fft // 2 + 1, dtype=torch.float32)[:, None] * torch.arange(n_fft, dtype=torch.float32) / n_fft
    window = torch.hann_window(n_fft, periodic=True)
    return (window * torch.cos(angle))[:, None], (-window * torch.sin(angle))[:, None]


class PhoneRecogniser(nn.Module):
    """Waveform [S] at 16 kHz -> phone log-probabilities [T, vocab], T = (S // 160 + 2) // 2 (rows of
    equal length batch without padding)."""

    @property
    def blank(self) -> int:
        return self.cfg.vocab - 1

    def __init__(self, cfg: PhoneRecogniserConfig = PhoneRecogniserConfig()):
        super().__init__()
        self.cfg = cfg
        bins = cfg.n_fft // 2 + 1
        real, imag = table(lambda: stft_kernels(cfg.n_fft))  # computed, not stored: the package's own to float32 rounding
        self.register_buffer("stft_real", real, persistent=False)
        self.register_buffer("stft_imag", imag, persistent=False)
        self.register_buffer("mel_fb", torch.zeros(bins, 80))
        self.stem = nn.Conv1d(80, cfg.dim, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.layers))
        self.proj = nn.Linear(cfg.dim, cfg.vocab)

    def log_mel(self, wave: Tensor) -> Tensor:
        """[B, S] -> [B, 80, S // hop + 1] (float32 holding float16 values)"""
        x = F.pad(wave.float()[:, None], (self.cfg.n_fft // 2, self.cfg.n_fft // 2), mode="reflect")
        power = F.conv1d(x, self.stft_real, stride=self.cfg.hop) ** 2 + F.conv1d(x, self.stft_imag, stride=self.cfg.hop) ** 2
        return torch.log((self.mel_fb.T @ power).clamp_min(1e-10)).half().float()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's; state dicts written before the STFT kernels were computed still hold them: they
        must equal the computed ones (to 1e-6, or to float16 storage for files cast to it) and are dropped."""
        state_dict = dict(state_dict)
        for name in ("stft_real", "stft_imag"):
            if name in state_dict:
                stored = state_dict.pop(name).float()
                if stored.shape != getattr(self, name).shape or not torch.allclose(stored, getattr(self, name).cpu(), rtol=0, atol=1e-3):
                    raise RuntimeError(f"{name}: the stored STFT kernel is not the hann-windowed DFT this recogniser computes")
        return super().load_state_dict(state_dict, strict, assign)

    def forward(self, wave: Tensor) -> Tensor:
        """[S] -> [T, vocab], or a batch of equal-length waves [B, S] -> [B, T, vocab]."""
        batch = wave.dim() == 2
        x = F.gelu(self.stem(self.log_mel(wave if batch else wave[None]))).transpose(1, 2)  # [B, T, d]
        for block in self.blocks:
            x = block(x)
        out = torch.log_softmax(self.proj(x), dim=-1)
        return out if batch else out[0]

    @classmethod
    def from_hamapk(cls, path: str | Path) -> PhoneRecogniser:
        """hama's `asr_waveform.hama` (1.7): its named tensors, and the exported graph's anonymous ones
        (the stem and the depthwise convolutions with batch norm folded in, the projections stored
        transposed) taken in the graph's order."""
        t = read_hamapk(path)
        block0 = "acoustic_model.model.blocks.0."
        if block0 + "ffn1.norm.weight" not in t:
            raise ValueError(f"{path}: not hama 1.7's Conformer phone recogniser (no {block0}ffn1.norm.weight)")
        d, vocab = t[block0 + "ffn1.norm.weight"].shape[0], t["acoustic_model.model.proj.bias"].shape[0]
        layers = len({k.split(".")[3] for k in t if k.startswith("acoustic_model.model.blocks.")})
        number = lambda k: int(k.rsplit("_", 1)[1])
        convs = sorted((k for k in t if k.startswith("onnx::Conv_")), key=number)  # stem w, b, then per block dw w, b
        mats = sorted((k for k in t if k.startswith("onnx::MatMul_")), key=number)  # per block: ffn1 fc1, fc2, qkv, out, ffn2 fc1, fc2
        if len(convs) != 2 + 2 * layers or len(mats) != 6 * layers:
            raise ValueError(f"{path}: expected {2 + 2 * layers} convolution and {6 * layers} matrix tensors, found {len(convs)} and {len(mats)}")
        kernel = t[convs[2]].shape[-1]
        model = cls(PhoneRecogniserConfig(dim=d, layers=layers, kernel=kernel, vocab=vocab, n_fft=t["stft_real_kernel"].shape[-1]))
        for name, kernel in (("stft_real", model.stft_real), ("stft_imag", model.stft_imag)):
            if not torch.allclose(t[name + "_kernel"].float(), kernel, rtol=0, atol=1e-6):
                raise ValueError(f"{path}: its {name} kernel is not the hann-windowed DFT this port computes")
        sd = {"mel_fb": t["mel_fb"],
              "stem.weight": t[convs[0]], "stem.bias": t[convs[1]],
              "proj.weight": t["acoustic_model.model.proj.weight"][..., 0], "proj.bias": t["acoustic_model.model.proj.bias"]}
        for i in range(layers):
            src, dst = f"acoustic_model.model.blocks.{i}.", f"blocks.{i}."
            f1a, f1b, qkv, out, f2a, f2b = (t[k].T for k in mats[6 * i : 6 * i + 6])
            for ffn, (a, b) in (("ffn1", (f1a, f1b)), ("ffn2", (f2a, f2b))):
                sd |= {dst + f"{ffn}.fc1.weight": a, dst + f"{ffn}.fc2.weight": b}
                sd |= {dst + f"{ffn}.{p}": t[src + f"{ffn}.{p}"] for p in ("norm.weight", "norm.bias", "fc1.bias", "fc2.bias")}
            sd |= {dst + "in_proj.weight": qkv, dst + "in_proj.bias": t[src + "attn.in_proj_bias"],
                   dst + "out_proj.weight": out, dst + "out_proj.bias": t[src + "attn.out_proj.bias"],
                   dst + "conv.depthwise.weight": t[convs[2 + 2 * i]], dst + "conv.depthwise.bias": t[convs[3 + 2 * i]]}
            sd |= {dst + p: t[src + p] for p in ("attn_norm.weight", "attn_norm.bias", "norm.weight", "norm.bias", "conv.norm.weight",
                                                   "conv.norm.bias", "conv.pointwise1.weight", "conv.pointwise1.bias",
                                                   "conv.pointwise2.weight", "conv.pointwise2.bias")}
        model.load_state_dict({k: v.float() for k, v in sd.items()})
        return model.eval()


def posterior_features(log_probs: Tensor, blank: int) -> Tensor:
    """[..., T, V] log-probabilities -> [..., T, V-1]: square roots of the non-blank posteriors, renormalised, so a
    frame between CTC spikes still says which phone it is in, and Euclidean distance between frames is
    the Hellinger distance of their phone distributions."""
    keep = torch.ones(log_probs.shape[-1], dtype=torch.bool, device=log_probs.device)
    keep[blank] = False
    return torch.softmax(log_probs[..., keep].float(), dim=-1).sqrt()
