"""Audio files and raw PCM streams in and out.

Files: any rate and channel count in (mixed to mono, resampled with soxr), WAV/FLAC out. File input
can be paced in real time to simulate a live talker; a pipe in place of a file (`--in <(sox ...)`) is read to
its end first. Standard input: raw 16-bit little-endian mono PCM, or a WAV stream (its header says its layout);
standard output: raw 16-bit PCM, for shell pipelines.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from torch import Tensor

from ..atomic_file import write_atomic
from ..audio import SpeechGate, pcm16_decode, pcm16_encode
from ..pipeline.items import AudioChunk, AudioOut, End, Item, SessionError


def resample(wave: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    if rate_in == rate_out:
        return wave
    return soxr.resample(wave, rate_in, rate_out, quality="HQ").astype(np.float32)


UNKNOWN_LENGTH = 2**63 - 1  # libsndfile's length of a file whose header gives none (a FLAC its encoder wrote to a pipe)
MAX_SPOOL_BYTES = 4 << 30  # a pipe read to its end: at most this much
_readable: dict[str, Path] = {}  # the copies `readable_path` made, by the path given
_spool_dir: list[Path] = []


def _reason(e: Exception) -> str:
    """libsndfile's own words, without the path it was handed (a copy's, where the input was a pipe)."""
    return getattr(e, "error_string", None) or str(e)


def _spool_file(suffix: str) -> Path:
    if not _spool_dir:
        _spool_dir.append(Path(tempfile.mkdtemp(prefix="streamgen-in-")))
        atexit.register(shutil.rmtree, _spool_dir[0], True)
    return _spool_dir[0] / f"{len(_readable)}{suffix}"


def _spool_pipe(p: Path) -> Path:
    """A pipe's bytes, read to its end once, in a regular file: libsndfile opens a path more than once (its
    header, then its audio) and cannot read a FLAC or OGG from a pipe at all."""
    out = _spool_file(".audio")
    with open(p, "rb") as src, open(out, "wb") as dst:
        total = 0
        while block := src.read(1 << 20):
            total += len(block)
            if total > MAX_SPOOL_BYTES:
                raise ValueError(f"{p}: a pipe of more than {MAX_SPOOL_BYTES >> 30} GiB; a pipe is read to its end before "
                                 "its audio is: give a file, or stream raw PCM with --in -")
            dst.write(block)
    return out


def _read_frames(f: sf.SoundFile, frames: int) -> np.ndarray:
    """Up to `frames` frames [n, channels] float32 from where `f` stands. soundfile's own read seeks past what it read,
    which fails at the end of a file of unknown length and loses the last block; libsndfile's read itself does not."""
    if f.frames != UNKNOWN_LENGTH:
        return f.read(frames, dtype="float32", always_2d=True)
    readf, ffi = getattr(sf, "_snd", None), getattr(sf, "_ffi", None)
    if readf is None or ffi is None:  # (a soundfile without the binding: name the way out)
        raise ValueError(f"{f.name}: its header gives no length, which this soundfile cannot read to the end; "
                         "rewrite it with one (e.g. sox in.flac out.flac)")
    out = np.empty((frames, f.channels), np.float32)
    got = readf.sf_readf_float(f._file, ffi.cast("float *", out.ctypes.data), frames)
    return out[:got]


def _blocks(f: sf.SoundFile, frames: int = 1 << 16):
    """Blocks of up to `frames` frames [n, channels] float32 from where `f` stands to its end, its length known or not."""
    while len(block := _read_frames(f, frames)):
        yield block


def _read_all(f: sf.SoundFile) -> np.ndarray:
    """Every frame [n, channels] float32 from where `f` stands, its length known or not."""
    if f.frames != UNKNOWN_LENGTH:
        return f.read(dtype="float32", always_2d=True)
    blocks = list(_blocks(f))
    return np.concatenate(blocks) if blocks else np.zeros((0, f.channels), np.float32)


def _count_frames(p: Path) -> int:
    """The frames of a file whose header gives no length, counted by decoding it once (nothing is written)."""
    with sf.SoundFile(str(p)) as f:
        return sum(len(block) for block in _blocks(f))


def _unreadable(path, e: Exception) -> ValueError:
    """The error for a file libsndfile cannot read as audio."""
    return ValueError(f"{path}: cannot read audio ({_reason(e)}); give a WAV, FLAC or OGG file")


def readable_path(path: str | Path) -> Path:
    """`path`, or a regular file holding the same audio where libsndfile cannot read `path` as it is: a pipe
    (a process substitution `<(...)`, a FIFO) read to its end, once per process; the copies go when it exits.
    A file whose header gives no length is read as it is (read it with `_read_frames`). ValueError: what the
    path is instead of audio."""
    return _readable_with_info(path, count=False)[0]


def audio_info(path: str | Path):
    """soundfile's header info of an audio file (where the header gives no length, the frames counted), or a
    ValueError that says what the path is instead."""
    return _readable_with_info(path)[1]


def _readable_with_info(path: str | Path, count: bool = True):
    """`readable_path` and the header info of what it gives, read once; `count`: a length the header does not give
    is counted."""
    p = Path(path)
    out = _readable.get(str(p))
    if out is None:
        try:
            mode = p.stat().st_mode
        except FileNotFoundError:
            raise ValueError(f"{p}: no such file") from None
        except OSError as e:
            raise ValueError(f"{p}: cannot read it ({e.strerror})") from None
        if stat.S_ISDIR(mode):
            raise ValueError(f"{p} is a directory; give an audio file (WAV, FLAC, OGG)")
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            out = _spool_pipe(p)
        elif not stat.S_ISREG(mode):
            raise ValueError(f"{p} is a device, not an audio file; give a file (WAV, FLAC, OGG), or stream raw PCM with --in -")
        else:
            out = p
    try:
        info = sf.info(str(out))
        if info.frames == UNKNOWN_LENGTH and count:  # (an encoder that wrote to a pipe): decoded once to count them, not copied
            info.frames = _count_frames(out)
            info.duration = info.frames / info.samplerate
    except (sf.LibsndfileError, RuntimeError) as e:
        raise _unreadable(p, e) from None
    if out != p:  # (a copy: kept for the process; a file read as it is is looked at afresh, training reads thousands)
        _readable[str(p)] = out
    return out, info


def read_audio(path: str | Path, sample_rate: int) -> Tensor:
    """Mono float32 [T] at `sample_rate` from a WAV/FLAC/OGG file (or a pipe carrying one). A file read whole needs
    no copy even where its header gives no length: training reads thousands of files, each in many epochs."""
    p = Path(path)
    src = p if str(p) not in _readable and p.is_file() else readable_path(p)
    try:
        with sf.SoundFile(str(src)) as f:
            data, rate = _read_all(f), f.samplerate
    except (sf.LibsndfileError, RuntimeError) as e:
        raise _unreadable(p, e) from None
    return torch.from_numpy(resample(data.mean(axis=1), rate, sample_rate))


class WriteFailed(OSError):
    """Audio could not be written: the message names the file, the system's reason and where what was written is."""


def os_reason(e: Exception) -> str:
    """Why libsndfile failed: its "System error." is the system's (no space left on device, file too large,
    permission denied), which cffi kept from the failing call."""
    if isinstance(e, OSError) and e.strerror:  # (an OSError of our own: a rename, say)
        return e.strerror
    code = getattr(getattr(sf, "_ffi", None), "errno", 0)
    if isinstance(e, sf.LibsndfileError) and getattr(e, "code", None) == 2 and code:  # SFE_SYSTEM
        return os.strerror(code)
    return _reason(e)


def _set_aside(f: sf.SoundFile, path: Path) -> Path | None:
    """A file whose writing failed, closed and renamed NAME.incomplete.EXT, so that its valid-looking header
    does not pass it off as the whole; None if nothing of it is left."""
    try:
        f.close()
    except (sf.LibsndfileError, RuntimeError, OSError):
        pass
    aside = path.with_name(f"{path.stem}.incomplete{path.suffix}")
    try:
        os.replace(path, aside)
        return aside
    except OSError:
        return None


def write_audio(path: str | Path, wave: Tensor | np.ndarray, sample_rate: int) -> Path:
    """Write mono audio (PCM16 WAV, or FLAC by extension) into an existing directory; WriteFailed names why not."""
    wave = wave.detach().cpu().float().numpy() if isinstance(wave, Tensor) else np.asarray(wave, np.float32)
    path = Path(path)
    try:  # whole or not at all: a failure leaves no part of the audio under the name, and a file already there as it was
        return write_atomic(path, lambda tmp: sf.write(tmp, np.clip(wave, -1.0, 1.0), sample_rate, subtype="PCM_16"))
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise WriteFailed(f"{path}: cannot write audio ({os_reason(e)}); nothing written") from None


def file_has_speech(path: str | Path, block_s: float = 1.0) -> bool:
    """Whether an audio file carries speech (`SpeechGate`, at the file's own rate); reads only up
    to the first speech."""
    try:
        with sf.SoundFile(str(readable_path(path))) as f:
            gate = SpeechGate(f.samplerate)
            for block in _blocks(f, max(1, int(block_s * f.samplerate))):
                if gate.push(block.mean(axis=1)):
                    return True
    except (sf.LibsndfileError, RuntimeError) as e:
        raise _unreadable(path, e) from None
    return False


class FileSource:
    """Streams a file as one session, in blocks of `block_ms`; `realtime` paces it like a live talker."""

    def __init__(self, path: str | Path, sample_rate: int, session: str = "file", block_ms: int = 20, realtime: bool = False):
        self.path, self.rate, self.session = Path(path), sample_rate, session
        self.block_ms, self.realtime = block_ms, realtime
        self.info = _readable_with_info(self.path, count=False)[1]  # its rate and channels (a missing length is not counted)

    async def __aiter__(self) -> AsyncIterator[Item]:
        rs = soxr.ResampleStream(self.info.samplerate, self.rate, 1, dtype="float32", quality="HQ")
        block = max(1, self.info.samplerate * self.block_ms // 1000)
        t0, emitted, seq = time.monotonic(), 0, 0
        with sf.SoundFile(str(readable_path(self.path))) as f:
            while True:
                data = _read_frames(f, block)
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
            try:
                self.files[session] = sf.SoundFile(str(name), "w", self.rate, 1, subtype="PCM_16")
            except (sf.LibsndfileError, RuntimeError) as e:
                raise WriteFailed(f"{name}: cannot write session {session}'s audio ({os_reason(e)})") from None
        return self.files[session]

    async def write(self, item: Item) -> None:
        if isinstance(item, AudioOut):
            f = self._file(item.session)
            try:
                f.write(np.clip(item.samples.numpy(), -1.0, 1.0))
            except (sf.LibsndfileError, RuntimeError) as e:
                why = os_reason(e)
                del self.files[item.session]
                aside = _set_aside(f, Path(f.name))
                try:
                    kept = f"the {sf.info(str(aside)).duration:.1f} s written are in {aside}"
                except (sf.LibsndfileError, RuntimeError, TypeError):  # (None: the rename failed too)
                    kept = f"what was written is in {aside}" if aside else "nothing of it is left"
                raise WriteFailed(f"{f.name}: writing session {item.session}'s audio failed ({why}); {kept}") from None
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


CONTAINERS = {b"fLaC": "a FLAC file", b"OggS": "an OGG file", b"ID3\x02": "an MP3 file", b"ID3\x03": "an MP3 file",
              b"ID3\x04": "an MP3 file", b"RIFX": "a big-endian WAV", b"RF64": "an RF64 WAV", b"FORM": "an AIFF file",
              b".snd": "an AU file"}  # (four bytes each: raw PCM hardly begins so)
MAX_WAV_HEADER = 1 << 20  # bytes before a WAV's data chunk (a LIST of tags, say): at most this much


@dataclass(frozen=True)
class PcmLayout:
    """How the bytes on standard input are samples: raw 16-bit mono at the rate given, unless a WAV header says."""

    rate: int
    channels: int = 1
    dtype: str = "<i2"  # or "<f4" (a float WAV)
    data_bytes: int | None = None  # the WAV's data chunk, when its header gives it

    @property
    def frame(self) -> int:
        return self.channels * np.dtype(self.dtype).itemsize

    def decode(self, data: bytes) -> np.ndarray:
        x = np.frombuffer(data, self.dtype).reshape(-1, self.channels)
        x = pcm16_decode(x) if self.dtype == "<i2" else x.astype(np.float32)
        return x.mean(axis=1) if self.channels > 1 else x[:, 0]


def stdin_layout(head: bytes, rate: int, at_end: bool) -> tuple[PcmLayout, int] | None:
    """What standard input carries, from its first bytes: (layout, bytes of header to skip), or None while too
    few bytes have come to tell. Raw PCM has no header; a WAV (what `arecord` and `sox -t wav -` write) says its
    rate and channels; another container is named with the way to send it. ValueError: what is wrong, and the fix."""
    fix = "give it as --in FILE (or --in <(command)), or send raw 16-bit mono PCM, e.g. sox IN -t raw -e signed -b 16 -c 1 -r 16000 -"
    for magic, what in CONTAINERS.items():
        if head.startswith(magic):
            raise ValueError(f"standard input carries {what}, not raw PCM or WAV: {fix}")
    if len(head) < 12 and not at_end:
        return None
    if not (head.startswith(b"RIFF") and head[8:12] == b"WAVE"):
        return PcmLayout(rate), 0
    at, fmt = 12, None
    while True:
        if len(head) < at + 8:
            break
        cid, size = head[at:at + 4], int.from_bytes(head[at + 4:at + 8], "little")
        if cid == b"fmt ":
            if len(head) < at + 8 + min(size, 40):
                break
            tag, channels, wav_rate = (int.from_bytes(head[at + 8 + a:at + 8 + b], "little") for a, b in ((0, 2), (2, 4), (4, 8)))
            bits = int.from_bytes(head[at + 22:at + 24], "little")
            if tag == 0xFFFE and size >= 40:  # WAVE_FORMAT_EXTENSIBLE: the format is its sub-format's
                tag = int.from_bytes(head[at + 32:at + 34], "little")
            fmt = (tag, channels, wav_rate, bits)
        elif cid == b"data":
            if fmt is None:
                raise ValueError("standard input carries a WAV whose data comes before its format: " + fix)
            tag, channels, wav_rate, bits = fmt
            if (tag, bits) not in ((1, 16), (3, 32)) or not 1 <= channels <= 64 or not 1000 <= wav_rate <= 384_000:
                raise ValueError(f"standard input carries a WAV of {bits}-bit {'float' if tag == 3 else 'PCM' if tag == 1 else f'format {tag}'} "
                                 f"samples, {channels} channel(s) at {wav_rate} Hz; 16-bit PCM or 32-bit float at 1000-384000 Hz is read: {fix}")
            # a writer that cannot seek back leaves a size it cannot know (0, 2**31, 2**32 - 1: arecord to a pipe
            # writes 2**31): read to the end of the stream then
            known = size if 0 < size < 0x80000000 else None
            return PcmLayout(wav_rate, channels, "<i2" if tag == 1 else "<f4", known), at + 8
        at += 8 + size + (size & 1)
        if at > MAX_WAV_HEADER:
            raise ValueError(f"standard input carries a WAV with more than {MAX_WAV_HEADER >> 20} MiB before its audio: {fix}")
    if at_end:
        raise ValueError("standard input ended inside a WAV header: " + fix)
    return None


class StdinSource:
    """Raw 16-bit little-endian mono PCM at `input_rate` from standard input (resampled to `sample_rate`), as
    one session; or a WAV stream of 16-bit or float samples (its header gives the rate and channels:
    `arecord -f S16_LE -r 16000 | streamgen run --in -`).
    Other containers (FLAC, OGG, MP3), which used to be read as noise, end the session saying how to send them."""

    def __init__(self, sample_rate: int, input_rate: int | None = None, session: str = "stdin", block_ms: int = 20, stream=None):
        self.rate, self.input_rate, self.session = sample_rate, input_rate or sample_rate, session
        self.block = 2 * self.input_rate * block_ms // 1000
        self.stream = stream or sys.stdin.buffer

    async def __aiter__(self) -> AsyncIterator[Item]:
        seq, pos, carry, layout, rs, left = 0, 0, b"", None, None, None
        try:  # the descriptor itself: a read left blocked at exit must hold no lock of the interpreter's stdin
            fd = self.stream.fileno()
            read = lambda n: os.read(fd, n)  # noqa: E731
        except (AttributeError, OSError, ValueError):  # an in-memory stream
            read = self.stream.read
        while True:
            raw = await in_daemon(read, self.block) or b""  # a pipe may give fewer bytes; none is its end
            data = carry + raw
            if layout is None:
                try:
                    found = stdin_layout(data, self.input_rate, at_end=not raw)
                except ValueError as e:
                    yield SessionError(self.session, str(e))
                    break
                if found is None:
                    carry = data
                    continue
                layout, skip = found
                data, left = data[skip:], layout.data_bytes
                rs = soxr.ResampleStream(layout.rate, self.rate, 1, dtype="float32", quality="HQ")
            if left is not None:  # a WAV's data chunk ends where its header says (tags may follow it)
                data = data[:left]
            n = len(data) // layout.frame * layout.frame
            data, carry = data[:n], data[n:]
            if left is not None:
                left -= n
            done = not raw or left == 0
            x = rs.resample_chunk(layout.decode(data), last=done)
            if len(x):
                yield AudioChunk(self.session, seq, torch.from_numpy(x.copy()), pos, time.monotonic())
                seq, pos = seq + 1, pos + len(x)
            if done:
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
