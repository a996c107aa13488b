"""Live talkers through the broker: N sessions paced like people talking, each one an MQTT client of a
cluster of `streamgen serve --mqtt` workers (one process per core) behind a real Mosquitto on
loopback: the whole path a deployed service runs, both broker hops included.

Each talker sends the bundled sample in 320 ms blocks, each block when its last sample would have been
captured, starts staggered over one second. Per output chunk, its lag is how much later it arrived
than the same stretch of output (matched by position in the output) arrived when the talker was alone
(the same invocation's N = 1 run, through the same workers and broker): the queueing that N talkers
add, broker included. Reported per N: p50 / p99 of that lag over every output chunk, median first
audio (after the talker's first block went out), median and worst end (last audio after the last
block went out), sessions completed, and how many replies equal the reply alone (PCM16 +-1). Then the
largest N whose p99 stays within --max-lag-ms (250).

    python bench/broker_sessions.py                                    # translation, 2 workers
    python bench/broker_sessions.py --tasks translation,resynthesis --workers 2 --levels 1,8,12,16
    python bench/broker_sessions.py --workers 1 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from sessions import task_options, talker_wave

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from services import Mosquitto  # noqa: E402  the tests' broker on loopback

from streamgen.bundle import load_bundle  # noqa: E402
from streamgen.serve.cluster import cluster_session  # noqa: E402
from streamgen.options import LM_DTYPE_HELP, LM_DTYPES  # noqa: E402

PREFIX = "bench"


class Worker:
    """`streamgen serve --mqtt` as cluster worker `name`, one torch thread; its console kept in `lines`."""

    def __init__(self, name: str, port: int, bundle: str | None, max_sessions: int, lm_dtype: str | None = None):
        cmd = [sys.executable, "-m", "streamgen.cli", "serve", "--http", "127.0.0.1:0", "--status-every", "0",
               "--mqtt", f"mqtt://127.0.0.1:{port}/{PREFIX}", "--worker-id", name, "--max-sessions", str(max_sessions)]
        if bundle:
            cmd += ["--bundle", bundle]
        if lm_dtype:
            cmd += ["--lm-dtype", lm_dtype]
        self.name, self.lines = name, []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        threading.Thread(target=lambda: self.lines.extend(line.rstrip() for line in self.proc.stdout), daemon=True).start()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def wait_online(port: int, names: list[str], workers: list[Worker], timeout: float = 120) -> None:
    """Until every worker's retained status says online (it has connected and subscribed)."""
    import aiomqtt

    online: set[str] = set()
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(f"{PREFIX}/workers/+", qos=1)
        deadline = time.monotonic() + timeout
        while online != set(names):
            if any(w.proc.poll() is not None for w in workers):
                raise RuntimeError("a worker exited:\n" + "\n".join(sum((w.lines for w in workers), [])))
            try:
                m = await asyncio.wait_for(anext(client.messages), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                raise RuntimeError(f"workers not online after {timeout:.0f} s: {sorted(set(names) - online)}") from None
            st = json.loads(bytes(m.payload))
            if st.get("status") == "online":
                online.add(st["worker"])


async def talk(port: int, name: str, wave: np.ndarray, rate: int, block: int, start_at: float, task: str) -> dict:
    """One talker: its reply, when each audio message arrived (seconds after the first block could be
    sent, with the output position it reached) and when the reply ended."""
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    t: dict[str, float] = {}
    arrivals: list[tuple[float, int]] = []
    got = [0]

    async def claimed(worker):
        t["claimed"] = time.monotonic()

    def audio(seq, samples):
        got[0] += len(samples)
        arrivals.append((time.monotonic(), got[0]))

    task, options = task_options(task)
    reply = await cluster_session("127.0.0.1", port, PREFIX, name, wave, rate, task=task, options=options,
                                  block=block, realtime=True, claim_timeout=10, on_claimed=claimed, on_audio=audio)
    end = time.monotonic()
    t0 = t.get("claimed", end)
    return {"error": reply.error, "ended": bool(reply.messages) and reply.messages[-1]["type"] == "end", "audio": reply.audio,
            "worker": reply.worker, "arrivals": [(a - t0, n) for a, n in arrivals], "end_s": end - t0,
            "talk_s": len(wave) / rate}


async def level(port: int, n: int, wave: np.ndarray, rate: int, block: int, task: str, stagger_s: float = 1.0) -> list[dict]:
    t0 = time.monotonic() + 0.2
    tag = uuid.uuid4().hex[:6]
    return await asyncio.gather(*(talk(port, f"{task[:5]}-{n}-{i}-{tag}", wave, rate, block, t0 + stagger_s * i / n, task)
                                  for i in range(n)))


def lags_behind(run: dict, alone: dict) -> list[float]:
    """Each audio message's arrival minus when the reply alone had reached the same output position (ms)."""
    ref_t = np.array([a for a, _ in alone["arrivals"]])
    ref_n = np.array([n for _, n in alone["arrivals"]])
    out = []
    for a, n in run["arrivals"]:
        k = min(int(np.searchsorted(ref_n, n)), len(ref_n) - 1)
        out.append(1000 * (a - ref_t[k]))
    return out


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return len(a) == len(b) and (not len(a) or int(np.abs(a.astype(np.int32) - b).max()) <= 1)


def summary(n: int, runs: list[dict], alone: dict) -> dict:
    ok = [r for r in runs if r["error"] is None and r["ended"] and r["arrivals"]]
    lags = [x for r in ok for x in lags_behind(r, alone)]
    ends = [1000 * (r["end_s"] - r["talk_s"]) for r in ok]
    pct = lambda xs, q: round(float(np.percentile(xs, q)), 1) if xs else None
    errors = sorted({r["error"].split(":")[0] for r in runs if r["error"]})
    return {"sessions": n, "completed": len(ok), "lag_p50_ms": pct(lags, 50), "lag_p99_ms": pct(lags, 99),
            "first_audio_ms": pct([1000 * r["arrivals"][0][0] for r in ok], 50), "end_p50_ms": pct(ends, 50),
            "end_max_ms": round(max(ends), 1) if ends else None, "equal_to_alone": sum(same(r["audio"], alone["audio"]) for r in ok),
            "workers": {w: sum(r["worker"] == w for r in runs) for w in sorted({r["worker"] for r in runs if r["worker"]})},
            "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=None, help="bundle directory (default: the shipped one)")
    ap.add_argument("--workers", type=int, default=2, help="`serve --mqtt` worker processes (one per core)")
    ap.add_argument("--tasks", default="translation")
    ap.add_argument("--levels", default="1,4,8,12,16")
    ap.add_argument("--seconds", type=float, default=8.0, help="speech per talker (the bundled sample, repeated)")
    ap.add_argument("--chunk-ms", type=int, default=320, help="the talkers' blocks")
    ap.add_argument("--pause-s", type=float, default=0.0, help="as bench/sessions.py: talkers who pause between sentences")
    ap.add_argument("--max-sessions", type=int, default=64, help="per worker (beyond it, its engine refuses what it cannot keep real-time)")
    ap.add_argument("--max-lag-ms", type=float, default=250.0)
    ap.add_argument("--lm-dtype", default=None, choices=LM_DTYPES, help="each worker's `serve --lm-dtype`: " + LM_DTYPE_HELP)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    rate = load_bundle(args.bundle).sample_rate
    wave = talker_wave(rate, args.seconds, args.pause_s).numpy()
    block = rate * args.chunk_ms // 1000
    levels = [int(x) for x in args.levels.split(",")]
    if levels[0] != 1:
        levels = [1] + levels  # the reply alone: what every level is measured against
    load = os.getloadavg()[0]
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {args.workers} `serve --mqtt` workers (1 thread each) behind mosquitto on "
          f"loopback, load average {load:.1f}, {args.seconds:g} s per talker, {args.chunk_ms} ms blocks"
          + (f", {args.pause_s:g} s pauses" if args.pause_s else "") + (f", LM in {args.lm_dtype}" if args.lm_dtype else ""), flush=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "workers": args.workers, "load_average": load, "tasks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp))
        broker.start()
        names = [f"w{i}" for i in range(args.workers)]
        workers = [Worker(name, broker.port, args.bundle, args.max_sessions, args.lm_dtype) for name in names]
        try:
            asyncio.run(wait_online(broker.port, names, workers))
            for task in args.tasks.split(","):
                asyncio.run(level(broker.port, 1, wave, rate, block, task))  # warm-up: first calls, allocations
                alone = asyncio.run(level(broker.port, 1, wave, rate, block, task))[0]
                if alone["error"] or not alone["arrivals"]:
                    raise SystemExit(f"{task}: a talker alone got no reply: {alone['error']}")
                rows, misses = [], 0
                for n in levels:
                    runs = [alone] if n == 1 else asyncio.run(level(broker.port, n, wave, rate, block, task))
                    r = summary(n, runs, alone)
                    rows.append(r)
                    ms = lambda k: "     n/a" if r[k] is None else f"{r[k]:8.1f}"
                    print(f"{task:13s} N={n:4d}  done {r['completed']:4d}  lag behind alone p50 {ms('lag_p50_ms')} ms  "
                          f"p99 {ms('lag_p99_ms')} ms  first audio {ms('first_audio_ms')} ms  end p50 {ms('end_p50_ms')} ms  "
                          f"max {ms('end_max_ms')} ms  equal to alone {r['equal_to_alone']}/{r['completed']}  "
                          f"per worker {r['workers']}" + (f"  errors {r['errors']}" if r["errors"] else ""), flush=True)
                    misses = misses + 1 if r["completed"] < n or (r["lag_p99_ms"] or 0) > args.max_lag_ms else 0
                    if misses >= 2:
                        break
                ok = [r["sessions"] for r in rows if r["completed"] == r["sessions"] and (r["lag_p99_ms"] or 0) <= args.max_lag_ms]
                report["tasks"][task] = {"rows": rows, "held": max(ok, default=0)}
                print(f"{task}: sessions held through the broker at p99 lag <= {args.max_lag_ms:.0f} ms behind alone: "
                      f"{report['tasks'][task]['held']}", flush=True)
        finally:
            for w in workers:
                w.stop()
            broker.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
