"""How many live sessions one `streamgen serve` worker holds: N WebSocket clients at once, each
streaming the bundled sample in real time, for N = 1, 2, 4, ... until the output falls behind.

Each session's stats messages carry `lag_ms`: how far behind its ideal time (the input it depended
on) an output chunk left the server. That includes the stages' algorithmic waits (the vocoder's
look-ahead), so a worker that keeps up shows a steady lag, and one that does not shows a lag that
grows through the session. A level is held when every session ends without an error and the 95th
percentile over sessions of the lag's growth (last minus first) stays within --max-drift.
Prints a table; --json writes the figures.

    python bench/sessions.py [--task resynthesis] [--bundle DIR] [--chunk-ms 320] [--levels 1,2,4,8,16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serve_helpers import ServeProcess, ws_session  # noqa: E402

from streamgen.io.files import read_audio  # noqa: E402


async def level(port: int, n: int, wave: np.ndarray, task: str) -> dict:
    t0 = time.monotonic()
    results = await asyncio.gather(*(ws_session(port, wave, 16000, task=task, realtime=True) for _ in range(n)),
                                   return_exceptions=True)
    errors, worst, drift, first = [], [], [], []
    for r in results:
        if isinstance(r, Exception):
            errors.append(f"{type(r).__name__}: {r}")
            continue
        _, msgs = r
        errors += [m["message"] for m in msgs if m["type"] == "error"]
        lags = [m["lag_ms"] for m in msgs if m["type"] == "stats" and "lag_ms" in m]
        if lags:
            worst.append(max(lags))
            drift.append(lags[-1] - lags[0])
        final = [m for m in msgs if m["type"] == "stats" and m.get("final")]
        if final and "first_audio_ms" in final[0]:
            first.append(final[0]["first_audio_ms"])
    return {"sessions": n, "errors": len(errors), "error_examples": errors[:3],
            "lag_p95_ms": round(float(np.percentile(worst, 95)), 1) if worst else None,
            "lag_max_ms": round(max(worst), 1) if worst else None,
            "drift_p95_ms": round(float(np.percentile(drift, 95)), 1) if drift else None,
            "first_audio_median_ms": round(float(np.median(first)), 1) if first else None,
            "wall_s": round(time.monotonic() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="resynthesis")
    ap.add_argument("--bundle", help="bundle directory (default: the shipped one)")
    ap.add_argument("--chunk-ms", type=int, default=320)
    ap.add_argument("--levels", default="1,2,4,8,12,16,24,32")
    ap.add_argument("--max-drift", type=float, default=500.0, help="ms; how much a session's lag may grow at a held level (p95)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    wave = read_audio(resources.files("streamgen") / "assets" / "sample.wav", 16000).numpy()
    levels = [int(x) for x in args.levels.split(",")]
    extra = ["--bundle", args.bundle] if args.bundle else []
    server = ServeProcess("--task", args.task, "--chunk-ms", str(args.chunk_ms), "--max-sessions", str(max(levels)),
                          "--status-every", "0", *extra)
    rows, held = [], 0
    try:
        print(f"task {args.task}, chunks of {args.chunk_ms} ms, each session {len(wave) / 16000:.1f} s of speech in real time")
        print("sessions | errors | worst lag p95 (ms) | lag growth p95 (ms) | first audio median (ms)")
        for n in levels:
            r = asyncio.run(level(server.port, n, wave, args.task))
            rows.append(r)
            print(f"{n:8d} | {r['errors']:6d} | {r['lag_p95_ms']!s:>18} | {r['drift_p95_ms']!s:>19} | {r['first_audio_median_ms']!s:>23}", flush=True)
            ok = r["errors"] == 0 and r["drift_p95_ms"] is not None and r["drift_p95_ms"] <= args.max_drift
            if not ok:
                break
            held = n
    finally:
        server.stop()
    print(f"held: {held} sessions (lag growth within {args.max_drift:.0f} ms at p95, no errors)")
    if args.json:
        args.json.write_text(json.dumps({"task": args.task, "chunk_ms": args.chunk_ms, "max_drift_ms": args.max_drift,
                                         "held": held, "levels": rows}, indent=1))


if __name__ == "__main__":
    main()
