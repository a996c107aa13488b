"""Resuming a run that was stopped: what it recorded of its settings against what this run asks for."""

from __future__ import annotations

from pathlib import Path


def differences(recorded: dict, now: dict) -> str:
    """The settings that differ, for a message: "seed 0 (now 1), batch_size 4 (now 12)", a setting one side lacks
    "(absent)"; empty if none."""
    def shown(d: dict, k: str) -> str:
        return repr(d[k]) if k in d else "(absent)"

    keys = [*now, *(k for k in recorded if k not in now)]
    return ", ".join(f"{k} {shown(recorded, k)} (now {shown(now, k)})" for k in keys
                     if k not in recorded or k not in now or recorded[k] != now[k])


def whole_lines(path: Path) -> str:
    """The text of a file a stopped run appended lines to, without a last line it cut short: that line is dropped from
    the file too, so that what a resumed run appends starts a line of its own."""
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        path.write_text(text)
    return text
