"""Where a live session's time goes: N talkers through one engine (as bench/sessions.py, one process), with the
engine's model calls timed by wrapping them: decoder steps by the rows they advance, a stream's source extensions,
the prefill, the vocoder's duration prediction and waveform rendering (the rest of the vocoder stage is its
parameter network); and the lag of the chunks said after the talkers stopped (the tail) beside the others.
The largest lags are listed with the decode their units came from (its size, whether it closed a segment, how long
after the input it answers was captured it began), and `--plot` draws the run: every output chunk's lag over time
beside each tick's stages.

    OMP_NUM_THREADS=1 python bench/engine_calls.py [--bundle B] [--talker es.wav] [--task translation] [--sessions 4]
    OMP_NUM_THREADS=1 python bench/engine_calls.py --talker es.wav --sessions 8 --worst 12 --plot timeline.png
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np
import torch

from sessions import level, talker_wave
from streamgen.bundle import load_bundle
from streamgen.models.source_filter_vocoder import SourceFilterVocoder
from streamgen.models.unit_mbart import UnitMBart
from streamgen.pipeline.engine import Engine
from streamgen.pipeline.stats import SessionStats


def timed(cls, name: str, calls: collections.Counter, seconds: collections.Counter, key=lambda *a: ()) -> None:
    """Wrap cls.name so each call adds its time under (name, *key(args))."""
    original = getattr(cls, name)

    def wrapper(self, *args, **kw):
        t = time.perf_counter()
        out = original(self, *args, **kw)
        k = (name, *key(*args))
        calls[k] += 1
        seconds[k] += time.perf_counter() - t
        return out

    setattr(cls, name, wrapper)


class Timeline:
    """What the engine did when, recorded by wrapping it: each tick's stages, each decode a policy started, each
    output chunk (with the sessions bench's lag: how long after the input it depends on was captured it left)."""

    STAGES = ("_intake", "_encode", "_decide", "_decode", "_vocode")

    def __init__(self):
        self.ticks: list[tuple[float, dict[str, float]]] = []  # (start, seconds per stage)
        self.decodes: dict[str, list[tuple]] = collections.defaultdict(list)  # session -> (at, units, closing, since capture)
        self.outputs: list[tuple[str, float, float]] = []  # (session, emitted at, lag ms)
        calls, stages = collections.Counter(), collections.Counter()  # this tick's, by (stage,)
        for name in self.STAGES:
            timed(Engine, name, calls, stages)
        tick, apply, add_output = Engine.tick, Engine._apply, SessionStats.add_output

        def timed_tick(engine):
            stages.clear()
            t = time.monotonic()
            tick(engine)
            self.ticks.append((t, {k[0][1:]: v for k, v in stages.items()}))

        def timed_apply(engine, session, d):
            if d is not None and d.decode is not None:
                now = time.monotonic()
                self.decodes[session.name].append((now, d.decode.max_new, bool(getattr(session.policy, "closing", False)),
                                                   1000 * (now - session.captured_at)))
            return apply(engine, session, d)

        def timed_output(st, ideal_ms, emitted_at, samples):
            add_output(st, ideal_ms, emitted_at, samples)
            self.outputs.append((st.session, emitted_at, 1000 * (emitted_at - st.started_at) - ideal_ms))

        Engine.tick, Engine._apply, SessionStats.add_output = timed_tick, timed_apply, timed_output

    def worst(self, n: int) -> None:
        """The n largest lags, each with the decode its units came from."""
        t0 = self.ticks[0][0] if self.ticks else 0.0
        print(f"the {n} largest lags, each with the last decode its session began before it:")
        for name, at, lag in sorted(self.outputs, key=lambda o: -o[2])[:n]:
            before = [d for d in self.decodes.get(name, []) if d[0] <= at]
            why = "no decode (spoken from the source)" if not before else (
                f"{'a closing' if before[-1][2] else 'a'} decode of up to {before[-1][1]} units begun {1000 * (at - before[-1][0]):.0f} ms "
                f"before, {before[-1][3]:.0f} ms after its input was captured")
            print(f"  {lag:6.0f} ms  {name:4s} at {at - t0:6.2f} s: {why}")

    def plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        t0 = self.ticks[0][0] if self.ticks else 0.0
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
        names = sorted({o[0] for o in self.outputs})
        colours = plt.get_cmap("tab10")
        for i, name in enumerate(names):
            mine = [(at - t0, lag) for n, at, lag in self.outputs if n == name]
            top.scatter(*zip(*mine), s=10, color=colours(i % 10), label=name)
            for at, units, closing, _ in self.decodes.get(name, []):
                top.plot([at - t0] * 2, [0, 4 * units], color=colours(i % 10), alpha=0.35, lw=1.5 if closing else 0.7)
        top.axhline(250, color="grey", ls="--", lw=0.8)
        top.set_ylabel("output chunk lag (ms)\n(bars: decodes begun, 4 ms per unit)")
        if names:
            top.legend(ncol=min(8, len(names)), fontsize=7, loc="upper left")
        else:
            top.text(0.5, 0.5, "no output chunks", transform=top.transAxes, ha="center")
        bottom_at = np.array([t - t0 for t, _ in self.ticks])
        base = np.zeros(len(self.ticks))
        for stage in ("encode", "decide", "decode", "vocode"):
            ms = np.array([1000 * st.get(stage, 0.0) for _, st in self.ticks])
            bottom.bar(bottom_at, ms, bottom=base, width=0.01, label=stage, align="edge")
            base += ms
        bottom.set_ylabel("a tick's stages (ms)")
        bottom.set_xlabel("seconds since the first tick")
        bottom.legend(ncol=4, fontsize=7, loc="upper left")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=None, help="bundle directory (default: the shipped one)")
    ap.add_argument("--talker", default=None, help="what each talker says (default: the bundled English sample)")
    ap.add_argument("--task", default="translation")
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--worst", type=int, default=10, help="list this many of the largest lags with the decode each came from")
    ap.add_argument("--plot", default=None, help="PNG: every output chunk's lag over time beside each tick's stages")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    bundle = load_bundle(args.bundle)
    calls, seconds = collections.Counter(), collections.Counter()
    # a decoder step: tokens [B] (a prefill is [B, T]); keyed by rows, 4 and more together
    timed(UnitMBart, "step", calls, seconds, key=lambda state, tokens, *a: ("prefill",) if tokens.dim() > 1 else (f"{min(len(tokens), 4)} rows",))
    timed(UnitMBart, "step_rows", calls, seconds, key=lambda state, rows, *a: (f"{min(len(rows), 4)} rows",))
    timed(UnitMBart, "extend_source", calls, seconds, key=lambda state, rows, *a: (f"{min(len(rows), 4)} rows",))
    for name in ("durations", "render"):
        timed(SourceFilterVocoder, name, calls, seconds)
    timeline = Timeline()
    r = level(bundle, args.task, args.sessions, talker_wave(bundle.sample_rate, args.seconds, 0.0, args.talker), 320, 0)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {args.task}, {args.sessions} talkers of {args.seconds:g} s, one engine, one thread")
    print("stage compute: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["compute_s"].items()))
    for k in sorted(calls):
        print(f"  {' '.join(k):28s} {calls[k]:6d} calls  {1000 * seconds[k] / calls[k]:7.2f} ms each  {seconds[k]:6.2f} s")
    lags, tail = np.array(r["lags"]), np.array(r["ends"], dtype=bool)
    for name, sel in (("while talking", ~tail), ("after they stopped", tail)):
        if sel.any():
            print(f"lag {name}: {sel.sum()} chunks, p50 {np.percentile(lags[sel], 50):.0f} ms, p99 {np.percentile(lags[sel], 99):.0f} ms, max {lags[sel].max():.0f} ms")
    if args.worst > 0:
        timeline.worst(args.worst)
    if args.plot:
        timeline.plot(args.plot)


if __name__ == "__main__":
    main()
