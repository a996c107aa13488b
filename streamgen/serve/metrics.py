"""What `/metrics` shows, in the Prometheus text format (prometheus_client, one registry per server).

    streamgen_live_sessions                     sessions open in the engine now
    streamgen_sessions_started_total{via}       ws | mqtt
    streamgen_sessions_refused_total{reason}    capacity | draining | connection_limit | busy (the engine)
    streamgen_sessions_ended_total{outcome}     ok | error
    streamgen_protocol_errors_total{via}        frames or messages that broke the protocol
    streamgen_connections                       open WebSocket connections
    streamgen_chunk_lag_seconds                 histogram: how far behind its ideal time each output chunk left
                                                (wall time since the session's first sample - input it depended on)
    streamgen_first_audio_seconds               histogram: first output after the session's first input sample
    streamgen_stage_compute_seconds_total{stage}  compute per pipeline stage, all sessions
    streamgen_queue_depth{queue}                items waiting: hub (front ends -> engine), inbox (per-session input
                                                the engine has not taken), encoder (chunks), policy (unit batches)
    streamgen_audio_output_seconds_total        audio sent to clients
"""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

disable_created_metrics()  # no *_created series: they double the output and say nothing here

LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
FIRST_AUDIO_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class ServeMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.started = Counter("streamgen_sessions_started", "Sessions opened.", ["via"], registry=r)
        self.refused = Counter("streamgen_sessions_refused", "Sessions refused.", ["reason"], registry=r)
        self.ended = Counter("streamgen_sessions_ended", "Sessions ended.", ["outcome"], registry=r)
        self.protocol_errors = Counter("streamgen_protocol_errors", "Frames or messages that broke the protocol.", ["via"], registry=r)
        self.connections = Gauge("streamgen_connections", "Open WebSocket connections.", registry=r)
        self.lag = Histogram("streamgen_chunk_lag_seconds", "Output chunk lag behind its ideal time.", buckets=LAG_BUCKETS, registry=r)
        self.first_audio = Histogram("streamgen_first_audio_seconds", "First output after the first input sample.",
                                     buckets=FIRST_AUDIO_BUCKETS, registry=r)
        self.audio_out = Counter("streamgen_audio_output_seconds", "Audio sent to clients.", registry=r)
        self.live = Gauge("streamgen_live_sessions", "Sessions open in the engine.", registry=r)
        # every series from the start (at 0): a rate or increase() over a series that appears with its first event
        # misses that event (the first refusal after a restart, say)
        for counter, values in ((self.started, ("ws", "mqtt")), (self.protocol_errors, ("ws", "mqtt")),
                                (self.refused, ("capacity", "draining", "connection_limit", "busy")), (self.ended, ("ok", "error"))):
            for value in values:
                counter.labels(value)
        self.recent_lags: deque[float] = deque(maxlen=2000)  # for the console's percentiles
        self.hub = self.engine = None
        r.register(_EngineCollector(self))

    def chunk_lag(self, seconds: float) -> None:
        self.lag.observe(max(seconds, 0.0))
        self.recent_lags.append(seconds)

    def bind_hub(self, hub) -> None:
        self.hub = hub
        self.live.set_function(lambda: len(hub.sessions))

    def bind_engine(self, engine) -> None:
        self.engine = engine

    def compute_by_stage(self) -> dict[str, float]:
        if self.engine is None:
            return {}
        with self.engine.lock:
            return dict(self.engine.compute)

    def queue_depths(self) -> dict[str, int]:
        out = {"hub": self.hub.inbox.qsize() if self.hub is not None else 0}
        if self.engine is not None:
            with self.engine.lock:
                sessions = list(self.engine.sessions.values())
                out["inbox"] = sum(len(s.inbox) for s in sessions)
                out["encoder"] = sum(len(s.chunks) for s in sessions)
                out["policy"] = sum(len(s.events) for s in sessions)
        return out

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Figures read from the engine when scraped."""

    def __init__(self, m: ServeMetrics):
        self.m = m

    def describe(self):
        return []

    def collect(self):
        c = CounterMetricFamily("streamgen_stage_compute_seconds", "Compute per pipeline stage, all sessions.", labels=["stage"])
        for stage, s in sorted(self.m.compute_by_stage().items()):
            c.add_metric([stage], s)
        yield c
        g = GaugeMetricFamily("streamgen_queue_depth", "Items waiting in front of each stage (and the sink).", labels=["queue"])
        for name, n in self.m.queue_depths().items():
            g.add_metric([name], n)
        yield g
