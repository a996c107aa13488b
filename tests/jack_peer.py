"""A second JACK client for the device test (one PortAudio stream per process): after "go" on stdin,
plays PLAY_WAV and records its input for SECONDS, then writes the recording to OUT_NPY.

usage: python jack_peer.py PLAY_WAV SECONDS OUT_NPY
"""

import sys
import time

import numpy as np
import sounddevice as sd
import soundfile as sf

play, _ = sf.read(sys.argv[1], dtype="float32")
seconds, out = float(sys.argv[2]), sys.argv[3]
rec, pos, started = [], [0], [False]


def callback(indata, outdata, frames, t, status):
    outdata[:, 0] = 0.0
    if started[0]:
        rec.append(indata[:, 0].copy())
        chunk = play[pos[0] : pos[0] + frames]
        outdata[: len(chunk), 0] = chunk
        pos[0] += frames


with sd.Stream(samplerate=16000, blocksize=320, channels=1, dtype="float32", callback=callback):
    print("ready", flush=True)
    sys.stdin.readline()
    started[0] = True
    time.sleep(seconds)
np.save(out, np.concatenate(rec) if rec else np.zeros(0, np.float32))
print("done", flush=True)
