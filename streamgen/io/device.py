"""Microphone and speaker through PortAudio (sounddevice).

One process opens one stream: a duplex stream when both the mic and the speaker are used (PortAudio's
JACK backend does not survive two streams in one process), else an input or output stream. The
audio callback only copies samples: captured blocks go to a bounded buffer the mic source drains
(oldest dropped and counted when the pipeline falls behind), and the speaker plays from a bounded
FIFO that the sink fills (silence when it runs dry).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator

import numpy as np
import torch

from ..pipeline.items import AudioChunk, AudioOut, End, Item


class DeviceError(RuntimeError):
    pass


def _sounddevice():
    try:
        import sounddevice as sd
    except OSError as e:  # the PortAudio library itself is missing
        raise DeviceError(f"PortAudio is not available ({e}); install it (Debian: apt-get install libportaudio2)") from None
    except ImportError:
        raise DeviceError("audio devices need sounddevice: pip install 'streamgen[audio]'") from None
    return sd


class AudioDevice:
    """The process's one PortAudio stream, shared by `MicSource` and `SpeakerSink`."""

    def __init__(self, sample_rate: int, input_device=None, output_device=None, block_ms: int = 20,
                 max_buffered_s: float = 10.0):
        self.rate = sample_rate
        self.block = sample_rate * block_ms // 1000
        self.input_device, self.output_device = input_device, output_device
        self.want_input = self.want_output = False
        self.stream = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.captured: asyncio.Queue | None = None
        self.max_blocks = int(max_buffered_s * 1000 / block_ms)
        self.play = collections.deque()  # float32 arrays waiting to be played
        self.play_lock = threading.Lock()
        self.play_samples = 0
        self.max_play = int(max_buffered_s * sample_rate)
        self.dropped_blocks = 0
        self.underruns = 0

    def open(self) -> None:
        if self.stream is not None:
            return
        sd = _sounddevice()
        self.loop = asyncio.get_running_loop()
        self.captured = asyncio.Queue(self.max_blocks)
        kind = (self.want_input, self.want_output)
        try:
            if kind == (True, True):
                self.stream = sd.Stream(samplerate=self.rate, blocksize=self.block, channels=1, dtype="float32",
                                        device=(self.input_device, self.output_device), callback=self._duplex)
            elif self.want_input:
                self.stream = sd.InputStream(samplerate=self.rate, blocksize=self.block, channels=1, dtype="float32",
                                             device=self.input_device, callback=lambda i, f, t, s: self._capture(i))
            else:
                self.stream = sd.OutputStream(samplerate=self.rate, blocksize=self.block, channels=1, dtype="float32",
                                              device=self.output_device, callback=lambda o, f, t, s: self._render(o))
            self.stream.start()
        except Exception as e:  # PortAudioError, ValueError for a bad device
            devices = sd.query_devices()
            listing = "\n".join(f"  {i}: {d['name']} ({d['max_input_channels']} in, {d['max_output_channels']} out)" for i, d in enumerate(devices))
            raise DeviceError(f"cannot open the audio device: {e}\navailable devices:\n{listing or '  none (is an audio server running?)'}") from None

    def _duplex(self, indata, outdata, frames, t, status) -> None:
        self._capture(indata)
        self._render(outdata)

    def _capture(self, indata) -> None:
        block = indata[:, 0].copy()
        try:
            self.loop.call_soon_threadsafe(self._put_captured, block, time.monotonic())
        except RuntimeError:  # the event loop has closed while the stream was still running
            pass

    def _put_captured(self, block: np.ndarray, at: float) -> None:
        if self.captured.full():
            self.captured.get_nowait()
            self.dropped_blocks += 1
        self.captured.put_nowait((block, at))

    def _render(self, outdata) -> None:
        n, out = len(outdata), outdata[:, 0]
        i = 0
        with self.play_lock:
            while i < n and self.play:
                head = self.play[0]
                k = min(n - i, len(head))
                out[i : i + k] = head[:k]
                if k == len(head):
                    self.play.popleft()
                else:
                    self.play[0] = head[k:]
                i += k
            self.play_samples -= i
        if i < n:
            out[i:] = 0.0
            if self.want_output and i > 0:
                self.underruns += 1

    def enqueue(self, samples: np.ndarray) -> bool:
        with self.play_lock:
            if self.play_samples + len(samples) > self.max_play:
                return False
            self.play.append(samples.astype(np.float32))
            self.play_samples += len(samples)
            return True

    def close(self) -> None:
        if self.stream is not None:
            self.stream.stop()
            self.stream.close()
            self.stream = None


class MicSource:
    """Live microphone input as one session, until `stop()` or `duration_s`."""

    def __init__(self, device: AudioDevice, session: str = "mic", duration_s: float | None = None):
        self.device, self.session, self.duration = device, session, duration_s
        device.want_input = True
        self.stopped = asyncio.Event()

    def stop(self) -> None:
        self.stopped.set()

    async def __aiter__(self) -> AsyncIterator[Item]:
        self.device.open()
        pos, seq = 0, 0
        limit = None if self.duration is None else int(self.duration * self.device.rate)
        try:
            while not self.stopped.is_set() and (limit is None or pos < limit):
                get = asyncio.ensure_future(self.device.captured.get())
                stop = asyncio.ensure_future(self.stopped.wait())
                done, _ = await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if get not in done:
                    get.cancel()
                    break
                block, at = get.result()
                yield AudioChunk(self.session, seq, torch.from_numpy(block), pos, at)
                seq, pos = seq + 1, pos + len(block)
        finally:
            if not self.device.want_output:  # the speaker's sink closes a duplex stream once it has played out
                self.device.close()
        yield End(self.session, pos, time.monotonic())


class SpeakerSink:
    """Plays generated audio; waits for the device when its buffer is full (back-pressure)."""

    def __init__(self, device: AudioDevice):
        self.device = device
        device.want_output = True

    async def write(self, item: Item) -> None:
        if isinstance(item, AudioOut):
            self.device.open()
            x = np.clip(item.samples.numpy(), -1.0, 1.0)
            step = max(1, self.device.max_play // 2)  # a chunk longer than the buffer goes in pieces (it never fit whole)
            for i in range(0, len(x), step):
                while not self.device.enqueue(x[i : i + step]):
                    await asyncio.sleep(0.02)

    async def drain(self) -> None:
        """Wait until everything queued has been played."""
        while self.device.play_samples > 0 and self.device.stream is not None:
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        await self.drain()
        self.device.close()
