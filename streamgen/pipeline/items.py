"""What flows between pipeline stages, one way: AudioChunk -> UnitChunk -> TargetUnits -> AudioOut.

Every item names its session; `End` closes a session (flush, free its state); `SessionError`
reports a session that failed, without stopping the others. Times are `time.monotonic()` seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class AudioChunk:
    """Input audio: mono float32 samples at the pipeline's sample rate."""

    session: str
    seq: int
    samples: Tensor  # [n]
    start: int  # index of the first sample in the session's input stream
    captured_at: float  # when the last sample became available


@dataclass
class UnitChunk:
    """Source units that became final (de-duplicated: a run continuing over a chunk edge is not repeated)."""

    session: str
    units: Tensor  # [n] 0..K-1
    frames: Tensor  # [n] the input frame (20 ms) where each unit's run starts
    source_samples: int  # input samples read when these units were final
    captured_at: float  # capture time of the latest input they needed


@dataclass
class TargetUnits:
    """Units a task policy committed to speak."""

    session: str
    units: Tensor  # [n]
    source_samples: int  # input samples read when they were committed (the ideal delay)
    captured_at: float


@dataclass
class AudioOut:
    """Generated audio."""

    session: str
    samples: Tensor  # [n] float32
    source_samples: int
    captured_at: float
    emitted_at: float = 0.0


@dataclass
class End:
    """End of a session's input (or, downstream of the source, of everything it produced)."""

    session: str
    source_samples: int = 0
    captured_at: float = 0.0


@dataclass
class SessionError:
    session: str
    message: str


@dataclass
class Control:
    """A session's request from its source: start with a task and options, or switch task."""

    session: str
    action: str  # "start" | "task"
    task: str | None = None
    options: dict = field(default_factory=dict)


Item = AudioChunk | UnitChunk | TargetUnits | AudioOut | End | SessionError | Control
