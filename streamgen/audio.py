"""Audio validation: what every input waveform must be before a model sees it."""

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
