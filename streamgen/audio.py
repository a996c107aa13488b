"""Audio checks: what every input waveform must be before a model sees it, and whether it carries speech."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def check_wave(wave, sample_rate: int, min_samples: int = 1) -> Tensor:
    """A mono float waveform as a 1-D tensor, or a clear error naming what is wrong with it."""
    if isinstance(wave, np.ndarray):
        wave = torch.from_numpy(wave)
    if not isinstance(wave, Tensor):
        raise TypeError(f"audio must be a tensor or numpy array, got {type(wave).__name__}")
    if wave.dim() != 1:
        raise ValueError(f"audio must be mono [T], got shape {tuple(wave.shape)}")
    if not wave.is_floating_point():
        raise ValueError(f"audio must be float samples in [-1, 1], got {wave.dtype}")
    if wave.numel() == 0:
        raise ValueError("audio is empty")
    if not torch.isfinite(wave).all():
        raise ValueError("audio contains NaN or inf samples")
    if wave.numel() < min_samples:
        raise ValueError(f"audio of {wave.numel()} samples is shorter than the {min_samples} ({min_samples / sample_rate * 1000:.0f} ms) one unit needs")
    return wave.float()


class SpeechGate:
    """Has this stream carried speech yet? An energy detector that needs no model: speech is sound
    that rises well above the stream's own noise floor, often enough and for long enough.

    Per 20 ms frame, level L = 10 log10(mean x^2) (dBFS). The noise floor F follows the quietest
    frames: F <- min(L, F + rise) (it drops at once and climbs `rise_db_per_s`, so slow changes in the
    background are followed). A frame is active when L > max(F + margin_db, min_dbfs). Speech has been
    seen once `min_speech_ms` of active frames fall within one `window_ms`: steady noise never climbs
    above its own floor, clicks are too short, and digital silence is below `min_dbfs`.
    """

    def __init__(self, sample_rate: int, frame_ms: int = 20, margin_db: float = 12.0, min_dbfs: float = -50.0,
                 min_speech_ms: int = 200, window_ms: int = 1000, rise_db_per_s: float = 3.0):
        self.frame = max(1, sample_rate * frame_ms // 1000)
        self.margin, self.min_dbfs = margin_db, min_dbfs
        self.need = max(1, min_speech_ms // frame_ms)
        self.window = max(self.need, window_ms // frame_ms)
        self.rise = rise_db_per_s * frame_ms / 1000
        self.floor: float | None = None
        self.recent: list[bool] = []  # active flags of the last `window` frames
        self.rest = np.zeros(0, np.float32)
        self.speech = False

    def push(self, samples) -> bool:
        """Feed the next samples (float, [-1, 1]); whether speech has been seen so far."""
        if self.speech:
            return True
        x = np.concatenate([self.rest, np.asarray(samples, np.float32).reshape(-1)])
        n = len(x) // self.frame
        self.rest = x[n * self.frame :]
        if n == 0:
            return False
        frames = x[: n * self.frame].reshape(n, self.frame).astype(np.float64)
        levels = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
        for level in levels:
            self.floor = level if self.floor is None else min(level, self.floor + self.rise)
            self.recent.append(level > max(self.floor + self.margin, self.min_dbfs))
            if len(self.recent) > self.window:
                self.recent.pop(0)
            if sum(self.recent) >= self.need:
                self.speech = True
                return True
        return False


def has_speech(wave, sample_rate: int) -> bool:
    """Whether a whole waveform carries speech (by `SpeechGate`)."""
    if isinstance(wave, Tensor):
        wave = wave.detach().cpu().float().numpy()
    return SpeechGate(sample_rate).push(wave)
