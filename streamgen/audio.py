"""Audio checks: what every input waveform must be before a model sees it, whether it carries speech, and
whether live audio comes at the pace it is spoken."""

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


MAX_AHEAD_S = 10.0  # a live session's audio may run this far ahead of the time since it opened, no further


def ahead_of_real_time(seconds_sent: float, seconds_open: float) -> str | None:
    """Why a live service ends a session whose audio runs ahead of real time, or None. All of a service's
    clients share one way into its engine: one sending faster than it speaks would crowd out the rest."""
    ahead = seconds_sent - seconds_open
    if ahead <= MAX_AHEAD_S:
        return None
    return (f"audio sent {ahead:.1f} s ahead of real time (at most {MAX_AHEAD_S:.0f} s): this is a live service; "
            "send audio at the pace it is spoken")


class SpeechGate:
    """Has this stream carried speech yet? An energy detector that needs no model: speech is sound
    that rises well above the stream's own noise floor, often enough and for long enough.

    Per 20 ms frame, level L = 10 log10(mean x^2) (dBFS). The noise floor F follows the quietest
    frames: F <- min(L, F + rise) (it drops at once and climbs `rise_db_per_s`, so slow changes in the
    background are followed). A frame is active when L > max(F + margin_db, min_dbfs). Speech has been
    seen once `min_speech_ms` of active frames fall within one `window_ms`: steady noise never climbs
    above its own floor, clicks are too short, and digital silence is below `min_dbfs`.

    With `silero=True` (silero-vad installed), the loud sound must also be voice: silero-vad must
    hear speech in `min_speech_ms` of 32 ms windows, which rules out loud non-speech (a buzz, music).
    """

    def __init__(self, sample_rate: int, frame_ms: int = 20, margin_db: float = 12.0, min_dbfs: float = -50.0,
                 min_speech_ms: int = 200, window_ms: int = 1000, rise_db_per_s: float = 3.0, silero: bool = False):
        self.voice = _SileroVoice(sample_rate, min_speech_ms) if silero else None
        self.frame = max(1, sample_rate * frame_ms // 1000)
        self.margin, self.min_dbfs = margin_db, min_dbfs
        self.need = max(1, min_speech_ms // frame_ms)
        self.window = max(self.need, window_ms // frame_ms)
        self.rise = rise_db_per_s * frame_ms / 1000
        self.floor: float | None = None
        self.recent: list[bool] = []  # active flags of the last `window` frames
        self.rest = np.zeros(0, np.float32)
        self.loud = False  # the energy criterion has been met
        self.speech = False

    def push(self, samples) -> bool:
        """Feed the next samples (float, [-1, 1]); whether speech has been seen so far."""
        if self.speech:
            return True
        samples = np.asarray(samples, np.float32).reshape(-1)
        if self.voice is not None:
            self.voice.push(samples)
        if not self.loud:
            x = np.concatenate([self.rest, samples])
            n = len(x) // self.frame
            self.rest = x[n * self.frame :]
            frames = x[: n * self.frame].reshape(n, self.frame).astype(np.float64)
            for level in 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12):
                self.floor = level if self.floor is None else min(level, self.floor + self.rise)
                self.recent.append(level > max(self.floor + self.margin, self.min_dbfs))
                if len(self.recent) > self.window:
                    self.recent.pop(0)
                if sum(self.recent) >= self.need:
                    self.loud = True
                    break
        self.speech = self.loud and (self.voice is None or self.voice.seen)
        return self.speech


class _SileroVoice:
    """silero-vad's verdict for `SpeechGate(silero=True)`: voice in at least `min_speech_ms` of 32 ms
    windows (each scored on its own, at 16 kHz)."""

    def __init__(self, sample_rate: int, min_speech_ms: int):
        try:
            from silero_vad import load_silero_vad
        except ImportError:
            raise RuntimeError("SpeechGate(silero=True) needs silero-vad: pip install 'streamgen[vad]'") from None
        import soxr

        self.model = load_silero_vad()
        self.resampler = soxr.ResampleStream(sample_rate, 16000, 1, dtype="float32") if sample_rate != 16000 else None
        self.need = max(1, round(min_speech_ms / 32))
        self.buf = np.zeros(0, np.float32)
        self.voiced = 0
        self.seen = False

    @torch.no_grad()
    def push(self, samples: np.ndarray) -> None:
        if self.seen:
            return
        if self.resampler is not None:
            samples = self.resampler.resample_chunk(samples)
        self.buf = np.concatenate([self.buf, samples])
        while len(self.buf) >= 512 and not self.seen:  # bounded: it stops buffering once voice is seen
            self.model.reset_states()
            self.voiced += float(self.model(torch.from_numpy(self.buf[:512].copy()), 16000)) >= 0.5
            self.buf = self.buf[512:]
            self.seen = self.voiced >= self.need


def has_speech(wave, sample_rate: int, silero: bool = False) -> bool:
    """Whether a whole waveform carries speech (by `SpeechGate`; `silero`: confirmed by silero-vad)."""
    if isinstance(wave, Tensor):
        wave = wave.detach().cpu().float().numpy()
    return SpeechGate(sample_rate, silero=silero).push(wave)


def pcm16_encode(x: np.ndarray) -> np.ndarray:
    """Float samples -> int16, the exact inverse of `pcm16_decode` (x * 32768, rounded, clipped)."""
    return np.clip(np.rint(np.asarray(x, np.float32) * 32768.0), -32768, 32767).astype("<i2")


def pcm16_decode(p: np.ndarray) -> np.ndarray:
    return np.asarray(p).astype(np.float32) / 32768.0
