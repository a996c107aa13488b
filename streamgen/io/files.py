"""Audio files and raw PCM streams in and out.

Files: any rate and channel count in (mixed to mono, resampled with soxr), WAV/FLAC out. File input
can be paced in real time to simulate a live talker. Raw PCM: 16-bit little-endian mono on stdin /
stdout, for shell pipelines.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from torch import Tensor

from ..audio import SpeechGate, pcm16_decode, pcm16_encode
from ..pipeline.items import AudioChunk, AudioOut, End, Item, SessionError


def resample(wave: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    if rate_in == rate_out:
        return wave
    return soxr.resample(wave, rate_in, rate_out, quality="HQ").astype(np.float32)


def audio_info(path: str | Path):
    """soundfile's header info of an audio file, or a ValueError that says what the path is instead."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such file")
    if p.is_dir():
        raise ValueError(f"{p} is a directory; give an audio file (WAV, FLAC, OGG)")
    try:
        return sf.info(str(p))
    except (sf.LibsndfileError, RuntimeError) as e:
        raise ValueError(f"{p}: cannot read audio ({e}); give a WAV, FLAC or OGG file") from None


def read_audio(path: str | Path, sample_rate: int) -> Tensor:
    """Mono float32 [T] at `sample_rate` from a WAV/FLAC/OGG file."""
    audio_info(path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot read audio: {e}") from None
    return torch.from_numpy(resample(data.mean(axis=1), rate, sample_rate))


def write_audio(path: str | Path, wave: Tensor | np.ndarray, sample_rate: int) -> Path:
    """Write mono audio (PCM16 WAV, or FLAC by extension) into an existing directory."""
    wave = wave.detach().cpu().float().numpy() if isinstance(wave, Tensor) else np.asarray(wave, np.float32)
    sf.write(str(path), np.clip(wave, -1.0, 1.0), sample_rate, subtype="PCM_16")
    return Path(path)


def file_has_speech(path: str | Path, block_s: float = 1.0) -> bool:
    """Whether an audio file carries speech (`SpeechGate`, at the file's own rate); reads only up
    to the first speech."""
    info = audio_info(path)
    gate = SpeechGate(info.samplerate)
    for block in sf.blocks(str(path), blocksize=max(1, int(block_s * info.samplerate)), dtype="float32", always_2d=True):
        if gate.push(block.mean(axis=1)):
            return True
    return False


class FileSource:
    """Streams a file as one session, in blocks of `block_ms`; `realtime` paces it like a live talker."""

    def __init__(self, path: str | Path, sample_rate: int, session: str = "file", block_ms: int = 20, realtime: bool = False):
        self.path, self.rate, self.session = Path(path), sample_rate, session
        self.block_ms, self.realtime = block_ms, realtime
        self.info = audio_info(self.path)

    async def __aiter__(self) -> AsyncIterator[Item]:
        rs = soxr.ResampleStream(self.info.samplerate, self.rate, 1, dtype="float32", quality="HQ")
        block = max(1, self.info.samplerate * self.block_ms // 1000)
        t0, emitted, seq = time.monotonic(), 0, 0
        with sf.SoundFile(str(self.path)) as f:
            while True:
                data = f.read(block, dtype="float32", always_2d=True)
                last = len(data) < block
                out = rs.resample_chunk(data.mean(axis=1), last=last)
                if len(out):
                    emitted += len(out)
                    if self.realtime:
                        await asyncio.sleep(max(0.0, t0 + emitted / self.rate - time.monotonic()))
                    yield AudioChunk(self.session, seq, torch.from_numpy(out.copy()), emitted - len(out), time.monotonic())
                    seq += 1
                if last:
                    break
        yield End(self.session, emitted, time.monotonic())


class FileSink:
    """Writes each session's generated audio as it arrives (one file; `{session}` in the path
    gives one file per session). A file is created with its first audio: a session that produced
    nothing leaves no file. A file this sink has written is never overwritten: a later session that
    would write it again (a session id used again, or sessions without `{session}` in the path)
    writes NAME-2.wav, NAME-3.wav, ... beside it. Directories are not created."""

    def __init__(self, path: str | Path, sample_rate: int):
        self.path, self.rate = str(path), sample_rate
        self.files: dict[str, sf.SoundFile] = {}  # open, by live session
        self.opened: dict[str, int] = {}  # the last -N suffix given, by the path a session's name gives
        self.taken: set[str] = set()  # every file this sink has opened

    def _file(self, session: str) -> sf.SoundFile:
        if session not in self.files:
            path = Path(self.path.replace("{session}", session))
            n = self.opened.get(str(path), 1)
            name = path
            while str(name) in self.taken:  # (NAME-2 may be another session's own name)
                n += 1
                name = path.with_name(f"{path.stem}-{n}{path.suffix}")
            self.opened[str(path)] = n
            self.taken.add(str(name))
            self.files[session] = sf.SoundFile(str(name), "w", self.rate, 1, subtype="PCM_16")
        return self.files[session]

    async def write(self, item: Item) -> None:
        if isinstance(item, AudioOut):
            self._file(item.session).write(np.clip(item.samples.numpy(), -1.0, 1.0))
        elif isinstance(item, End):
            f = self.files.pop(item.session, None)
            if f is not None:
                f.close()

    async def close(self) -> None:
        for f in self.files.values():
            if not f.closed:
                f.close()


def in_daemon(fn, *args) -> asyncio.Future:
    """fn(*args) in a daemon thread of its own. A call that may block for ever (a read of a pipe nobody
    closes, a write to a reader that stopped reading) would hold up the process's exit in the event
    loop's executor, which `asyncio.run` waits for; and on the event loop itself it would keep even a
    signal from being handled."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(ok: bool, value) -> None:
        if not fut.done():
            (fut.set_result if ok else fut.set_exception)(value)

    def run() -> None:
        try:
            out = (True, fn(*args))
        except BaseException as e:  # noqa: BLE001 (handed to the awaiting task)
            out = (False, e)
        try:
            loop.call_soon_threadsafe(settle, *out)
        except RuntimeError:  # the loop has closed: nobody waits any more
            pass

    threading.Thread(target=run, daemon=True).start()
    return fut


class StdinSource:
    """Raw 16-bit little-endian mono PCM at `input_rate` from standard input (resampled to
    `sample_rate`), as one session."""

    def __init__(self, sample_rate: int, input_rate: int | None = None, session: str = "stdin", block_ms: int = 20, stream=None):
        self.rate, self.input_rate, self.session = sample_rate, input_rate or sample_rate, session
        self.block = 2 * self.input_rate * block_ms // 1000
        self.stream = stream or sys.stdin.buffer

    async def __aiter__(self) -> AsyncIterator[Item]:
        rs = soxr.ResampleStream(self.input_rate, self.rate, 1, dtype="float32", quality="HQ")
        seq, pos, carry = 0, 0, b""
        try:  # the descriptor itself: a read left blocked at exit must hold no lock of the interpreter's stdin
            fd = self.stream.fileno()
            read = lambda n: os.read(fd, n)  # noqa: E731
        except (AttributeError, OSError, ValueError):  # an in-memory stream
            read = self.stream.read
        while True:
            raw = await in_daemon(read, self.block) or b""  # a pipe may give fewer bytes; none is its end
            data = carry + raw
            n = len(data) // 2 * 2
            data, carry = data[:n], data[n:]
            x = rs.resample_chunk(pcm16_decode(np.frombuffer(data, "<i2")), last=not raw)
            if len(x):
                yield AudioChunk(self.session, seq, torch.from_numpy(x.copy()), pos, time.monotonic())
                seq, pos = seq + 1, pos + len(x)
            if not raw:
                break
        yield End(self.session, pos, time.monotonic())


class StdoutSink:
    """Raw 16-bit little-endian mono PCM on standard output; errors go to standard error. Written off
    the event loop (a reader that pauses must not keep a signal from being handled); a reader that
    has gone raises BrokenPipeError, which `streamgen run` takes as the end of its output."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout.buffer
        try:  # the descriptor itself, as StdinSource reads (a write left blocked at exit holds no lock)
            self.fd: int | None = self.stream.fileno()
            self.stream.flush()
        except (AttributeError, OSError, ValueError):  # an in-memory stream
            self.fd = None

    def _write(self, pcm: bytes) -> None:
        if self.fd is None:
            self.stream.write(pcm)
            self.stream.flush()
            return
        view = memoryview(pcm)
        while view:
            view = view[os.write(self.fd, view):]

    async def write(self, item: Item) -> None:
        if isinstance(item, AudioOut):
            await in_daemon(self._write, pcm16_encode(item.samples.numpy()).tobytes())
        elif isinstance(item, SessionError):
            print(f"streamgen: session {item.session}: {item.message}", file=sys.stderr)

    async def close(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            pass
