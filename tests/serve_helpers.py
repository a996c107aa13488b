"""A `streamgen serve` process for tests, and a WebSocket client for its protocol."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np


class ServeProcess:
    """`streamgen serve ARGS` on a free port; its console lines are kept in `lines`."""

    def __init__(self, *args: str, env: dict | None = None, timeout: float = 60.0):
        self.proc = subprocess.Popen([sys.executable, "-m", "streamgen.cli", "serve", "--http", "127.0.0.1:0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        self.lines: list[str] = []
        self.port: int | None = None
        started = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                m = re.search(r"page\s+http://127\.0\.0\.1:(\d+)/", line)
                if m:
                    self.port = int(m.group(1))
                    started.set()
            started.set()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        if not started.wait(timeout) or self.port is None:
            self.stop()
            raise RuntimeError("streamgen serve did not start:\n" + "\n".join(self.lines))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, headers: dict | None = None) -> tuple[int, str]:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
        from prometheus_client.parser import text_string_to_metric_families

        status, text = self.get("/metrics", headers)
        assert status == 200, text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def signal(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        rc = self.proc.wait(timeout)
        self.reader.join(5)
        return rc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def pcm16(wave: np.ndarray) -> bytes:
    return (np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()


async def ws_session(port: int, wave: np.ndarray, rate: int = 16000, task: str | None = None, options: dict | None = None,
                     frame: int = 960, ws=None, realtime: bool = False) -> tuple[np.ndarray, list[dict]]:
    """One session over the WebSocket protocol: start, stream `wave` (float32 at `rate`), stop,
    collect until "end". Returns the output PCM16 and every text message received."""
    import asyncio

    import websockets

    own = ws is None
    if own:
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws", max_size=None)
    try:
        await ws.send(json.dumps({"type": "start", **({"task": task} if task else {}), "options": options or {}, "sample_rate": rate}))
        messages = [json.loads(await ws.recv())]
        if messages[0]["type"] != "started":
            return np.zeros(0, np.int16), messages
        audio: list[bytes] = []

        async def send():
            t0 = time.monotonic()
            for i in range(0, len(wave), frame):
                if realtime:
                    await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
                await ws.send(pcm16(wave[i : i + frame]))
            await ws.send(json.dumps({"type": "stop"}))

        sender = asyncio.ensure_future(send())
        while True:
            m = await asyncio.wait_for(ws.recv(), 120)
            if isinstance(m, bytes):
                audio.append(m)
                continue
            messages.append(json.loads(m))
            if messages[-1]["type"] == "end":
                break
        sender.cancel()  # done already, unless the session ended early (an error)
        await asyncio.gather(sender, return_exceptions=True)
        return np.frombuffer(b"".join(audio), "<i2"), messages
    finally:
        if own:
            await ws.close()
