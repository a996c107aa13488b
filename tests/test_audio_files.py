"""Audio files in and out.

In: what libsndfile cannot read as it is is read anyway, whole, or named in one line. A pipe in place of a file
(`--in <(sox ...)`, a FIFO) is opened more than once by the commands (its header, its speech check, its audio) and
libsndfile reads no FLAC from a pipe at all; a FLAC whose encoder wrote it to a pipe gives no length, and
soundfile's own read lost its last block.

Standard input: raw 16-bit PCM, or a WAV stream whose header gives its layout (`arecord | streamgen run --in -`);
another container used to be read as noise, and is named with the way to send it.

Out: a write that fails (a full disk, a file-size limit) is named with the system's reason, not libsndfile's
"System error.", and what was written is not left under the name of the whole."""

import asyncio
import io
import os
import resource
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

import streamgen.cli as cli
import streamgen.io.files as files_mod
import streamgen.options as options
import torch
from streamgen.io.files import FileSink, FileSource, StdinSource, UNKNOWN_LENGTH, WriteFailed, audio_info, file_has_speech, read_audio
from streamgen.pipeline.items import AudioChunk, AudioOut, End, SessionError
from streamgen.testing import random_bundle

STREAMGEN = str(Path(sys.executable).parent / "streamgen")


def talk(seconds=2.0, rate=16000):
    t = np.arange(int(rate * seconds)) / rate
    return (np.sin(2 * np.pi * 150 * t) * (np.sin(2 * np.pi * 4 * t) > 0) * 0.3).astype(np.float32)


def without_length(flac: Path, out: Path) -> Path:
    """The FLAC with STREAMINFO's total-samples field zeroed, as an encoder writing to a pipe leaves it."""
    b = bytearray(flac.read_bytes())
    assert b[:4] == b"fLaC"
    b[21] &= 0xF0  # the field's top 4 bits
    b[22:26] = bytes(4)  # and its other 32
    out.write_bytes(bytes(b))
    return out


def through_fifo(tmp_path: Path, data: bytes, name="fifo") -> Path:
    """A FIFO a thread writes `data` into, once, as a process substitution would."""
    fifo = tmp_path / name
    os.mkfifo(fifo)

    def write():
        with open(fifo, "wb") as f:
            f.write(data)

    threading.Thread(target=write, daemon=True).start()
    return fifo


def within(seconds, fn, *args):
    """fn(*args) in a thread, failing the test (not hanging the suite) when it does not return in time: a second
    open of a FIFO whose writer is done waits for ever."""
    out = []

    def run():
        try:
            out.append((True, fn(*args)))
        except BaseException as e:  # noqa: BLE001 (raised again in the test)
            out.append((False, e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn.__name__} still waiting after {seconds} s (opened a pipe twice?)"
    ok, value = out[0]
    if not ok:
        raise value
    return value


async def chunks(source):
    got, end = [], None
    async for item in source:
        if isinstance(item, AudioChunk):
            got.append(item.samples.numpy())
        else:
            assert isinstance(item, End)
            end = item
    return np.concatenate(got), end


@pytest.fixture(autouse=True)
def fresh_copies(monkeypatch):
    monkeypatch.setattr(files_mod, "_readable", {})  # each test's paths made readable afresh


@pytest.fixture
def flac(tmp_path):
    path = tmp_path / "talk.flac"
    sf.write(path, talk(), 16000, subtype="PCM_16")
    return path


def test_a_flac_without_its_length_is_read_to_its_last_sample(tmp_path, flac, monkeypatch):
    bare = without_length(flac, tmp_path / "bare.flac")
    assert sf.info(str(bare)).frames == UNKNOWN_LENGTH  # what libsndfile makes of it
    want = read_audio(flac, 16000).numpy()
    np.testing.assert_array_equal(read_audio(bare, 16000).numpy(), want)
    info = audio_info(bare)
    assert info.frames == len(want) == 32000 and info.duration == 2.0
    counted = []
    monkeypatch.setattr(files_mod, "_count_frames", lambda p, f=files_mod._count_frames: counted.append(p) or f(p))
    got, end = asyncio.run(chunks(FileSource(bare, 16000, block_ms=20)))
    assert counted == []  # streaming it needs only its rate: it is decoded once, not counted first
    np.testing.assert_array_equal(got, want)
    assert end.source_samples == 32000
    assert file_has_speech(bare)
    # read as it is, in memory or streamed: no copy on disk (training and eval read thousands of such files)
    assert files_mod._readable == {}


@pytest.mark.parametrize("kind", ["flac", "wav"])
def test_a_pipe_in_place_of_a_file_is_read_once_whole(tmp_path, flac, kind):
    src = flac if kind == "flac" else tmp_path / "talk.wav"
    if kind == "wav":
        sf.write(src, talk(), 16000, subtype="PCM_16")
    fifo = through_fifo(tmp_path, src.read_bytes())
    info = within(60, audio_info, fifo)  # the first open reads the pipe to its end ...
    assert info.frames == 32000
    assert within(60, file_has_speech, fifo)  # ... and every later one reads the copy
    got, end = within(60, lambda: asyncio.run(chunks(FileSource(fifo, 16000))))
    np.testing.assert_array_equal(got, read_audio(src, 16000).numpy())
    assert end.source_samples == 32000


def test_the_run_command_takes_a_process_substitution_and_names_what_it_cannot_read(tmp_path, flac):
    random_bundle().save(tmp_path / "tiny")
    base = [STREAMGEN, "run", "--bundle", str(tmp_path / "tiny"), "--task", "resynthesis"]

    def bash(command: str, out: str):  # the real command, as a shell user types it: `--in <(...)`
        cmd = " ".join(shlex.quote(a) for a in base) + f" --in {command} --out {shlex.quote(str(tmp_path / out))}"
        return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)

    r = bash(f"<(cat {shlex.quote(str(flac))})", "piped.wav")
    assert r.returncode == 0, r.stderr
    r = CliRunner().invoke(cli.app, base[1:] + ["--in", str(flac), "--out", str(tmp_path / "file.wav")])
    assert r.exit_code == 0, r.output
    assert sf.info(str(tmp_path / "piped.wav")).frames == sf.info(str(tmp_path / "file.wav")).frames > 0

    r = bash("<(echo hello)", "x.wav")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: /dev/fd/") and ": cannot read audio (Format not recognised" in r.stderr  # not its copy's name
    r = CliRunner().invoke(cli.app, base[1:] + ["--in", "/dev/null", "--out", str(tmp_path / "x.wav")])
    assert r.exit_code == 2 and "error: /dev/null is a device, not an audio file" in r.output and r.output.count("\n") == 1
    assert not (tmp_path / "x.wav").exists()


def test_a_pipe_past_the_bound_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(files_mod, "MAX_SPOOL_BYTES", 1000)
    fifo = through_fifo(tmp_path, bytes(5000))
    with pytest.raises(ValueError, match="a pipe of more than .* is read to its end before its audio is"):
        within(60, audio_info, fifo)


def test_a_run_whose_output_outgrows_what_it_may_write_names_why_and_sets_the_part_aside(tmp_path, flac):
    random_bundle().save(tmp_path / "tiny")
    out = tmp_path / "out.wav"

    def limited():  # a file-size limit: the same failed write as a full disk, without filling one
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (30000, 30000))

    r = subprocess.run([STREAMGEN, "run", "--bundle", str(tmp_path / "tiny"), "--task", "resynthesis", "--in", str(flac),
                        "--out", str(out)], capture_output=True, text=True, timeout=300, preexec_fn=limited)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    aside = tmp_path / "out.incomplete.wav"
    seconds = sf.info(str(aside)).duration
    assert r.stderr == f"error: {out}: writing session file's audio failed (File too large); the {seconds:.1f} s written are in {aside}\n"
    assert not out.exists() and 0 < seconds < 2.0


def test_a_full_disk_is_named(tmp_path):
    full = tmp_path / "full.wav"
    full.symlink_to("/dev/full")  # every write: no space left on device
    with pytest.raises(WriteFailed, match=r"full.wav: cannot write session s's audio \(No space left on device\)"):
        asyncio.run(FileSink(full, 16000).write(AudioOut("s", torch.zeros(320), 320, 0.0)))
    # write_audio writes the whole under another name first: a failure leaves a file already there as it was
    (tmp_path / "old.wav").write_bytes(b"the last take")
    code = ("import numpy as np, resource, signal\n"
            "from streamgen.io.files import write_audio, WriteFailed\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
            "try:\n"
            f"    write_audio({str(tmp_path / 'old.wav')!r}, np.zeros(16000, np.float32), 16000)\n"
            "except WriteFailed as e:\n"
            "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout == f"{tmp_path / 'old.wav'}: cannot write audio (File too large); nothing written\n", (r.stdout, r.stderr)
    assert (tmp_path / "old.wav").read_bytes() == b"the last take" and sorted(p.name for p in tmp_path.iterdir()) == ["full.wav", "old.wav"]


def test_an_output_directory_this_user_cannot_write_is_named_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(options.os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(options.UsageError, match=f"the directory {tmp_path} is not writable for this user"):
        options.check_output_file(tmp_path / "out.wav")


class Trickle(io.RawIOBase):
    """A pipe that gives a few bytes per read."""

    def __init__(self, data: bytes, n: int = 3):
        self.data, self.n = data, n

    def readable(self):
        return True

    def read(self, size=-1):
        out, self.data = self.data[: min(self.n, size)], self.data[min(self.n, size):]
        return out


def from_stdin(data: bytes, trickle: int = 0):
    stream = Trickle(data, trickle) if trickle else io.BytesIO(data)
    got, items = [], []

    async def run():
        async for item in StdinSource(16000, stream=stream):
            items.append(item)
            if isinstance(item, AudioChunk):
                got.append(item.samples.numpy())

    asyncio.run(run())
    return (np.concatenate(got) if got else np.zeros(0, np.float32)), items


def wav_bytes(wave, rate=16000, subtype="PCM_16", extra: bytes = b"", streamed=False) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, subtype=subtype, format="WAV")
    b = bytearray(buf.getvalue())
    if streamed:  # as arecord writes to a pipe: no sizes
        i = b.index(b"data")
        b[4:8] = b[i + 4:i + 8] = b"\xff\xff\xff\xff"
    return bytes(b) + extra


@pytest.mark.parametrize("trickle", [0, 3], ids=["whole", "3-bytes-a-read"])
def test_standard_input_takes_raw_pcm_and_wav_streams(trickle):
    wave = talk(1.0)
    pcm = sf.read(io.BytesIO(wav_bytes(wave)), dtype="int16")[0]  # the WAV's own samples
    want = pcm.astype(np.float32) / 32768
    got, items = from_stdin(pcm.tobytes(), trickle)
    np.testing.assert_array_equal(got, want)
    got, _ = from_stdin(wav_bytes(wave), trickle)  # the header is not audio
    np.testing.assert_array_equal(got, want)
    got, _ = from_stdin(wav_bytes(wave, streamed=True), trickle)
    np.testing.assert_array_equal(got, want)
    tags = b"LIST" + (8).to_bytes(4, "little") + b"INFOtags"
    got, items = from_stdin(wav_bytes(wave, extra=tags), trickle)  # what follows the data chunk is not audio either
    np.testing.assert_array_equal(got, want)
    assert items[-1].source_samples == 16000


def test_standard_input_takes_a_float_stereo_wav_at_its_own_rate():
    wave = talk(1.0, rate=44100)
    got, items = from_stdin(wav_bytes(np.stack([wave, wave], 1), rate=44100, subtype="FLOAT"))
    want = asyncio.run(chunks(FileSource(write_and_name(wave, 44100), 16000)))[0]
    assert len(got) == len(want) == 16000 and np.abs(got - want).max() < 1e-5


def write_and_name(wave, rate, name="ref.wav"):
    import tempfile

    path = Path(tempfile.mkdtemp()) / name
    sf.write(path, wave, rate, subtype="FLOAT")
    return path


@pytest.mark.parametrize("data, what", [
    (b"fLaC" + bytes(100), "standard input carries a FLAC file, not raw PCM or WAV: give it as --in FILE"),
    (b"OggS" + bytes(100), "standard input carries an OGG file"),
    (b"ID3\x03" + bytes(100), "standard input carries an MP3 file"),
    (wav_bytes(np.zeros(100, np.float32), subtype="PCM_24"), "standard input carries a WAV of 24-bit PCM samples, 1 channel(s) at 16000 Hz"),
    (wav_bytes(np.zeros(100, np.float32))[:30], "standard input ended inside a WAV header"),
])
def test_standard_input_names_what_it_cannot_read_and_how_to_send_it(data, what):
    got, items = from_stdin(data)
    assert len(got) == 0 and isinstance(items[0], SessionError) and isinstance(items[-1], End) and len(items) == 2
    assert items[0].message.startswith(what) and "sox IN -t raw -e signed -b 16 -c 1 -r 16000 -" in items[0].message
