"""The `streamgen` command's entry point: loads the command line (torch, the models: seconds) and runs it,
saying "interrupted" in one line, exit 130, for a Ctrl-C that lands while it loads."""

import sys


def main() -> None:
    try:
        from .cli import app
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    app()
