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
    """mosquitto on 127.0.0.1:PORT with persistence in `workdir`, so queued QoS 1 messages survive a restart.

    `users` ({name: password}) turns anonymous access off and writes a password file; `acl` is the
    text of an ACL file; `tls` adds a TLS listener (`tls_port`) with a self-signed CA made here
    (`ca_file` for clients); `autosave_interval` saves the persistence file every that many seconds,
    so a `kill()` (SIGKILL) loses at most that much."""

    def __init__(self, workdir: Path, users: dict[str, str] | None = None, acl: str | None = None, tls: bool = False,
                 autosave_interval: int | None = None):
        if shutil.which("mosquitto") is None:
            raise RuntimeError("mosquitto is not installed (scripts/test.sh installs it)")
        self.workdir = workdir
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.ca_file: Path | None = None
        conf = ["per_listener_settings false", f"listener {self.port} 127.0.0.1", "persistence true",
                f"persistence_location {workdir}/", "user root", f"log_dest file {workdir}/mosquitto.log"]
        if autosave_interval is not None:
            conf.append(f"autosave_interval {autosave_interval}")
        if users:
            pw = workdir / "passwords"
            pw.write_text("")
            for name, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), name, password], check=True, capture_output=True)
            conf += ["allow_anonymous false", f"password_file {pw}"]
        else:
            conf.append("allow_anonymous true")
        if acl is not None:
            (workdir / "acl").write_text(acl)
            conf.append(f"acl_file {workdir}/acl")
        if tls:
            self.ca_file, cert, key = self._certificates(workdir)
            conf += [f"listener {self.tls_port} 127.0.0.1", f"cafile {self.ca_file}", f"certfile {cert}", f"keyfile {key}"]
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text("\n".join(conf) + "\n")
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def _certificates(workdir: Path) -> tuple[Path, Path, Path]:
        """A self-signed CA and a server certificate for 127.0.0.1 / localhost it signed (openssl)."""
        ca_key, ca, key, csr, cert = (workdir / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
        ext = workdir / "san.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=streamgen test CA",
            "-keyout", str(ca_key), "-out", str(ca))
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr))
        run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
            "-extfile", str(ext), "-out", str(cert))
        return ca, cert, key

    def start(self) -> None:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        if self.tls_port:
            wait_for_port(self.tls_port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence file
            self.proc.wait(timeout=10)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL: no chance to save; what survives is the last autosave."""
        if self.proc is not None:
            self.proc.kill()
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
