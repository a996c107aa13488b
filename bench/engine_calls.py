"""Where a live session's time goes: N talkers through one engine (as bench/sessions.py, one process), with the
engine's model calls timed by wrapping them: decoder steps by the rows they advance, a stream's source extensions,
the prefill, the vocoder's duration prediction and waveform rendering (the rest of the vocoder stage is its
parameter network); and the lag of the chunks said after the talkers stopped (the tail) beside the others.

    OMP_NUM_THREADS=1 python bench/engine_calls.py [--bundle B] [--talker es.wav] [--task translation] [--sessions 4]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=None, help="bundle directory (default: the shipped one)")
    ap.add_argument("--talker", default=None, help="what each talker says (default: the bundled English sample)")
    ap.add_argument("--task", default="translation")
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=8.0)
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
    r = level(bundle, args.task, args.sessions, talker_wave(bundle.sample_rate, args.seconds, 0.0, args.talker), 320, 0)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {args.task}, {args.sessions} talkers of {args.seconds:g} s, one engine, one thread")
    print("stage compute: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["compute_s"].items()))
    for k in sorted(calls):
        print(f"  {' '.join(k):28s} {calls[k]:6d} calls  {1000 * seconds[k] / calls[k]:7.2f} ms each  {seconds[k]:6.2f} s")
    lags, tail = np.array(r["lags"]), np.array(r["ends"], dtype=bool)
    for name, sel in (("while talking", ~tail), ("after they stopped", tail)):
        if sel.any():
            print(f"lag {name}: {sel.sum()} chunks, p50 {np.percentile(lags[sel], 50):.0f} ms, p99 {np.percentile(lags[sel], 99):.0f} ms, max {lags[sel].max():.0f} ms")


if __name__ == "__main__":
    main()
