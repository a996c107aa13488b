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
