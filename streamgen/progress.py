"""Progress of long work (training, unit extraction, corpus synthesis, evaluation).

On a terminal: a rich bar with the count, the named figures (a loss, ...) and the time left. When
stderr is not a terminal (a job in the background, `nohup`, CI), rich would print nothing until the
end, so a plain line is written every `every_s` seconds instead, and one at the end:

    vocoder 1200/20000 (6.0 %) 2.41/s, 2:10:03 left, mel 0.812
"""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, label: str, total: int, done: int = 0, enabled: bool = True, every_s: float = 30.0, **fields: float):
        self.label, self.total, self.done, self.fields = label, total, done, dict(fields)
        self.enabled, self.every_s = enabled, every_s
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            figures = " ".join(f"{k} {{task.fields[{k}]:.4g}}" for k in fields)
            self.bar = Bar(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(figures), TimeRemainingColumn(),
                           console=Console(stderr=True))
            self.task = self.bar.add_task(label, total=total, completed=done, **fields)

    def __enter__(self) -> Progress:
        self.t0 = self.last = time.monotonic()
        self.start_done = self.done
        if self.bar is not None:
            self.bar.start()
        return self

    def update(self, done: int | None = None, advance: int = 0, **fields: float) -> None:
        self.done = (self.done if done is None else done) + advance
        self.fields.update(fields)
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, **fields)
        elif self.enabled and time.monotonic() - self.last >= self.every_s:
            self._line()

    def _line(self) -> None:
        self.last = now = time.monotonic()
        rate = (self.done - self.start_done) / max(now - self.t0, 1e-9)
        left = f", {_clock((self.total - self.done) / rate)} left" if rate > 0 and self.done < self.total else ""
        figures = "".join(f", {k} {v:.4g}" for k, v in self.fields.items())
        pct = 100 * self.done / max(self.total, 1)
        print(f"{self.label} {self.done}/{self.total} ({pct:.1f} %) {rate:.3g}/s{left}{figures}", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.enabled:
            self._line()
