"""The real `simuleval` command drives streamgen on espeak-ng speech at its native 22,050 Hz: the
agent resamples like every other input, so the output equals that of the same audio at 16 kHz; and
`python -m streamgen.eval.simuleval_agent` scores the output speech with streamgen's own ASR."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import streamgen
from streamgen.io.files import read_audio

pytest.importorskip("simuleval", reason="simuleval is not installed (pip install 'streamgen[dev]')")

AGENT = Path(streamgen.__file__).parent / "eval" / "simuleval_agent.py"
BIN = Path(sys.executable).parent
TEXTS = ["Good morning everyone.", "The weather is fine today.", "See you on the weekend."]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("simuleval")
    for i, text in enumerate(TEXTS):
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(d / f"{i}.wav"), text], check=True, capture_output=True)
        assert sf.info(str(d / f"{i}.wav")).samplerate == 22050
        sf.write(d / f"{i}_16k.wav", read_audio(d / f"{i}.wav", 16000).numpy(), 16000)  # the same audio at 16 kHz
    (d / "src22.txt").write_text("".join(f"{d / f'{i}.wav'}\n" for i in range(len(TEXTS))))
    (d / "src16.txt").write_text("".join(f"{d / f'{i}_16k.wav'}\n" for i in range(len(TEXTS))))
    (d / "ref.txt").write_text("".join(t + "\n" for t in TEXTS))
    return d


def simuleval(cmd: list[str], corpus: Path, source: str, out: str, *args) -> list[dict]:
    r = subprocess.run([*cmd, "--source-type", "speech", "--target-type", "speech", "--source", str(corpus / source),
                        "--target", str(corpus / "ref.txt"), "--output", str(corpus / out), *args],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in (corpus / out / "instances.log").read_text().splitlines()]


def spoken(row: dict) -> np.ndarray:
    """The output's speech without the silences SimulEval puts between segments (the wav starts at the first delay)."""
    wave, rate = sf.read(row["prediction"], dtype="float32")
    at = lambda ms: round((ms - row["delays"][0]) * rate / 1000)
    return np.concatenate([wave[at(start) : at(start) + round(dur * rate / 1000)] for start, dur in row["intervals"]])


def log_spectrogram(x: np.ndarray) -> np.ndarray:
    """Log power, 32 ms windows every 10 ms at 16 kHz, flattened."""
    spec = torch.stft(torch.from_numpy(x), 512, 160, window=torch.hann_window(512), return_complex=True)
    return torch.log(spec.abs() ** 2 + 1e-6).flatten().numpy()


def test_the_simuleval_command_reads_22khz_sources_like_16khz(corpus):
    cmd = [str(BIN / "simuleval"), "--agent", str(AGENT)]
    args = ["--no-scoring", "--task", "resynthesis"]
    at22 = simuleval(cmd, corpus, "src22.txt", "out22", *args)
    at16 = simuleval(cmd, corpus, "src16.txt", "out16", *args)
    assert len(at22) == len(at16) == len(TEXTS)
    for a, b in zip(at22, at16):
        assert a["source_length"] == pytest.approx(b["source_length"], abs=1)  # ms of source, whatever its rate
        # output as long as from 16 kHz (ignoring the rate made it 22050/16000 = 1.38 times longer, pitched down)
        assert sum(a["durations"]) == pytest.approx(sum(b["durations"]), rel=0.02)
        assert len(a["delays"]) > 1  # spoken while the source was still being read
        x, y = spoken(a), spoken(b)
        n = min(len(x), len(y))
        # the same speech: log spectrograms agree (measured 0.94-1.00 with the shipped bundle; the same
        # speech pitched down by 16000/22050 scores 0.38-0.51). The waveforms themselves may not: a unit
        # that flips where the resampled chunks differ in the last bit shifts the oscillator's phase.
        assert abs(len(x) - len(y)) <= 320 and np.corrcoef(log_spectrogram(x[:n]), log_spectrogram(y[:n]))[0, 1] > 0.85


def test_asr_bleu_of_the_output_speech_with_streamgens_recogniser(corpus):
    rows = simuleval([sys.executable, "-m", "streamgen.eval.simuleval_agent"], corpus, "src22.txt", "scored",
                     "--task", "resynthesis", "--quality-metrics", "STREAMGEN_ASR_BLEU", "--latency-metrics", "StartOffset", "EndOffset")
    assert len(rows) == len(TEXTS)
    heard = (corpus / "scored" / "asr_transcripts.txt").read_text().splitlines()
    assert len(heard) == len(TEXTS) and all(h.strip() for h in heard)  # what Whisper heard in each output
    scores = (corpus / "scored" / "scores.tsv").read_text().split("\n")
    header, values = scores[0].split(), [float(v) for v in scores[1].split()]
    score = dict(zip(header, values))
    # espeak-ng's voice is not one the shipped bundle was trained on (its resynthesis of unseen voices is
    # at WER 0.8-0.9, bench/QUALITY.md), so no floor is asserted on the score itself: that the command
    # computes it from Whisper's transcripts
    assert 0 <= score["STREAMGEN_ASR_BLEU"] <= 100
    assert score["StartOffset"] > 0
