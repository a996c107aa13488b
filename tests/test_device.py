"""Microphone and speaker for real: a sounddevice duplex stream on a JACK dummy server (paced like
hardware). A peer process plays espeak-ng speech into our mic port and records our speaker port."""

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from services import Jack
from speech import espeak

from streamgen.io.device import AudioDevice, DeviceError, MicSource, SpeakerSink
from streamgen.pipeline.items import AudioChunk
from streamgen.pipeline.runner import Pipeline, build_engine
from streamgen.pipeline.stats import Stats


class Tap:
    """A source that also keeps the audio it passes on."""

    def __init__(self, source):
        self.source, self.audio = source, []

    async def __aiter__(self):
        async for item in self.source:
            if isinstance(item, AudioChunk):
                self.audio.append(item.samples.numpy())
            yield item


class RecordingSpeaker(SpeakerSink):
    """The speaker, also keeping what it handed to the device."""

    def __init__(self, device):
        super().__init__(device)
        self.played = []

    async def write(self, item):
        await super().write(item)
        if hasattr(item, "samples") and type(item).__name__ == "AudioOut":
            self.played.append(np.clip(item.samples.numpy(), -1.0, 1.0))


def best_correlation(long: np.ndarray, short: np.ndarray) -> float:
    """Max over offsets of <long[i:i+n], short> / (|long[i:i+n]| |short|): 1 where `short` occurs exactly."""
    n = len(short)
    if len(long) < n:
        return 0.0
    c = np.correlate(long, short, "valid")
    energy = np.sqrt(np.convolve(long**2, np.ones(n), "valid")) * np.linalg.norm(short) + 1e-9
    return float(np.max(c / energy))


@pytest.fixture
def jack():
    import sounddevice as sd

    j = Jack()
    sd._terminate()  # rescan: PortAudio lists JACK only if the server ran when it initialised
    sd._initialize()
    yield j
    sd._terminate()  # PortAudio must let go of JACK before the server goes (it aborts otherwise)
    j.stop()
    sd._initialize()


def test_mic_to_pipeline_to_speaker_through_jack(jack, test_bundle, tmp_path):
    speech = espeak("Hello, this is a test of the microphone.")
    sf.write(tmp_path / "speech.wav", speech.numpy(), 16000)
    listen_s = len(speech) / 16000 + 1.0
    before = set(Jack.ports())
    peer = subprocess.Popen([sys.executable, str(Path(__file__).parent / "jack_peer.py"), str(tmp_path / "speech.wav"),
                             str(listen_s + 6.0), str(tmp_path / "heard.npy")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert peer.stdout.readline().strip() == "ready"
    peer_ports = set(Jack.ports()) - before
    other = next(p for p in peer_ports if p.endswith(":in_0")).rsplit(":", 1)[0]

    async def main():
        device = AudioDevice(16000)
        source, sink = MicSource(device, duration_s=listen_s), RecordingSpeaker(device)
        tap = Tap(source)
        engine = build_engine(test_bundle, "continuation", {"max_units": 40, "min_units": 40})
        run = asyncio.create_task(Pipeline(tap, engine, sink, Stats(16000)).run())
        for _ in range(100):  # wait for our stream's ports to appear
            ours = set(Jack.ports()) - peer_ports - before
            if ours:
                break
            await asyncio.sleep(0.05)
        mine = next(p for p in ours if p.endswith(":in_0")).rsplit(":", 1)[0]
        # wire: peer plays into our mic, our speaker plays into the peer; no hardware ports
        for p in (mine, other):
            Jack.disconnect("system:capture_1", f"{p}:in_0")
            Jack.disconnect(f"{p}:out_0", "system:playback_1")
        Jack.connect(f"{other}:out_0", f"{mine}:in_0")
        Jack.connect(f"{mine}:out_0", f"{other}:in_0")
        peer.stdin.write("go\n")
        peer.stdin.flush()
        stats = await run
        return tap, sink, stats

    tap, sink, stats = asyncio.run(main())
    assert peer.wait(timeout=30) == 0
    heard_by_mic = np.concatenate(tap.audio)
    assert len(heard_by_mic) >= 0.9 * listen_s * 16000  # the mic delivered real-time audio for the whole listen
    assert best_correlation(heard_by_mic, speech.numpy()) > 0.9  # and it was the peer's speech
    played = np.concatenate(sink.played)
    assert len(played) > 0 and stats.sessions["mic"].error is None
    heard_by_peer = np.load(tmp_path / "heard.npy")
    assert best_correlation(heard_by_peer, played) > 0.9  # our speaker output reached the peer


def test_missing_device_is_a_clear_error(jack):
    async def main():
        device = AudioDevice(16000, input_device=99)
        source = MicSource(device, duration_s=0.1)
        async for _ in source:
            pass

    with pytest.raises(DeviceError, match="(?s)cannot open the audio device.*available devices:.*system"):
        asyncio.run(main())


def test_a_chunk_longer_than_the_play_buffer_is_played_in_pieces(jack):
    """With --lookahead-ms -1 the whole utterance can come as one chunk, longer than the speaker's buffer:
    it never fitted whole, and the sink waited for room for ever."""
    from streamgen.pipeline.items import AudioOut

    async def main():
        device = AudioDevice(16000, max_buffered_s=0.5)
        sink = SpeakerSink(device)
        await asyncio.wait_for(sink.write(AudioOut("s", torch.full((24000,), 0.1), 0, 0.0)), 30)  # 1.5 s
        await asyncio.wait_for(sink.close(), 30)
        return device

    device = asyncio.run(main())
    assert device.stream is None and device.play_samples == 0


def test_the_mic_is_closed_when_its_session_ends(jack):
    """A mic whose output goes elsewhere (a file) was never closed: PortAudio went on calling back after
    the event loop had closed (a traceback at exit)."""
    async def main():
        device = AudioDevice(16000)
        async for _ in MicSource(device, duration_s=0.3):
            pass
        return device

    assert asyncio.run(main()).stream is None
