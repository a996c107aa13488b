"""Streaming unit extraction: HuBERT + k-means over a sliding window.

Frame i of the conv extractor covers input samples [i*hop, i*hop + rf). When audio arrives, the
frames whose look-ahead is complete are encoded from a window that starts `left_frames` frames
earlier (aligned to the frame grid, so frame i is the same conv frame as offline) and ends
`lookahead_frames` after them. Transformer attention and the first layer's GroupNorm see the whole
window, so units agree with offline extraction only as far as the context allows; with unbounded
context (`left_frames=None`, `lookahead_frames=None`) everything is encoded at the end in one pass
and agreement is exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.hubert import HubertEncoder
from ..models.kmeans import KMeansQuantizer


class UnitStream:
    def __init__(self, hubert: HubertEncoder, quantizer: KMeansQuantizer, left_frames: int | None = 100, lookahead_frames: int | None = 5):
        self.hubert, self.quantizer = hubert, quantizer
        self.hop, self.rf = hubert.cfg.hop, hubert.cfg.receptive_field
        self.left, self.lookahead = left_frames, lookahead_frames
        self.buf = torch.zeros(0)  # input samples from absolute index b0
        self.b0 = 0
        self.n_samples = 0
        self.n_done = 0  # frames already turned into units
        self.last_unit: int | None = None  # for de-duplication across chunk edges

    def frames_available(self, n_samples: int) -> int:
        return max(0, (n_samples - self.rf) // self.hop + 1)

    @torch.no_grad()
    def push(self, samples: Tensor) -> tuple[Tensor, Tensor]:
        """Add input samples; return (new de-duplicated units, their start frames)."""
        self.buf = torch.cat([self.buf, samples.float().cpu()])
        self.n_samples += samples.numel()
        if self.lookahead is None:
            return self._empty()
        return self._encode(self.frames_available(self.n_samples) - self.lookahead)

    @torch.no_grad()
    def flush(self) -> tuple[Tensor, Tensor]:
        """End of input: the remaining frames, with whatever look-ahead there is."""
        return self._encode(self.frames_available(self.n_samples))

    def _empty(self) -> tuple[Tensor, Tensor]:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)

    def _encode(self, end: int) -> tuple[Tensor, Tensor]:
        a = self.n_done
        if end <= a:
            return self._empty()
        w0 = 0 if self.left is None else max(0, a - self.left)
        w1 = self.frames_available(self.n_samples)  # every frame the audio allows: the look-ahead
        wave = self.buf[w0 * self.hop - self.b0 : (w1 - 1) * self.hop + self.rf - self.b0]
        p = next(self.hubert.parameters())
        feats = self.hubert(wave.to(p.device, p.dtype)[None])[0, a - w0 : end - w0]
        frame_units = self.quantizer(feats).cpu()
        self.n_done = end
        if self.left is not None:  # drop samples no later window needs
            keep = max(0, end - self.left) * self.hop
            self.buf, self.b0 = self.buf[keep - self.b0 :], keep
        # de-duplicate, continuing the run from the previous chunk
        starts = torch.ones(len(frame_units), dtype=torch.bool)
        starts[1:] = frame_units[1:] != frame_units[:-1]
        if self.last_unit is not None and int(frame_units[0]) == self.last_unit:
            starts[0] = False
        self.last_unit = int(frame_units[-1])
        idx = torch.nonzero(starts)[:, 0]
        return frame_units[idx], idx + a
