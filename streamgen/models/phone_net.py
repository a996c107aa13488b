"""A frame phone classifier over normalised log-mel frames, whose hidden layer is a speaker-robust
feature for k-means units (issue 12, item 2: units trained to predict the phones the TTS engines
say they spoke).

    h_0     = W_in f_t                                          (f: normalised log-mel, [T, n_mels])
    h_l     = h_{l-1} + W_l2 relu(LN(conv_k,d_l(h_{l-1})))      (same convolutions: look-ahead
                                                                 sum of d_l (k - 1) / 2 frames)
    p(y_t)  = softmax(W_out LN(h_L))_t                           (y: the frame's phone)

`features` returns LN(h_L), the layer the units are clustered on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class PhoneNetConfig:
    n_mels: int = 80
    dim: int = 256
    kernel: int = 5
    dilations: list[int] = field(default_factory=lambda: [1, 2, 1, 2, 1])
    num_phones: int = 64

    @property
    def look_ahead(self) -> int:
        """Frames of future input each output needs."""
        return sum(d * (self.kernel - 1) // 2 for d in self.dilations)

    def to_dict(self) -> dict:
        return asdict(self)


class PhoneNet(nn.Module):
    def __init__(self, cfg: PhoneNetConfig):
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Linear(cfg.n_mels, cfg.dim)
        self.convs = nn.ModuleList(nn.Conv1d(cfg.dim, cfg.dim, cfg.kernel, dilation=d, padding=d * (cfg.kernel - 1) // 2)
                                   for d in cfg.dilations)
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.dim) for _ in cfg.dilations)
        self.mix = nn.ModuleList(nn.Linear(cfg.dim, cfg.dim) for _ in cfg.dilations)
        self.final = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.num_phones)

    def features(self, f: Tensor) -> Tensor:
        """f: [B, T, n_mels] normalised log-mel -> [B, T, dim]."""
        h = self.inp(f)
        for conv, norm, mix in zip(self.convs, self.norms, self.mix):
            h = h + mix(F.relu(norm(conv(h.transpose(1, 2)).transpose(1, 2))))
        return self.final(h)

    def forward(self, f: Tensor) -> Tensor:
        """Phone logits [B, T, num_phones]."""
        return self.out(self.features(f))
