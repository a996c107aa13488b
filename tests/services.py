"""Real services for tests: a Mosquitto broker and a JACK dummy server on loopback."""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Mosquitto:
    """mosquitto on 127.0.0.1:PORT with persistence in `workdir`, so queued QoS 1 messages survive a restart."""

    def __init__(self, workdir: Path):
        if shutil.which("mosquitto") is None:
            raise RuntimeError("mosquitto is not installed (scripts/test.sh installs it)")
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {workdir}/\nuser root\nlog_dest file {workdir}/mosquitto.log\n"
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence file
            self.proc.wait(timeout=10)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


class Jack:
    """`jackd --no-realtime -d dummy -r 16000`: a paced audio server with no hardware."""

    def __init__(self, rate: int = 16000, period: int = 320):
        if shutil.which("jackd") is None:
            raise RuntimeError("jackd is not installed (scripts/test.sh installs jackd2)")
        env = dict(os.environ, JACK_NO_AUDIO_RESERVATION="1")
        self.proc = subprocess.Popen(["jackd", "--no-realtime", "-d", "dummy", "-r", str(rate), "-p", str(period)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if subprocess.run(["jack_lsp"], capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("jackd did not start")

    @staticmethod
    def ports() -> list[str]:
        return subprocess.run(["jack_lsp"], capture_output=True, text=True).stdout.split()

    @staticmethod
    def connect(a: str, b: str) -> None:
        subprocess.run(["jack_connect", a, b], check=True, capture_output=True)

    @staticmethod
    def disconnect(a: str, b: str) -> None:
        subprocess.run(["jack_disconnect", a, b], capture_output=True)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
