"""The speech detector: silence and steady noise are not speech, real speech is, and a stream says
so soon after the talker starts."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from speech import espeak

import streamgen
from streamgen.audio import SpeechGate, has_speech

SR = 16000
SAMPLE = Path(streamgen.__file__).parent / "assets" / "sample.wav"


def level(x: np.ndarray, dbfs: float) -> np.ndarray:
    return (x / np.sqrt(np.mean(x**2)) * 10 ** (dbfs / 20)).astype(np.float32)


def brown(n: int, rng) -> np.ndarray:
    """Low-frequency rumble: integrated white noise, its drift removed."""
    x = np.cumsum(rng.standard_normal(n))
    return x - np.convolve(x, np.ones(800) / 800, "same")


@pytest.mark.parametrize("dbfs", [-60, -40, -25, -10])
def test_five_seconds_of_steady_noise_are_not_speech(dbfs):
    rng = np.random.default_rng(0)
    t = np.arange(5 * SR) / SR
    assert not has_speech(level(rng.standard_normal(5 * SR), dbfs), SR)  # hiss
    assert not has_speech(level(brown(5 * SR, rng), dbfs), SR)  # rumble
    assert not has_speech(level(np.sin(2 * np.pi * 50 * t), dbfs), SR)  # mains hum


def test_silence_and_clicks_are_not_speech():
    assert not has_speech(np.zeros(5 * SR, np.float32), SR)
    assert not has_speech(torch.zeros(5 * SR), SR)
    clicks = np.zeros(5 * SR, np.float32)
    clicks[:: SR // 2] = 0.9
    assert not has_speech(clicks, SR)


def test_speech_is_speech():
    wave, rate = sf.read(SAMPLE, dtype="float32")
    assert has_speech(wave, rate)
    assert has_speech(espeak("Hello there, how are you today?"), SR)
    assert has_speech(espeak("Hello there.", rate=22050), 22050)
    rng = np.random.default_rng(1)
    noisy = wave + level(rng.standard_normal(len(wave)), 10 * np.log10(np.mean(wave**2)) - 20)  # 20 dB SNR
    assert has_speech(noisy, rate)


def test_a_stream_sees_speech_shortly_after_it_starts():
    rng = np.random.default_rng(2)
    speech = espeak("Good morning, everyone.").numpy()
    lead = level(rng.standard_normal(3 * SR), -45)
    stream = np.concatenate([lead, speech + level(rng.standard_normal(len(speech)), -45)])
    gate, seen_at = SpeechGate(SR), None
    for i in range(0, len(stream), 1600):  # 100 ms pushes
        if gate.push(stream[i : i + 1600]):
            seen_at = (i + 1600) / SR
            break
    onset = 3 + np.argmax(np.abs(speech) > 0.05) / SR
    assert seen_at is not None and onset <= seen_at <= onset + 0.6, (onset, seen_at)
    assert gate.push(np.zeros(1600)) is True  # once seen, it stays seen


def test_silero_confirms_that_loud_sound_is_voice():
    """The energy detector takes any sound that rises above its floor; with silero-vad it must be voice."""
    pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install 'streamgen[vad]')")
    t = np.arange(2 * SR) / SR
    buzz = (np.sin(2 * np.pi * 150 * t) * (np.sin(2 * np.pi * 4 * t) > 0) * 0.3).astype(np.float32)  # syllable-like bursts
    bursts = (np.random.default_rng(3).standard_normal(len(t)) * (np.sin(2 * np.pi * 3 * t) > 0) * 0.1).astype(np.float32)
    for sound in (buzz, bursts):
        assert has_speech(sound, SR) and not has_speech(sound, SR, silero=True)
    wave, rate = sf.read(SAMPLE, dtype="float32")
    assert has_speech(wave, rate, silero=True)
    assert has_speech(espeak("Hello there, how are you?", rate=22050), 22050, silero=True)  # resampled for silero
    assert not has_speech(np.zeros(5 * SR, np.float32), SR, silero=True)
