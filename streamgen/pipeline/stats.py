"""Latency and speed figures, per stage item and per session.

Each output chunk has two delays: its *ideal delay*, the input audio (ms) that had been read when its
units were committed (what a model with instant compute would have waited for), and its
*compute-aware delay*, the wall time from the session's first captured sample to the moment the
chunk left the pipeline. Per session (`FIGURES` defines each one; `streamgen run --help` and the
README repeat them):

- StartOffset: the first output chunk's delay (SimulEval's StartOffset).
- EndOffset: play the chunks in order, each starting at max(its delay, end of the previous one);
  the end of the last one minus the moment the input ended. Ideal: minus the input's duration
  (SimulEval's EndOffset). Compute-aware: minus the wall time at which the input ended, so a file
  read faster than real time is not credited with audio it never waited for. Either is negative
  only when the output had finished before the input did (e.g. a translation that ended during
  a long trailing pause).
- first audio after input end: wall time from the end of input to the first output (negative when
  the output started while the talker was still talking).
- RTF: compute time summed over stages / input duration.

Per stage item (JSON lines): compute time, time since its audio was captured, and the stage's
algorithmic latency (the audio it must wait for: a chunk, the encoder's look-ahead, the vocoder's).
The session's JSON line and its table come from `close_session`, which the pipeline calls once every
stage has flushed the session (its last compute counted, its last audio in the sink).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

# (summary key, name in the table, unit, definition)
FIGURES = [
    ("input_s", "input", "s", "audio read from the source"),
    ("output_s", "output", "s", "audio generated"),
    ("start_offset_ms", "StartOffset", "ms", "input read when the first output chunk was committed (ideal: instant compute)"),
    ("end_offset_ms", "EndOffset", "ms", "end of the output played back-to-back from its ideal delays, minus the input's duration; negative only if the output had finished before the input did"),
    ("start_offset_ca_ms", "StartOffset, compute-aware", "ms", "wall time from the first input sample to the first output chunk (first audio)"),
    ("end_offset_ca_ms", "EndOffset, compute-aware", "ms", "the same with wall-clock delays, minus the wall time at which the input ended (a file read faster than real time ends early)"),
    ("first_audio_after_input_ms", "first audio after input end", "ms", "wall time from the end of input to the first output chunk; negative: it started while input was still arriving"),
    ("rtf", "real-time factor", "x", "compute time of all stages / input duration (below 1: faster than real time)"),
    ("dropped_chunks", "dropped input chunks", "", "input chunks dropped because the pipeline fell behind (--overflow drop-oldest)"),
]


def figures_help() -> str:
    """The figures of the session table, defined, for `--help` and documentation."""
    lines = [f"{name} ({unit}): {what}." if unit else f"{name}: {what}." for _, name, unit, what in FIGURES]
    lines.append("compute, STAGE (ms): compute time of that stage for the session.")
    lines.append("algorithmic latency, STAGE (ms): audio the stage waits for before it can emit (the task policy waits on top).")
    return "Figures of --stats: " + "\n\n".join(lines)


@dataclass
class SessionStats:
    """One session's figures. They are running totals, so a session of any length holds the same few
    numbers; the per-chunk records (`outputs`: ideal delay ms, emitted_at, samples) keep the first
    `records` chunks, for tools that want them (AL, lag percentiles)."""

    session: str
    sample_rate: int
    key: str = ""  # its key in `Stats.sessions`: the id, or "ID#2", "ID#3", ... for later sessions of an id used again
    started_at: float | None = None  # when the first input sample was captured
    input_samples: int = 0
    input_end_at: float | None = None
    records: int = 10_000
    outputs: list[tuple[float, float, int]] = field(default_factory=list)  # the first `records` chunks
    output_chunks: int = 0
    output_samples: int = 0
    first_output: tuple[float, float] | None = None  # (ideal delay ms, emitted_at) of the first chunk
    play_end_ms: float = 0.0  # where back-to-back playback of the chunks ends, ideal delays
    play_end_ca_ms: float = 0.0  # the same, compute-aware delays
    compute: dict[str, float] = field(default_factory=dict)  # seconds per stage
    dropped_chunks: int = 0
    error: str | None = None
    input_ended: bool = False  # the source has ended its input: a later chunk of its id is another session's
    closed: bool = False  # every stage has flushed it; its JSON line is written

    def __post_init__(self):
        self.key = self.key or self.session

    def add_output(self, ideal_ms: float, emitted_at: float, samples: int) -> None:
        """An output chunk left the pipeline: play it at max(its delay, end of the previous one)."""
        dur = 1000 * samples / self.sample_rate
        aware = 1000 * (emitted_at - (self.started_at if self.started_at is not None else emitted_at))
        if self.first_output is None:
            self.first_output = (ideal_ms, emitted_at)
        self.play_end_ms = max(ideal_ms, self.play_end_ms) + dur
        self.play_end_ca_ms = max(aware, self.play_end_ca_ms) + dur
        self.output_chunks += 1
        self.output_samples += samples
        if len(self.outputs) < self.records:
            self.outputs.append((ideal_ms, emitted_at, samples))

    def offsets(self, delays_ms: list[float], input_ended_ms: float | None = None) -> tuple[float, float]:
        """StartOffset and EndOffset for these per-chunk delays of the recorded chunks: play each at
        max(its delay, end of the previous one); EndOffset is where the last ends minus when the
        input ended (by default: its duration)."""
        end = 0.0
        for d, (_, _, n) in zip(delays_ms, self.outputs):
            end = max(d, end) + 1000 * n / self.sample_rate
        if input_ended_ms is None:
            input_ended_ms = 1000 * self.input_samples / self.sample_rate
        return delays_ms[0], end - input_ended_ms

    def summary(self) -> dict:
        input_ms = 1000 * self.input_samples / self.sample_rate
        out = {
            "session": self.session,
            **({"key": self.key} if self.key != self.session else {}),
            "input_s": round(input_ms / 1000, 3),
            "output_s": round(self.output_samples / self.sample_rate, 3),
            "compute_ms": {k: round(1000 * v, 1) for k, v in self.compute.items()},
            "rtf": round(sum(self.compute.values()) / max(input_ms / 1000, 1e-9), 4),
            "dropped_chunks": self.dropped_chunks,
        }
        if self.error:
            out["error"] = self.error
        if self.first_output is not None and self.started_at is not None:
            ideal, emitted = self.first_output
            first_ca = 1000 * (emitted - self.started_at)
            input_ended_ms = input_ms if self.input_end_at is None else 1000 * (self.input_end_at - self.started_at)
            out["start_offset_ms"], out["end_offset_ms"] = round(ideal, 1), round(self.play_end_ms - input_ms, 1)
            out["start_offset_ca_ms"], out["end_offset_ca_ms"] = round(first_ca, 1), round(self.play_end_ca_ms - input_ended_ms, 1)
            out["first_audio_ms"] = out["start_offset_ca_ms"]
            if self.input_end_at is not None:
                out["first_audio_after_input_ms"] = round(1000 * (emitted - self.input_end_at), 1)
        return out


def session_table(summary: dict, algorithmic_ms: dict[str, float] | None = None) -> str:
    """One session's figures in rows: figure, value, unit."""
    rows = [(name, summary[key], unit) for key, name, unit, _ in FIGURES if key in summary]
    rows += [(f"compute, {stage}", ms, "ms") for stage, ms in summary["compute_ms"].items()]
    rows += [(f"algorithmic latency, {stage}", round(ms, 1), "ms") for stage, ms in (algorithmic_ms or {}).items()]
    if "start_offset_ms" not in summary:
        rows.append(("latency", "-", "no output"))
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(str(r[1])) for r in rows)
    lines = [f"session {summary.get('key', summary['session'])}" + (f"  ERROR: {summary['error']}" if "error" in summary else "")]
    lines += [f"  {name:<{width}}  {str(value):>{vwidth}}  {unit}".rstrip() for name, value, unit in rows]
    return "\n".join(lines)


class Stats:
    """Collects figures for every session; optionally writes JSON lines (one per event) for tools and
    hands each session's figures to `on_session` as it ends.

    A live source may use a session id again once that session's input has ended (MQTT clients do), while
    the engine still finishes it. Each session keeps its own record: the input side (`input_record`) opens a
    new one for a chunk of an id whose newest session's input has ended; the engine and the output side
    (`session`) address the oldest open record of the id, which is the session they are serving (the engine
    holds the next until the last has ended), and `close_session` closes it. (The engine opens the next session
    as the last one's End leaves it; until the output side has taken that End, the compute it counts for the
    next goes into the last one's record: a tick's share at most.)"""

    def __init__(self, sample_rate: int, json_log: IO[str] | None = None, on_session: Callable[[SessionStats], None] | None = None,
                 keep_closed: int = 1000, chunk_records: int = 10_000):
        self.sample_rate = sample_rate
        self.keep_closed = keep_closed  # ended sessions kept for the final report (the most recent ones): a service runs for ever
        self.chunk_records = chunk_records  # per-chunk records kept per session (0 for services: the figures need none)
        self.sessions: dict[str, SessionStats] = {}  # by key, in the order they started
        self._open: dict[str, list[SessionStats]] = {}  # by id: its records not yet closed, oldest first
        self.json_log = json_log
        self.on_session = on_session
        self.algorithmic_ms: dict[str, float] = {}  # per stage: audio it waits for (set by the pipeline)

    def _begin(self, name: str) -> SessionStats:
        key, n = name, 1
        while key in self.sessions:
            n += 1
            key = f"{name}#{n}"
        st = self.sessions[key] = SessionStats(name, self.sample_rate, key=key, records=self.chunk_records)
        self._open.setdefault(name, []).append(st)
        return st

    def session(self, name: str) -> SessionStats:
        """The record of the session of this id that the engine and the output side serve: its oldest open one."""
        return self.current(name) or self._begin(name)

    def current(self, name: str) -> SessionStats | None:
        """`session`'s record if the id has one open, without opening one."""
        return self._open[name][0] if name in self._open else None

    def open_input(self, name: str) -> SessionStats | None:
        """The id's newest open record whose input has not ended, or None."""
        records = self._open.get(name)
        return records[-1] if records and not records[-1].input_ended else None

    def input_record(self, name: str) -> SessionStats:
        """The record the input side adds to: the id's newest open one, or a new one when its input has ended."""
        return self.open_input(name) or self._begin(name)

    def event(self, **fields) -> None:
        if self.json_log is not None:
            self.json_log.write(json.dumps({"t": round(time.monotonic(), 6), **fields}) + "\n")
            self.json_log.flush()

    def close_session(self, name: str) -> dict:
        """The id's oldest open session is over in every stage (compute counted, last audio delivered):
        write its JSON line, hand it to `on_session`, return its summary. Once per session."""
        if name not in self._open:  # (an End for a session already closed: nothing more to say)
            return next((st.summary() for st in reversed(self.sessions.values()) if st.session == name), {})
        st = self._open[name].pop(0)
        if not self._open[name]:
            del self._open[name]
        st.closed = True
        summary = st.summary()
        self.event(event="session", **summary)
        if self.on_session is not None:
            self.on_session(st)
        closed = [k for k, s in self.sessions.items() if s.closed]
        for old in closed[: max(0, len(closed) - self.keep_closed)]:
            del self.sessions[old]
        return summary

    def report(self, key: str) -> str:
        """One session's table (by its key in `sessions`)."""
        return session_table(self.sessions[key].summary(), self.algorithmic_ms)

    def table(self) -> str:
        """Every session's table, in the order they started."""
        return "\n".join(self.report(k) for k in self.sessions)
