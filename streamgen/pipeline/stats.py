"""Latency and speed figures, per stage item and per session.

Per output chunk, its *ideal delay* is the input audio (ms) that had been read when its units were
committed; its *compute-aware delay* is the wall time from the session's first captured sample to
the moment the chunk left the pipeline. Per session (SimulEval's speech-output conventions):

- StartOffset: the first chunk's delay.
- EndOffset: play the chunks in order, each starting at max(its delay, end of the previous one);
  the end of the last one minus the input duration.
- first audio: wall time from the first captured sample (and from the end of input) to the first output.
- RTF: compute time summed over stages / input duration.

Per stage item (JSON log): compute time, time since its audio was captured, and the stage's
algorithmic latency (the audio it must wait for: a chunk, the encoder's look-ahead, the vocoder's).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import IO


@dataclass
class SessionStats:
    session: str
    sample_rate: int
    started_at: float | None = None  # when the first input sample was captured
    input_samples: int = 0
    input_end_at: float | None = None
    outputs: list[tuple[float, float, int]] = field(default_factory=list)  # (ideal delay ms, emitted_at, samples)
    compute: dict[str, float] = field(default_factory=dict)  # seconds per stage
    dropped_chunks: int = 0
    error: str | None = None

    def offsets(self, delays_ms: list[float]) -> tuple[float, float]:
        end = 0.0
        for d, (_, _, n) in zip(delays_ms, self.outputs):
            end = max(d, end) + 1000 * n / self.sample_rate
        return delays_ms[0], end - 1000 * self.input_samples / self.sample_rate

    def summary(self) -> dict:
        out = {
            "session": self.session,
            "input_s": round(self.input_samples / self.sample_rate, 3),
            "output_s": round(sum(n for *_, n in self.outputs) / self.sample_rate, 3),
            "compute_ms": {k: round(1000 * v, 1) for k, v in self.compute.items()},
            "rtf": round(sum(self.compute.values()) / max(self.input_samples / self.sample_rate, 1e-9), 4),
            "dropped_chunks": self.dropped_chunks,
        }
        if self.error:
            out["error"] = self.error
        if self.outputs and self.started_at is not None:
            ideal = [d for d, _, _ in self.outputs]
            aware = [1000 * (t - self.started_at) for _, t, _ in self.outputs]
            out["start_offset_ms"], out["end_offset_ms"] = (round(x, 1) for x in self.offsets(ideal))
            out["start_offset_ca_ms"], out["end_offset_ca_ms"] = (round(x, 1) for x in self.offsets(aware))
            out["first_audio_ms"] = round(aware[0], 1)
            if self.input_end_at is not None:
                out["first_audio_after_input_ms"] = round(1000 * (self.outputs[0][1] - self.input_end_at), 1)
        return out


class Stats:
    """Collects figures for every session; optionally writes JSON lines (one per event) for tools."""

    def __init__(self, sample_rate: int, json_log: IO[str] | None = None):
        self.sample_rate = sample_rate
        self.sessions: dict[str, SessionStats] = {}
        self.json_log = json_log
        self.algorithmic_ms: dict[str, float] = {}  # per stage: audio it waits for (set by the pipeline)

    def session(self, name: str) -> SessionStats:
        if name not in self.sessions:
            self.sessions[name] = SessionStats(name, self.sample_rate)
        return self.sessions[name]

    def event(self, **fields) -> None:
        if self.json_log is not None:
            self.json_log.write(json.dumps({"t": round(time.monotonic(), 6), **fields}) + "\n")
            self.json_log.flush()

    def table(self) -> str:
        cols = ["session", "input_s", "output_s", "first_audio_ms", "start_offset_ms", "end_offset_ms",
                "start_offset_ca_ms", "end_offset_ca_ms", "rtf", "dropped_chunks"]
        rows = [s.summary() for s in self.sessions.values()]
        stage_names = sorted({k for r in rows for k in r["compute_ms"]})
        head = cols + [f"{n}_ms" for n in stage_names]
        lines = [" | ".join(head), " | ".join("---" for _ in head)]
        for r in rows:
            cells = [str(r.get(c, "-")) for c in cols] + [str(r["compute_ms"].get(n, "-")) for n in stage_names]
            lines.append(" | ".join(cells) + (f"  ERROR: {r['error']}" if "error" in r else ""))
        if self.algorithmic_ms:
            waits = ", ".join(f"{k} {v:.0f} ms" for k, v in self.algorithmic_ms.items())
            lines.append(f"algorithmic latency (waiting for audio, per chunk): {waits}; task policy waits on top")
        return "\n".join(lines)
