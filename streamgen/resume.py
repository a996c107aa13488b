"""Resuming a run that was stopped: what it recorded of its settings against what this run asks for."""

from __future__ import annotations


def differences(recorded: dict, now: dict) -> str:
    """The settings that differ, for a message: "seed 0 (now 1), batch_size 4 (now 12)", a setting one side lacks
    "(absent)"; empty if none."""
    def shown(d: dict, k: str) -> str:
        return repr(d[k]) if k in d else "(absent)"

    keys = [*now, *(k for k in recorded if k not in now)]
    return ", ".join(f"{k} {shown(recorded, k)} (now {shown(now, k)})" for k in keys
                     if k not in recorded or k not in now or recorded[k] != now[k])
