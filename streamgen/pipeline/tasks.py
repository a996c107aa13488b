"""Task plugins, found through the `streamgen.tasks` entry-point group.

A plugin package exposes a `TaskPlugin`:

    [project.entry-points."streamgen.tasks"]
    continuation = "streamgen_continuation:plugin"

It brings its decoding policy, its option defaults and, optionally, a prompt file; without one, the
bundle's prompt of the same name is used, and without that, the unprompted backbone.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

from .policies import Policy, Resynthesis, UnitDecoder

GROUP = "streamgen.tasks"


class UnknownTask(ValueError):
    pass


@dataclass(frozen=True)
class TaskPlugin:
    name: str
    description: str
    policy: Callable[..., Policy]  # policy(decoder, **options)
    options: dict = field(default_factory=dict)  # defaults; their types convert user strings
    prompt: Path | None = None  # a prompt file shipped with the plugin
    sampling: dict = field(default_factory=dict)  # greedy / temperature / top_k for this task
    prefix_tokens: tuple[int, ...] = ()  # forced after </s> (e.g. a target-language token)
    uses_lm: bool = True  # False for tasks that never decode (no prompt is looked up)
    choices: dict = field(default_factory=dict)  # option -> the values it may take
    ranges: dict = field(default_factory=dict)  # option -> (lowest, highest), inclusive; None leaves an end open
    # validate(options, input_s, bundle): what the options alone cannot say (one option against another,
    # against the input's length when it is known, or against the bundle); raises ValueError
    validate: Callable[[dict, float | None, object], None] | None = None

    def resolve_options(self, given: dict, input_s: float | None = None, bundle=None) -> dict:
        """Plugin defaults overridden by `given`, converted to the defaults' types and checked against
        `choices`, `ranges` and `validate` (with the input's length and the bundle where known);
        unknown keys and values out of range are errors."""
        unknown = set(given) - set(self.options)
        if unknown:
            raise ValueError(f"task {self.name!r} has no option {', '.join(sorted(unknown))} (it has: {', '.join(sorted(self.options)) or 'none'})")
        out = dict(self.options)
        for k, v in given.items():
            kind = type(self.options[k])
            try:
                out[k] = (v.lower() in ("1", "true", "yes", "on")) if kind is bool and isinstance(v, str) else kind(v)
            except (TypeError, ValueError, OverflowError):
                raise ValueError(f"task {self.name!r}: option {k}={v!r} is not a valid {kind.__name__}") from None
            if kind is float and not math.isfinite(out[k]):
                raise ValueError(f"task {self.name!r}: option {k}={v!r} is not a finite number; give one like {self.options[k]!r}")
        for k, allowed in self.choices.items():
            if out[k] not in allowed:
                raise ValueError(f"task {self.name!r}: option {k}={out[k]!r}: choose one of {', '.join(map(str, allowed))}")
        for k, (lo, hi) in self.ranges.items():
            if (lo is not None and out[k] < lo) or (hi is not None and out[k] > hi):
                want = f"at least {lo}" if hi is None else f"at most {hi}" if lo is None else f"from {lo} to {hi}"
                raise ValueError(f"task {self.name!r}: option {k}={out[k]}: must be {want}")
        if self.validate is not None:
            self.validate(out, input_s, bundle)
        return out

    def make_policy(self, decoder: UnitDecoder, options: dict) -> Policy:
        return self.policy(decoder, **options)


_installed: list = [None, {}]  # (sys.path they were read under, the entry points by name)


def available_tasks() -> dict[str, object]:
    """Installed task entry points by name (not yet imported). Reading them scans every installed
    distribution (milliseconds, and a service checks a client's task on every start), so they are read
    once per `sys.path`: a plugin installed while a service runs is found after its restart."""
    key = tuple(sys.path)
    if _installed[0] != key:
        _installed[:] = [key, {ep.name: ep for ep in entry_points(group=GROUP)}]
    return dict(_installed[1])


def load_task(name: str) -> TaskPlugin:
    eps = available_tasks()
    if name not in eps:
        have = ", ".join(sorted(eps)) or "none (install the plugins in plugins/)"
        raise UnknownTask(f"unknown task {name!r}; installed tasks: {have}")
    plugin = eps[name].load()
    if not isinstance(plugin, TaskPlugin):
        raise UnknownTask(f"entry point {name!r} gives {type(plugin).__name__}, not a streamgen TaskPlugin")
    return plugin


def check_source_timing(task: str, bundle) -> None:
    """Speaking units in the talker's timing gives the vocoder one frame per encoder frame."""
    if bundle is not None and bundle.unit_hop != bundle.unit_vocoder.hop:
        raise ValueError(f"task {task!r}: durations=source needs the unit encoder's frame ({bundle.unit_hop} samples) "
                         f"to equal the vocoder's ({bundle.unit_vocoder.hop}); use durations=predicted")


def _same_frame_rate(options: dict, input_s: float | None, bundle) -> None:
    if options["durations"] == "source":
        check_source_timing("resynthesis", bundle)


resynthesis = TaskPlugin(
    name="resynthesis",
    description="Speak the input back through units and the vocoder, as it arrives: in the talker's own timing "
                "(durations=source) or timed by the vocoder (durations=predicted, the ceiling of the language-model tasks).",
    policy=Resynthesis,
    options={"durations": "source"},
    choices={"durations": ("source", "predicted")},
    validate=_same_frame_rate,
    uses_lm=False,
)
