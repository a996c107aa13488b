"""MQTT input and output (aiomqtt), with streamgen's wire format.

Wire format: every message is a 22-byte little-endian header, the session id, then the payload.

    offset size  field
    0      2     magic b"SG"
    2      1     version (1)
    3      1     kind: 0 audio, 1 control (UTF-8 JSON)
    4      1     encoding of audio: 0 PCM16, 1 float32 (little-endian, mono)
    5      1     session id length n (1..64)
    6      4     sample rate (Hz, audio; 0 for control)
    10     4     sequence number (per session, audio and control share it, from 0)
    14     8     sender timestamp (seconds since the epoch, float64; 0 if unknown)
    22     n     session id (UTF-8)
    22+n   ...   payload

Control, in:  {"type": "start", "task": "translation", "options": {"chunk_ms": 320}}  (optional)
              {"type": "stop"}  — end of input: the session flushes and ends
Control, out: {"type": "end"} after a session's last audio; {"type": "error", "message": "..."}

QoS 1 delivers at least once: a message may arrive twice (e.g. across a broker restart), so
receivers order by sequence number and drop repeats; the pipeline does so on input, and clients
should on output.

Messages are delivered to the pipeline in sequence order per session: early ones wait (up to
`reorder_window` messages), duplicates (QoS 1 redelivery) are dropped, and a gap that outlives the
window is skipped and counted. A session's sample rate is fixed by its first audio message and
resampled to the pipeline's. The link reconnects with backoff; with QoS 1 and a persistent session
(stable client id, clean_session=False) the broker keeps what arrives while the link is down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import struct
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

import numpy as np
import soxr
import torch

from ..pipeline.items import AudioChunk, AudioOut, Control, End, Item, SessionError

log = logging.getLogger("streamgen.mqtt")

MAGIC, VERSION = b"SG", 1
HEADER = struct.Struct("<2sBBBBIId")
AUDIO, CONTROL = 0, 1
PCM16, FLOAT32 = 0, 1
MIN_RATE, MAX_RATE = 8000, 192000
INPUT_CONTROLS = ("start", "stop", "task")


class WireError(ValueError):
    """A message that does not follow the wire format; `session` is set when the header named one."""

    def __init__(self, message: str, session: str | None = None):
        super().__init__(message)
        self.session = session


@dataclass
class Message:
    session: str
    seq: int
    kind: int
    sample_rate: int = 0
    samples: np.ndarray | None = None  # float32 audio
    control: dict | None = None
    timestamp: float = 0.0


def encode_audio(session: str, seq: int, samples: np.ndarray, sample_rate: int, encoding: int = PCM16, timestamp: float | None = None) -> bytes:
    x = np.asarray(samples, dtype=np.float32)
    payload = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes() if encoding == PCM16 else x.astype("<f4").tobytes()
    return _pack(session, seq, AUDIO, encoding, sample_rate, timestamp, payload)


def encode_control(session: str, seq: int, body, timestamp: float | None = None) -> bytes:
    return _pack(session, seq, CONTROL, 0, 0, timestamp, json.dumps(body).encode())


def _pack(session, seq, kind, encoding, rate, timestamp, payload) -> bytes:
    sid = session.encode()
    if not 1 <= len(sid) <= 64:
        raise ValueError("session id must be 1..64 bytes of UTF-8")
    return HEADER.pack(MAGIC, VERSION, kind, encoding, len(sid), rate, seq, time.time() if timestamp is None else timestamp) + sid + payload


def decode(data: bytes) -> Message:
    """Parse one message, or raise WireError saying what is wrong with it."""
    if len(data) < HEADER.size:
        raise WireError(f"message of {len(data)} bytes is shorter than the {HEADER.size}-byte header")
    magic, version, kind, encoding, n, rate, seq, ts = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f"not a streamgen message (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise WireError(f"unsupported wire format version {version} (this is {VERSION})")
    if not 1 <= n <= 64 or len(data) < HEADER.size + n:
        raise WireError(f"session id length {n} does not fit a message of {len(data)} bytes")
    try:
        session = data[HEADER.size : HEADER.size + n].decode()
    except UnicodeDecodeError:
        raise WireError("session id is not UTF-8") from None
    payload = data[HEADER.size + n :]
    if kind == CONTROL:
        try:
            body = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WireError(f"control message {seq} is not valid JSON: {e}", session) from None
        if not isinstance(body, dict) or not isinstance(body.get("type"), str):
            raise WireError(f"control message {seq} must be a JSON object with a \"type\"", session)
        return Message(session, seq, kind, control=body, timestamp=ts)
    if kind != AUDIO:
        raise WireError(f"unknown message kind {kind}", session)
    if not MIN_RATE <= rate <= MAX_RATE:
        raise WireError(f"audio message {seq}: sample rate {rate} Hz is outside {MIN_RATE}..{MAX_RATE}", session)
    width = {PCM16: 2, FLOAT32: 4}.get(encoding)
    if width is None:
        raise WireError(f"audio message {seq}: unknown encoding {encoding} (0 PCM16, 1 float32)", session)
    if len(payload) == 0 or len(payload) % width:
        raise WireError(f"audio message {seq}: payload of {len(payload)} bytes is not a whole number of {width}-byte samples (truncated?)", session)
    x = np.frombuffer(payload, "<i2").astype(np.float32) / 32768.0 if encoding == PCM16 else np.frombuffer(payload, "<f4").astype(np.float32)
    return Message(session, seq, kind, rate, x, timestamp=ts)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    topic: str
    tls: bool = False
    username: str | None = None
    password: str | None = None


def parse_url(url: str) -> Endpoint:
    """mqtt://[user:pass@]host[:port]/topic (mqtts:// for TLS); `+` and `#` may be used in an input
    topic, `{session}` in an output topic."""
    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname or not u.path.strip("/"):
        raise ValueError(f"{url!r}: expected mqtt://host[:port]/topic or mqtts://...")
    tls = u.scheme == "mqtts"
    return Endpoint(u.hostname, u.port or (8883 if tls else 1883), unquote(u.path.lstrip("/")), tls,
                    unquote(u.username) if u.username else None, unquote(u.password) if u.password else None)


class MqttLink:
    """One client connection with reconnect and backoff, shared by a source and a sink."""

    def __init__(self, host: str, port: int, *, username=None, password=None, tls_context: ssl.SSLContext | None = None,
                 client_id: str | None = None, qos: int = 1, max_backoff: float = 5.0, incoming_size: int = 256):
        self.host, self.port, self.username, self.password = host, port, username, password
        self.tls_context, self.qos, self.max_backoff = tls_context, qos, max_backoff
        self.client_id = client_id or f"streamgen-{uuid.uuid4().hex[:12]}"
        self.subscriptions: list[str] = []
        self.incoming: asyncio.Queue = asyncio.Queue(incoming_size)  # back-pressure to the broker
        self.connected = asyncio.Event()
        self.client = None
        self.task: asyncio.Task | None = None
        self.reconnects = 0

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        import aiomqtt

        delay = 0.1
        while True:
            try:
                async with aiomqtt.Client(self.host, self.port, username=self.username, password=self.password,
                                          identifier=self.client_id, clean_session=False, tls_context=self.tls_context,
                                          timeout=5) as client:
                    self.client = client
                    for topic in self.subscriptions:
                        await client.subscribe(topic, qos=self.qos)
                    self.connected.set()
                    delay = 0.1
                    log.info("connected to %s:%d as %s", self.host, self.port, self.client_id)
                    async for msg in client.messages:
                        await self.incoming.put((str(msg.topic), bytes(msg.payload)))
            except aiomqtt.MqttError as e:
                log.warning("MQTT connection to %s:%d lost or refused (%s); retrying in %.1f s", self.host, self.port, e, delay)
            finally:
                self.connected.clear()
                self.client = None
            self.reconnects += 1
            await asyncio.sleep(delay)
            delay = min(2 * delay, self.max_backoff)

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish, waiting for the link and retrying across reconnects until the broker accepts it."""
        import aiomqtt

        self.start()
        while True:
            await self.connected.wait()
            client = self.client
            try:
                await client.publish(topic, payload, qos=self.qos, timeout=10)
                return
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None


class _Session:
    def __init__(self, name: str):
        self.name = name
        self.expected = 0
        self.waiting: dict[int, Message] = {}
        self.rate: int | None = None
        self.resampler = None
        self.pos = 0
        self.last_seen = time.monotonic()


class MqttSource:
    """Sessions arriving on a topic (wildcards allowed); yields pipeline items in sequence order."""

    def __init__(self, link: MqttLink, topic: str, sample_rate: int, reorder_window: int = 64,
                 idle_timeout_s: float = 30.0, max_sessions: int | None = None):
        self.link, self.topic, self.rate = link, topic, sample_rate
        self.window, self.idle_timeout, self.max_sessions = reorder_window, idle_timeout_s, max_sessions
        self.sessions: dict[str, _Session] = {}
        self.finished: set[str] = set()
        self.malformed = 0  # messages that broke the wire format
        self.skipped = 0  # messages that never arrived (gaps older than the reorder window)
        link.subscriptions.append(topic)

    async def __aiter__(self) -> AsyncIterator[Item]:
        self.link.start()
        while self.max_sessions is None or len(self.finished) < self.max_sessions:
            try:
                topic, data = await asyncio.wait_for(self.link.incoming.get(), timeout=1.0)
            except TimeoutError:
                for item in self._expire_idle():
                    yield item
                continue
            try:
                msg = decode(data)
                if msg.kind == CONTROL and msg.control["type"] not in INPUT_CONTROLS:
                    raise WireError(f"control message {msg.seq}: type must be one of {', '.join(INPUT_CONTROLS)}", msg.session)
            except WireError as e:
                self.malformed += 1
                name = e.session or "unknown"
                log.warning("malformed message on %s: %s", topic, e)
                yield SessionError(name, f"malformed message on {topic}: {e}")
                if e.session is not None and e.session not in self.finished:  # its stream is broken: end it
                    yield self._broken(e.session)
                continue
            if msg.session in self.finished:
                continue  # a late duplicate of an ended session
            for item in self._accept(msg):
                yield item

    def _accept(self, msg: Message) -> list[Item]:
        s = self.sessions.get(msg.session)
        if s is None:
            s = self.sessions[msg.session] = _Session(msg.session)
        s.last_seen = time.monotonic()
        if msg.seq < s.expected or msg.seq in s.waiting:
            return []  # duplicate
        s.waiting[msg.seq] = msg
        out: list[Item] = []
        while True:
            if s.expected in s.waiting:
                out += self._deliver(s, s.waiting.pop(s.expected))
                s.expected += 1
                if s.name in self.finished:
                    return out
            elif len(s.waiting) > self.window:  # the gap is not coming back: skip it
                self.skipped += 1
                log.warning("session %s: message %d never arrived; skipping it", s.name, s.expected)
                s.expected += 1
            else:
                return out

    def _deliver(self, s: _Session, msg: Message) -> list[Item]:
        if msg.kind == CONTROL:
            kind = msg.control["type"]
            if kind == "stop":
                return self._end(s)
            return [Control(s.name, kind, msg.control.get("task"), dict(msg.control.get("options") or {}))]
        if s.rate is None:
            s.rate = msg.sample_rate
            if s.rate != self.rate:
                s.resampler = soxr.ResampleStream(s.rate, self.rate, 1, dtype="float32", quality="HQ")
        elif msg.sample_rate != s.rate:
            self.finished.add(s.name)
            self.sessions.pop(s.name, None)
            return [SessionError(s.name, f"audio message {msg.seq}: sample rate changed from {s.rate} to {msg.sample_rate} Hz mid-session"),
                    End(s.name, s.pos, time.monotonic())]
        x = msg.samples if s.resampler is None else s.resampler.resample_chunk(msg.samples)
        if not len(x):
            return []
        chunk = AudioChunk(s.name, msg.seq, torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), s.pos, time.monotonic())
        s.pos += len(x)
        return [chunk]

    def _end(self, s: _Session) -> list[Item]:
        out: list[Item] = []
        if s.resampler is not None:
            tail = s.resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            if len(tail):
                out.append(AudioChunk(s.name, -1, torch.from_numpy(np.ascontiguousarray(tail)), s.pos, time.monotonic()))
                s.pos += len(tail)
        out.append(End(s.name, s.pos, time.monotonic()))
        self.finished.add(s.name)
        self.sessions.pop(s.name, None)
        return out

    def _broken(self, session: str) -> End:
        """End a session whose stream broke (after its SessionError)."""
        s = self.sessions.pop(session, None)
        self.finished.add(session)
        return End(session, s.pos if s else 0, time.monotonic())

    def _expire_idle(self) -> list[Item]:
        now = time.monotonic()
        out: list[Item] = []
        for s in [s for s in self.sessions.values() if now - s.last_seen > self.idle_timeout]:
            log.warning("session %s: nothing for %.0f s; ending it", s.name, self.idle_timeout)
            out += self._end(s)
        return out


class MqttSink:
    """Publishes each session's audio (PCM16 at the pipeline rate) and its end or error."""

    def __init__(self, link: MqttLink, topic: str, sample_rate: int):
        self.link, self.topic, self.rate = link, topic, sample_rate
        self.seq: dict[str, int] = {}
        self.errors: dict[str, str] = {}

    def _next(self, session: str) -> tuple[str, int]:
        n = self.seq.get(session, 0)
        self.seq[session] = n + 1
        return self.topic.replace("{session}", session), n

    async def write(self, item: Item) -> None:
        if isinstance(item, AudioOut):
            topic, n = self._next(item.session)
            await self.link.publish(topic, encode_audio(item.session, n, item.samples.numpy(), self.rate))
        elif isinstance(item, End):
            topic, n = self._next(item.session)
            await self.link.publish(topic, encode_control(item.session, n, {"type": "end"}))
            self.seq.pop(item.session, None)
        elif isinstance(item, SessionError):
            self.errors[item.session] = item.message
            topic, n = self._next(item.session)
            await self.link.publish(topic, encode_control(item.session, n, {"type": "error", "message": item.message}))

    async def close(self) -> None:
        await self.link.close()


def tls_context(ca: str | None = None, cert: str | None = None, key: str | None = None, insecure: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
