"""What a user asks for, checked before any audio is read: every mistake becomes one `UsageError`
line that names the problem and, where there is one, the fix (the valid range, the choices, the
package to install). Shared by the `streamgen` command line and the SimulEval agent.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import typer

# output files the sinks write (PCM16); anything else is converted afterwards
WRITABLE = {".wav": "WAV", ".flac": "FLAC"}
MAX_CHUNK_MS = 10_000  # the pipeline refuses input chunks over 10 s
RATES = (1000, 384_000)  # raw PCM input rates soxr resamples from


class UsageError(ValueError):
    """A mistake in what the user asked for (the command line exits with code 2)."""


def parse_kv(pairs: list[str] | None, flag: str = "--opt") -> dict[str, str]:
    """KEY=VALUE strings to a dict; the last of a repeated key wins."""
    out = {}
    for kv in pairs or []:
        key, eq, value = kv.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"{flag} {kv!r}: expected KEY=VALUE, e.g. {flag} max_units=100")
        out[key.strip()] = value.strip()
    return out


def in_range(flag: str, value, lo=None, hi=None, unit: str = "", allow: tuple = ()) -> None:
    """`value` within [lo, hi] (either end open when None), or one of the special values `allow`."""
    if value in allow or ((lo is None or value >= lo) and (hi is None or value <= hi)):
        return
    u = f" {unit}" if unit else ""
    if hi is None:
        want = f"at least {lo}{u}"
    elif lo is None:
        want = f"at most {hi}{u}"
    else:
        want = f"from {lo} to {hi}{u}"
    also = "".join(f" or {a}" for a in allow)
    raise UsageError(f"{flag} {value}: must be {want}{also}")


def one_of(flag: str, value, choices) -> None:
    if value not in choices:
        raise UsageError(f"{flag} {value!r}: choose one of {', '.join(map(str, choices))}")


def need_module(module: str, extra: str, what: str) -> None:
    """An optional dependency that imports, or the one line that says how to install it."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{what} needs {module}, which is not installed: pip install 'streamgen[{extra}]'") from None
    except OSError as e:  # a wrapper whose system library is missing (sounddevice without PortAudio)
        raise UsageError(f"{what}: {module} cannot load its system library ({e}); install it (Debian: apt-get install libportaudio2)") from None


def check_device(device: str) -> str:
    import torch

    try:
        d = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r}: not a torch device; use cpu or cuda (cuda:N for the N-th GPU)") from None
    if d.type == "cuda":
        if torch.version.cuda is None:
            raise UsageError(f"--device {device}: this torch build ({torch.__version__}) has no CUDA support; "
                             "use --device cpu, or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA GPU(s) (cuda:0 ..)")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")
    elif d.type != "cpu":
        raise UsageError(f"--device {device!r}: streamgen runs on cpu or cuda")
    return device


def is_live(spec: str) -> bool:
    return spec in ("mic", "speaker", "-") or is_mqtt(spec)


def is_mqtt(spec: str) -> bool:
    return spec.startswith(("mqtt://", "mqtts://"))


@dataclass
class AudioFileInfo:
    path: Path
    seconds: float
    sample_rate: int
    channels: int


def check_audio_file(path: str | Path) -> AudioFileInfo:
    """An input file that exists and that libsndfile reads (WAV, FLAC, OGG, ...)."""
    from .io.files import audio_info

    p = Path(path)
    try:
        info = audio_info(p)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if info.frames == 0:
        raise UsageError(f"{p}: the file holds no audio samples")
    return AudioFileInfo(p, info.frames / info.samplerate, info.samplerate, info.channels)


def check_output_file(path: str | Path, flag: str = "--out", reads: Path | None = None) -> Path:
    """A WAV/FLAC path whose directory exists (it is never created behind the user's back), and not
    the file `reads` (an input read while the output is written)."""
    p = Path(path)
    if reads is not None and p.exists() and os.path.samefile(p, reads):
        raise UsageError(f"{flag} {p} is the input file too: writing it would destroy the input as it is read; "
                         "give the output another name")
    if p.suffix.lower() not in WRITABLE:
        raise UsageError(f"{flag} {p}: cannot write {p.suffix or 'a file without an extension'}; write .wav or .flac "
                         f"(convert afterwards, e.g. ffmpeg -i out.wav out.mp3)")
    if "{session}" in str(p.parent):
        raise UsageError(f"{flag} {p}: {{session}} may only appear in the file name, not in its directory")
    return check_writable(p, flag)


def check_writable(path: str | Path, flag: str) -> Path:
    """A file to write (a log, a report) in a directory that exists."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {p} is a directory; give a file name inside it")
    if not p.parent.is_dir():
        raise UsageError(f"{flag} {p}: the directory {p.parent} does not exist; create it first")
    if not os.access(p.parent, os.W_OK):
        raise UsageError(f"{flag} {p}: the directory {p.parent} is not writable for this user; give another")
    return p


def check_input_spec(spec: str, *, vad: bool = False) -> AudioFileInfo | None:
    """The input of `streamgen run`: a file (returned with its length), or a live source whose
    optional packages are installed."""
    if spec == "mic":
        need_module("sounddevice", "audio", "--in mic")
    elif is_mqtt(spec):
        need_module("aiomqtt", "mqtt", "--in mqtt://")
    elif spec != "-":
        return check_audio_file(spec)
    if vad:
        need_module("silero_vad", "vad", "--vad")
    return None


def check_output_spec(spec: str, reads: Path | None = None) -> None:
    if spec == "speaker":
        need_module("sounddevice", "audio", "--out speaker")
    elif is_mqtt(spec):
        need_module("aiomqtt", "mqtt", "--out mqtt://")
    elif spec != "-":
        check_output_file(spec, reads=reads)


@dataclass
class StreamSettings:
    """The numeric knobs of the live pipeline; `check` names the first one out of range."""

    chunk_ms: int = 100
    left_context_ms: int = 2000  # -1: everything before
    lookahead_ms: int = 100  # -1: until the end of input
    vocoder_lookahead: int = -1  # frames; -1: exact
    queue_size: int = 16
    overflow: str = "block"

    def check(self) -> StreamSettings:
        in_range("--chunk-ms", self.chunk_ms, 10, MAX_CHUNK_MS, "ms")
        in_range("--left-context-ms", self.left_context_ms, 0, None, "ms", allow=(-1,))
        in_range("--lookahead-ms", self.lookahead_ms, 0, None, "ms", allow=(-1,))
        in_range("--vocoder-lookahead", self.vocoder_lookahead, 0, None, "frames", allow=(-1,))
        in_range("--queue-size", self.queue_size, 1, None, "items")
        one_of("--overflow", self.overflow, ("block", "drop-oldest"))
        return self

    def engine_args(self) -> dict:
        """Keyword arguments of `build_engine` (None where unbounded)."""
        opt = lambda x: None if x < 0 else x
        return dict(chunk_ms=self.chunk_ms, left_context_ms=opt(self.left_context_ms), lookahead_ms=opt(self.lookahead_ms),
                    vocoder_lookahead=opt(self.vocoder_lookahead))


def check_task(task: str, options: dict[str, str], input_s: float | None = None, bundle=None) -> dict:
    """The task's plugin accepts these options (names, types, ranges, choices) and, when its length
    is known, this input; returns the resolved options."""
    from .pipeline.tasks import load_task

    try:
        plugin = load_task(task)
        return plugin.resolve_options(options, input_s, bundle)
    except ValueError as e:  # UnknownTask too
        raise UsageError(str(e)) from None


def fail(msg: str, code: int = 2) -> None:
    """One line on standard error and the exit code: 2 for a mistake in the command, 1 for a failure while running."""
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


LM_DTYPES = ("float32", "bfloat16")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bfloat16 arithmetic
LM_DTYPE_HELP = ("Unit mBART precision: float32 (the default, exact) or bfloat16 (on a CPU the backbones' encoder stacks, "
                 "faster with AMX or AVX-512 BF16, slower without; on a GPU the whole backbones).")


def check_lm_dtype(name: str | None):
    """--lm-dtype: None (the bundle's float32) or one of LM_DTYPES, as a torch dtype."""
    import torch

    if name is None:
        return None
    if name not in LM_DTYPES:
        raise UsageError(f"--lm-dtype {name!r}: choose {LM_DTYPES[0]} (exact, the default) or {LM_DTYPES[1]} "
                         "(faster on GPUs and on CPUs with AMX or AVX-512 BF16)")
    return getattr(torch, name)


def cpu_has_bfloat16_arithmetic(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes in bfloat16 natively (AMX or AVX-512 BF16). Without it torch emulates
    bfloat16 matmuls, and the encoder stack runs 5-8x slower than in float32 (bench/RESULTS.md)."""
    try:
        flags = cpuinfo.read_text().split()
    except OSError:  # not Linux: ask oneDNN
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return any(f in flags for f in BF16_CPU_FLAGS)


def lm_dtype_warning(device: str, lm_dtype) -> str | None:
    """The one line to print where --lm-dtype bfloat16 would slow the run down instead of speeding it up."""
    import torch

    if lm_dtype != torch.bfloat16 or torch.device(device).type != "cpu" or cpu_has_bfloat16_arithmetic():
        return None
    return ("--lm-dtype bfloat16: this CPU has no bfloat16 arithmetic (neither AMX nor AVX-512 BF16), so the "
            "backbones' encoders run several times slower than in float32; leave --lm-dtype out here")


def cast_backbones(bundle, device: str, lm_dtype=None):
    """The bundle's Unit mBART backbones in `lm_dtype` where given (`Bundle.lm_to`), after one warning
    line on standard error where that dtype would slow this machine down (`lm_dtype_warning`)."""
    if (note := lm_dtype_warning(device, lm_dtype)) is not None:
        typer.secho(f"warning: {note}", fg=typer.colors.YELLOW, err=True)
    return bundle.lm_to(lm_dtype) if lm_dtype is not None else bundle


THREADS_HELP = ("Torch threads for the engine's CPU work (default: 1, or $OMP_NUM_THREADS where set). Its calls are small, "
                "so a second thread adds latency instead of saving it (2-core CPU, translation: p99 lag 87 -> 173 ms for one "
                "session, 272 -> 537 ms for four); to use more cores run more workers (serve --mqtt).")


def engine_threads(threads: int | None, device: str, environ=os.environ) -> int | None:
    """How many torch threads a live engine should run with: `threads` where the user gave it; else 1 for
    a CPU engine unless OMP_NUM_THREADS is set (torch already follows it then); None: leave torch as is.

    torch's default, one thread per core, splits every operator of a decoder step (a few hundred, each
    a few microseconds to a hundred of work) across the cores and joins them again, and on this
    project's 2-core machine that made every live figure worse (bench/RESULTS.md)."""
    if threads is not None:
        in_range("--threads", threads, 1, None)
        return threads
    import torch

    if torch.device(device).type != "cpu" or environ.get("OMP_NUM_THREADS"):
        return None
    return 1


def set_engine_threads(threads: int | None, device: str) -> None:
    import torch

    n = engine_threads(threads, device)
    if n is not None:
        torch.set_num_threads(n)


def open_bundle(path: Path | None, device: str, lm_dtype=None):
    """The given bundle, else the one shipped with streamgen; its Unit mBART backbones in `lm_dtype`
    where given (a torch dtype, see `check_lm_dtype` and `cast_backbones`)."""
    from .bundle import BundleError, load_bundle

    try:
        b = load_bundle(path, device=device)
    except BundleError as e:
        fail(str(e))
    return cast_backbones(b, device, lm_dtype)
