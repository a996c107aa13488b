"""Soak the MQTT service: one long session plus a churn of short ones, for an hour, with the
server's memory sampled every minute. Flat memory is the aim.

A real Mosquitto and a real `streamgen run --in mqtt://... --out mqtt://...` process; in this
process, clients: one session streams the bundled sample in real time, looped, for the whole run;
every --churn-s seconds a short session (the sample once, in real time) starts under a fresh id.
Every reply is followed with `Reply`, so lost replies and errors are counted. Prints one row per
sample (server RSS from /proc), then a summary with the RSS slope; --json writes every figure.

    python bench/soak.py [--minutes 60] [--sample-s 60] [--churn-s 5] [--bundle DIR] [--task resynthesis]

Not run in CI (an hour); `--minutes 1 --sample-s 10` checks that it works.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from services import Mosquitto  # noqa: E402

from streamgen.io.files import read_audio  # noqa: E402
from streamgen.io.mqtt import MqttLink, Reply, decode, encode_audio, encode_control  # noqa: E402

BLOCK = 320  # 20 ms messages


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def session(port: int, name: str, wave: np.ndarray, seconds: float | None, tally: dict) -> None:
    """Stream `wave` (looped for `seconds`, else once) in real time, then stop; follow the reply."""
    link = MqttLink("127.0.0.1", port, client_id=f"soak-{name}")
    link.subscriptions.append(f"soak/{name}/out")
    link.start()
    await link._ready()
    reply = Reply()

    async def read():
        while not reply.done:
            _, data, _ = await link.incoming.get()
            reply.add(decode(data))

    reader = asyncio.create_task(read())
    total = len(wave) if seconds is None else int(seconds * 16000)
    t0, seq = time.monotonic(), 0
    for start in range(0, total, BLOCK):
        i = start % len(wave)
        await link.publish(f"soak/{name}/in", encode_audio(name, seq, wave[i : i + BLOCK], 16000))
        seq += 1
        await asyncio.sleep(max(0.0, t0 + seq * BLOCK / 16000 - time.monotonic()))
    await link.publish(f"soak/{name}/in", encode_control(name, seq, {"type": "stop"}))
    try:
        await asyncio.wait_for(reader, 120)
    except TimeoutError:
        tally["no_end"] += 1
    await link.close()
    tally["sessions"] += 1
    tally["errors"] += reply.error is not None
    tally["lost_replies"] += len(reply.missing)
    if reply.error:
        print(f"  session {name}: {reply.error}", flush=True)


async def until_serving(port: int, timeout: float = 120) -> None:
    """Poke the server with a malformed message until it answers it (it answers such a message at once)."""
    link = MqttLink("127.0.0.1", port, client_id="soak-poke")
    link.subscriptions.append("soak/poke/out")
    link.start()
    await link._ready()
    deadline = time.monotonic() + timeout
    while True:
        await link.publish("soak/poke/in", b"poke")
        try:
            await asyncio.wait_for(link.incoming.get(), 1.0)
            break
        except TimeoutError:
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not answer for 120 s") from None
    await link.close()


async def soak(args, port: int, server: subprocess.Popen, wave: np.ndarray) -> dict:
    await until_serving(port)
    tally = {"sessions": 0, "errors": 0, "lost_replies": 0, "no_end": 0}
    samples = []
    t0 = time.monotonic()
    end = t0 + 60 * args.minutes
    long = asyncio.create_task(session(port, "long", wave, 60 * args.minutes, tally))
    churn: list[asyncio.Task] = []

    async def sampler():
        while True:
            t = time.monotonic() - t0
            samples.append({"minute": round(t / 60, 2), "rss_mib": round(rss_mib(server.pid), 1), **tally})
            s = samples[-1]
            print(f"{s['minute']:7.2f} min  RSS {s['rss_mib']:7.1f} MiB  sessions {s['sessions']:4d}  "
                  f"errors {s['errors']}  lost replies {s['lost_replies']}  without an end {s['no_end']}", flush=True)
            await asyncio.sleep(args.sample_s)

    sampling = asyncio.create_task(sampler())
    n = 0
    while time.monotonic() + len(wave) / 16000 < end:
        churn.append(asyncio.create_task(session(port, f"short{n}", wave, None, tally)))
        n += 1
        await asyncio.sleep(args.churn_s)
    await asyncio.gather(long, *churn)
    sampling.cancel()
    samples.append({"minute": round((time.monotonic() - t0) / 60, 2), "rss_mib": round(rss_mib(server.pid), 1), **tally})
    return {"samples": samples, **tally}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--sample-s", type=float, default=60.0)
    ap.add_argument("--churn-s", type=float, default=5.0, help="a new short session every this many seconds")
    ap.add_argument("--bundle", type=Path, default=None, help="default: the shipped bundle")
    ap.add_argument("--task", default="resynthesis")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    wave = read_audio(Path(str(resources.files("streamgen") / "assets" / "sample.wav")), 16000).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp))
        broker.start()
        url = f"mqtt://127.0.0.1:{broker.port}/soak"
        cmd = [sys.executable, "-m", "streamgen.cli", "run", "--task", args.task, "--client-id", "soak-server",
               "--in", url + "/+/in", "--out", url + "/{session}/out"] + (["--bundle", str(args.bundle)] if args.bundle else [])
        # the server's log goes to a file: a pipe nobody reads fills up (64 KiB) and blocks the server
        log_path = Path(tmp) / "server.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=log)
            try:
                result = asyncio.run(soak(args, broker.port, server, wave))
            finally:
                server.terminate()
                server.wait(timeout=60)
                broker.stop()
        lines = log_path.read_text().splitlines()
        print(f"server log: {len(lines)} lines; the last ones:", *lines[-5:], sep="\n  ")
    rss = [s["rss_mib"] for s in result["samples"]]
    minutes = [s["minute"] for s in result["samples"]]
    slope = float(np.polyfit(minutes, rss, 1)[0]) * 10 if len(rss) > 2 else float("nan")
    print(f"\n{args.minutes:g} min, {result['sessions']} sessions ({result['errors']} errors, {result['lost_replies']} lost replies, "
          f"{result['no_end']} without an end); server RSS {rss[0]:.0f} -> {rss[-1]:.0f} MiB (max {max(rss):.0f}), "
          f"slope {slope:+.1f} MiB per 10 min")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "slope_mib_per_10min": slope, **result}, indent=1))


if __name__ == "__main__":
    main()
