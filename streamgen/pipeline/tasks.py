"""Task plugins, found through the `streamgen.tasks` entry-point group.

A plugin package exposes a `TaskPlugin`:

    [project.entry-points."streamgen.tasks"]
    continuation = "streamgen_continuation:plugin"

It brings its decoding policy, its option defaults and, optionally, a prompt file; without one, the
bundle's prompt of the same name is used, and without that, the unprompted backbone.
"""

from __future__ import annotations

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

    def resolve_options(self, given: dict) -> dict:
        """Plugin defaults overridden by `given`, converted to the defaults' types; unknown keys are errors."""
        unknown = set(given) - set(self.options)
        if unknown:
            raise ValueError(f"task {self.name!r} has no option {', '.join(sorted(unknown))} (it has: {', '.join(sorted(self.options)) or 'none'})")
        out = dict(self.options)
        for k, v in given.items():
            kind = type(self.options[k])
            try:
                out[k] = (v.lower() in ("1", "true", "yes", "on")) if kind is bool and isinstance(v, str) else kind(v)
            except (TypeError, ValueError):
                raise ValueError(f"task {self.name!r}: option {k}={v!r} is not a valid {kind.__name__}") from None
        return out

    def make_policy(self, decoder: UnitDecoder, options: dict) -> Policy:
        return self.policy(decoder, **options)


def available_tasks() -> dict[str, object]:
    """Installed task entry points by name (not yet imported)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load_task(name: str) -> TaskPlugin:
    eps = available_tasks()
    if name not in eps:
        have = ", ".join(sorted(eps)) or "none (install the plugins in plugins/)"
        raise UnknownTask(f"unknown task {name!r}; installed tasks: {have}")
    plugin = eps[name].load()
    if not isinstance(plugin, TaskPlugin):
        raise UnknownTask(f"entry point {name!r} gives {type(plugin).__name__}, not a streamgen TaskPlugin")
    return plugin


resynthesis = TaskPlugin(
    name="resynthesis",
    description="Speak the input back through units and the vocoder, as it arrives (the quality ceiling of every task).",
    policy=Resynthesis,
    uses_lm=False,
)
