"""streamgen: streaming speech generation with prompt-tuned speech language models."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Bundle", "BundleError", "CheckpointError", "load_bundle", "__version__"]
_LAZY = {"Bundle": ".bundle", "BundleError": ".bundle", "load_bundle": ".bundle", "CheckpointError": ".models.checkpoints"}


def __getattr__(name: str):
    """The public names, imported on first use: importing the package costs nothing (torch loads with them),
    so the command line's launcher can handle a Ctrl-C that lands while torch loads."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
