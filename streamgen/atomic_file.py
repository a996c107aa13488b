"""Writing a file whole or not at all: written under a hidden name beside it, then renamed over it, so that a
process killed (or a disk filled) mid-write leaves the previous file as it was and never a truncated one under
the name (a killed writer's hidden .partial file stays beside it). The temporary name keeps the suffix, since some
writers (libsndfile) choose the format by it. Of two writers of one path at once, the last rename wins whole."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def partial_name(path: Path) -> Path:
    """Where `write_atomic` writes before the rename: .STEM.PID-TOKEN.partial.SUFFIX in the same directory, one name
    per writer (two writers of one path under one name interleaved their bytes, and one renamed the other's half)."""
    return path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.partial{path.suffix}")


def write_atomic(path: str | Path, write: Callable[[str], object]) -> Path:
    """write(temporary path), then rename it over `path`; if writing or renaming fails, the temporary file is
    removed and the error goes on."""
    path = Path(path)
    tmp = partial_name(path)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
