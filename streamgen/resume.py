"""Resuming a run that was stopped: what it recorded of its settings against what this run asks for."""

from __future__ import annotations


def differences(recorded: dict, now: dict) -> str:
    """The settings that differ, for a message: "seed 0 (now 1), batch_size 4 (now 12)"; empty if none."""
    keys = [*now, *(k for k in recorded if k not in now)]
    return ", ".join(f"{k} {recorded.get(k)!r} (now {now.get(k)!r})" for k in keys if recorded.get(k) != now.get(k))
