"""The `streamgen` command's entry point: loads the command line (torch, the models: seconds) and runs it,
saying "interrupted" in one line, exit 130, for a Ctrl-C that lands while it loads: also one that a library's
bare `except:` swallows inside its import (the launcher's own handler notes every Ctrl-C while loading). A
process that ignores SIGINT (a background job of a script) keeps ignoring it."""

import signal
import sys


def main() -> None:
    interrupted = []

    def on_interrupt(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    previous = None
    try:
        if callable(signal.getsignal(signal.SIGINT)):  # Python's own handler (not ignored, not set outside Python)
            previous = signal.signal(signal.SIGINT, on_interrupt)
    except ValueError:  # (not the main thread: signals are not ours to handle)
        pass
    try:
        from .cli import app
    except KeyboardInterrupt:
        interrupted.append(signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    app()
