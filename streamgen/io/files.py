"""Audio files in and out: any rate and channel count in (mixed to mono, resampled with soxr)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from torch import Tensor


def resample(wave: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    if rate_in == rate_out:
        return wave
    return soxr.resample(wave, rate_in, rate_out, quality="HQ").astype(np.float32)


def read_audio(path: str | Path, sample_rate: int) -> Tensor:
    """Mono float32 [T] at `sample_rate` from a WAV/FLAC/OGG file."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot read audio: {e}") from None
    return torch.from_numpy(resample(data.mean(axis=1), rate, sample_rate))


def write_audio(path: str | Path, wave: Tensor | np.ndarray, sample_rate: int) -> Path:
    """Write mono audio (PCM16 WAV, or FLAC by extension)."""
    wave = wave.detach().cpu().float().numpy() if isinstance(wave, Tensor) else np.asarray(wave, np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(wave, -1.0, 1.0), sample_rate, subtype="PCM_16")
    return path
