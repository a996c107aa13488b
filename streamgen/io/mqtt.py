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
    22     n     session id: [A-Za-z0-9][A-Za-z0-9_.-]{0,63}
    22+n   ...   payload

Control, in:  {"type": "start", "task": "translation", "options": {"chunk_ms": 320}}  (optional)
              {"type": "task", "task": ..., "options": {...}}  — switch task
              {"type": "stop"}  — end of input: the session flushes and ends
              A control message is at most 4 KiB, a JSON object of exactly these fields; "options"
              maps names to scalars (string, number, boolean).
Control, out: {"type": "start"} first, then audio, then {"type": "end"}, or {"type": "error",
              "message": "..."} followed by {"type": "end"}.

Input is trusted only as far as the broker vouches for it: with a `+` in the input topic, the
session is that topic segment (which a broker ACL can tie to a user), and a header naming another
session is refused. Messages are delivered to the pipeline in sequence order per session: early
ones wait (up to `reorder_window` messages and `max_buffer_bytes`), duplicates (QoS 1 redelivery)
are dropped, and a message that never arrives ends its session with an error naming the missing
sequence numbers. A session's sample rate is fixed by its first audio message and resampled to
the pipeline's.

Output: each session's reply stream starts at a random 32-bit sequence number R ({"type":
"start"} at R, then R+1, R+2, ... modulo 2^32), so a stream from a restarted server, or from a
later session with the same id, never reuses the numbers of another; a gap in the numbers is
output the client lost. `Reply` assembles one stream on the client side. Problems that belong to
no session (no readable id) are published on the server topic: the output topic with `_server`
for the session and `errors` for its last segment (`sessions/{session}/out` -> `sessions/_server/errors`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import secrets
import ssl
import struct
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

import numpy as np
import soxr
import torch

from ..audio import ahead_of_real_time, pcm16_decode, pcm16_encode
from ..pipeline.items import AudioChunk, AudioOut, Control, End, Item, SessionError
from ..pipeline.tasks import load_task

log = logging.getLogger("streamgen.mqtt")

MAGIC, VERSION = b"SG", 1
HEADER = struct.Struct("<2sBBBBIId")
AUDIO, CONTROL = 0, 1
PCM16, FLOAT32 = 0, 1
MIN_RATE, MAX_RATE = 8000, 192000
INPUT_CONTROLS = ("start", "stop", "task")
SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SESSION_RULE = "1 to 64 of A-Z a-z 0-9 _ . - starting with a letter or digit"
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SERVER = "_server"  # the session name of server replies (no client id can start with "_")
MAX_MESSAGE_BYTES = 1 << 20  # a whole message; 10 s of 48 kHz PCM16 fits
MAX_MESSAGE_SECONDS = 10.0  # of audio in one message
MAX_CONTROL_BYTES = 4096
MAX_OPTIONS, MAX_OPTION_TEXT = 32, 256
MAX_OPTION_INT = 1 << 53
SEQ_MOD = 1 << 32


class WireError(ValueError):
    """A message that does not follow the wire format; `session` is set when the header named a valid one."""

    def __init__(self, message: str, session: str | None = None):
        super().__init__(message)
        self.session = session


class MqttFailure(RuntimeError):
    """The broker refused this client for good (bad credentials, not authorised, TLS): retrying cannot help."""


@dataclass
class Message:
    session: str
    seq: int
    kind: int
    sample_rate: int = 0
    samples: np.ndarray | None = None  # float32 audio
    control: dict | None = None
    timestamp: float = 0.0
    size: int = 0  # bytes on the wire


def encode_audio(session: str, seq: int, samples: np.ndarray, sample_rate: int, encoding: int = PCM16, timestamp: float | None = None) -> bytes:
    x = np.asarray(samples, dtype=np.float32)
    payload = pcm16_encode(x).tobytes() if encoding == PCM16 else x.astype("<f4").tobytes()
    return _pack(session, seq, AUDIO, encoding, sample_rate, timestamp, payload)


def encode_control(session: str, seq: int, body, timestamp: float | None = None) -> bytes:
    return _pack(session, seq, CONTROL, 0, 0, timestamp, json.dumps(body).encode())


def _pack(session, seq, kind, encoding, rate, timestamp, payload) -> bytes:
    if not (SESSION_ID.fullmatch(session) or session == SERVER):
        raise ValueError(f"session id {session!r}: use {SESSION_RULE}")
    sid = session.encode()
    return HEADER.pack(MAGIC, VERSION, kind, encoding, len(sid), rate, seq % SEQ_MOD, time.time() if timestamp is None else timestamp) + sid + payload


def decode(data: bytes) -> Message:
    """Parse and validate one message, or raise WireError saying what is wrong with it."""
    if len(data) < HEADER.size:
        raise WireError(f"message of {len(data)} bytes is shorter than the {HEADER.size}-byte header")
    magic, version, kind, encoding, n, rate, seq, ts = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f"not a streamgen message (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise WireError(f"unsupported wire format version {version} (this is {VERSION})")
    if not 1 <= n <= 64 or len(data) < HEADER.size + n:
        raise WireError(f"session id length {n} does not fit a message of {len(data)} bytes")
    raw = data[HEADER.size : HEADER.size + n]
    session = raw.decode("ascii", "replace")
    if not (SESSION_ID.fullmatch(session) or session == SERVER):
        raise WireError(f"session id {raw!r} is not valid: use {SESSION_RULE}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise WireError(f"message {seq} of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES} byte limit (send at most {MAX_MESSAGE_SECONDS:.0f} s of audio per message)", session)
    if not math.isfinite(ts):
        ts = 0.0
    payload = data[HEADER.size + n :]
    if kind == CONTROL:
        return Message(session, seq, kind, control=parse_control(payload, seq, session), timestamp=ts, size=len(data))
    if kind != AUDIO:
        raise WireError(f"message {seq}: unknown message kind {kind} (0 audio, 1 control)", session)
    if not MIN_RATE <= rate <= MAX_RATE:
        raise WireError(f"audio message {seq}: sample rate {rate} Hz is outside {MIN_RATE}..{MAX_RATE}", session)
    width = {PCM16: 2, FLOAT32: 4}.get(encoding)
    if width is None:
        raise WireError(f"audio message {seq}: unknown encoding {encoding} (0 PCM16, 1 float32)", session)
    if len(payload) == 0 or len(payload) % width:
        raise WireError(f"audio message {seq}: payload of {len(payload)} bytes is not a whole number of {width}-byte samples (truncated?)", session)
    if len(payload) // width > MAX_MESSAGE_SECONDS * rate:
        raise WireError(f"audio message {seq}: {len(payload) // width / rate:.1f} s exceeds the {MAX_MESSAGE_SECONDS:.0f} s limit for one message", session)
    x = pcm16_decode(np.frombuffer(payload, "<i2")) if encoding == PCM16 else np.frombuffer(payload, "<f4").astype(np.float32)
    return Message(session, seq, kind, rate, x, timestamp=ts, size=len(data))


def _json_depth(text: str) -> int:
    """How deeply arrays and objects nest in JSON text, counted without parsing (no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def parse_control(payload: bytes, seq: int, session: str) -> dict:
    """A control message's JSON body: at most 4 KiB, nested at most 2 deep, an object with a "type"."""
    where = f"control message {seq}"
    if len(payload) > MAX_CONTROL_BYTES:
        raise WireError(f"{where} of {len(payload)} bytes exceeds the {MAX_CONTROL_BYTES} byte limit", session)
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        raise WireError(f"{where} is not UTF-8", session) from None
    try:
        return control_body(text)
    except ValueError as e:
        raise WireError(f"{where} {e}", session) from None


def control_body(text: str) -> dict:
    """A control message's JSON text -> its object, or a ValueError saying what is wrong with it: nested
    at most 2 deep (counted before parsing, so no depth can exhaust the parser's recursion), no NaN or
    Infinity, an object with a string "type"."""
    depth = _json_depth(text)
    if depth > 2:
        raise ValueError(f"nests {depth} levels deep; at most 2 (an object with an \"options\" object)")
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except ValueError as e:
        raise ValueError(f"is not valid JSON: {e}") from None
    if not isinstance(body, dict) or not isinstance(body.get("type"), str):
        raise ValueError("must be a JSON object with a \"type\"")
    return body


def check_input_control(msg: Message) -> None:
    """What a server accepts as control input, field by field (see the module docstring)."""
    body, where, session = msg.control, f"control message {msg.seq}", msg.session
    kind = body["type"]
    if kind not in INPUT_CONTROLS:
        raise WireError(f"{where}: type {kind[:40]!r} is not one of {', '.join(INPUT_CONTROLS)}", session)
    allowed = {"type"} if kind == "stop" else {"type", "task", "options"}
    extra = sorted(set(body) - allowed)
    if extra:
        raise WireError(f"{where}: a {kind!r} message has no field {', '.join(repr(k[:40]) for k in extra[:5])} (it has: {', '.join(sorted(allowed))})", session)
    task = body.get("task")
    if task is not None and not (isinstance(task, str) and TASK_NAME.fullmatch(task)):
        raise WireError(f"{where}: \"task\" must be a task name (letters, digits, _ . -), got {str(task)[:40]!r}", session)
    why = options_problem(body.get("options", {}))
    if why is not None:
        raise WireError(f"{where}: {why}", session)


def options_problem(options) -> str | None:
    """What is wrong with a client's task options (None: an object of at most `MAX_OPTIONS` plain
    names, each a bounded string, a finite number, an integer up to 2^53 or a boolean), before any
    task reads them."""
    if not isinstance(options, dict):
        return f"\"options\" must be an object of name: value pairs, got {type(options).__name__}"
    if len(options) > MAX_OPTIONS:
        return f"{len(options)} options, at most {MAX_OPTIONS}"
    for k, v in options.items():
        if not TASK_NAME.fullmatch(k):
            return f"option name {k[:40]!r} is not a plain name (letters, digits, _ . -)"
        if isinstance(v, bool) or (isinstance(v, str) and len(v) <= MAX_OPTION_TEXT):
            continue
        if isinstance(v, int) and abs(v) <= MAX_OPTION_INT:
            continue
        if isinstance(v, float) and math.isfinite(v):
            continue
        return (f"option {k!r} must be a string (up to {MAX_OPTION_TEXT} characters), a number "
                f"(integers up to 2^53) or a boolean, got {type(v).__name__} {str(v)[:40]}")
    return None


def ranges(runs: list[tuple[int, int]], limit: int = 8) -> str:
    """[(3, 5), (9, 9)] -> "3-5, 9" (the first `limit` runs, then how many more)."""
    text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs[:limit])
    return text + (f" and {len(runs) - limit} more runs" if len(runs) > limit else "")


def _add_run(runs: list[tuple[int, int]], a: int, b: int) -> None:
    if runs and runs[-1][1] + 1 == a:
        runs[-1] = (runs[-1][0], b)
    else:
        runs.append((a, b))


class GapError(Exception):
    """A session's input has a hole that waiting cannot fill (its text names the missing messages)."""


class Reorder:
    """One session's messages back in sequence order. A repeat (QoS 1 redelivers) is dropped; a message
    ahead of a missing one waits for it, within `window` messages and `max_bytes`. Past either bound
    the hole is an error (`GapError`), never skipped: audio that was sent is not lost silently, and a
    sequence number far ahead costs nothing."""

    def __init__(self, window: int, max_bytes: int, expected: int = 0):
        self.window, self.max_bytes = window, max_bytes
        self.expected = expected  # the next sequence number to deliver
        self.waiting: dict[int, Message] = {}
        self.buffered = 0  # bytes in `waiting`

    def accept(self, msg: Message) -> list[Message]:
        """The messages now deliverable, in order (none for a repeat or while a hole remains)."""
        if msg.seq < self.expected or msg.seq in self.waiting:
            return []
        if msg.seq - self.expected >= self.window:
            raise GapError(f"message {msg.seq} arrived while message {self.expected} is still missing: more than the "
                           f"reorder window of {self.window} messages apart; never arrived: {self.missing(msg.seq)}")
        if self.buffered + msg.size > self.max_bytes:
            raise GapError(f"{(self.buffered + msg.size) / 2**20:.1f} MiB of messages are waiting for message {self.expected} "
                           f"(the limit is {self.max_bytes / 2**20:.0f} MiB); never arrived: {self.missing()}")
        self.waiting[msg.seq] = msg
        self.buffered += msg.size
        out = []
        while self.expected in self.waiting:
            m = self.waiting.pop(self.expected)
            self.buffered -= m.size
            self.expected += 1
            out.append(m)
        return out

    def missing(self, upto: int | None = None) -> str:
        """The sequence numbers from the expected one up to `upto` (else the newest waiting) that never came."""
        upto = max(self.waiting, default=self.expected - 1) + 1 if upto is None else upto
        near = min(upto, self.expected + self.window)  # nothing waits beyond the window
        runs: list[tuple[int, int]] = []
        for n in range(self.expected, near):
            if n not in self.waiting:
                _add_run(runs, n, n)
        if upto > near:
            _add_run(runs, near, upto - 1)
        return ranges(runs)


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


def _refusal(e: Exception) -> str | None:
    """Why a connection attempt can never succeed (credentials, authorisation, TLS), or None if retrying may help."""
    import aiomqtt

    if isinstance(e, aiomqtt.MqttCodeError):
        code = getattr(e.rc, "value", e.rc)
        if code in (4, 5, 134, 135):  # mosquitto answers a wrong password with "not authorised"
            return (f"{'bad user name or password' if code in (4, 134) else 'not authorised'}; check the user name and the "
                    "password (--mqtt-username, --mqtt-password-file or STREAMGEN_MQTT_PASSWORD)")
    cause = e.__cause__ or e.__context__
    if isinstance(e, ssl.SSLError) or isinstance(cause, ssl.SSLError):
        return f"TLS failed ({cause or e})"
    return None


class MqttLink:
    """One client connection with reconnect and backoff, shared by a source and a sink; `incoming`
    holds (topic, payload, monotonic arrival time) of what the subscriptions receive. A refusal
    that retrying cannot cure (credentials, authorisation, TLS) ends it: `failure` is set, the
    source raises it and publishing raises it.

    What arrives faster than the pipeline reads it waits in `incoming` (`incoming_size` messages)
    and then in the client library's queue, at most `max_backlog` messages: beyond that an overloaded
    server discards messages instead of growing without bound, and each session that lost some gets
    an error listing the gap (the broker has already acknowledged them)."""

    def __init__(self, host: str, port: int, *, username=None, password=None, tls_context: ssl.SSLContext | None = None,
                 client_id: str | None = None, qos: int = 1, max_backoff: float = 5.0, incoming_size: int = 256,
                 clean_session: bool = False, max_backlog: int = 8192):
        self.host, self.port, self.username, self.password = host, port, username, password
        self.max_backlog = max_backlog
        self.tls_context, self.qos, self.max_backoff, self.clean_session = tls_context, qos, max_backoff, clean_session
        self.client_id = client_id or f"streamgen-{uuid.uuid4().hex[:12]}"
        self.subscriptions: list[str] = []
        self.incoming: asyncio.Queue = asyncio.Queue(incoming_size)  # back-pressure to the broker
        self._waiting_puts: set[asyncio.Future] = set()  # messages of an ended connection still to go in
        self.connected = asyncio.Event()
        self.failed = asyncio.Event()
        self.failure: MqttFailure | None = None
        self.client = None
        self.task: asyncio.Task | None = None
        self.reconnects = 0

    async def _hand_in(self, client, item) -> None:
        """Into `incoming`, waiting while the pipeline is behind, but never past the connection's end: a
        full queue must not hide a broker restart (the link would neither reconnect nor publish again).
        A message waiting then keeps its place, ahead of what the next connection brings."""
        if not self.incoming.full():
            self.incoming.put_nowait(item)
            return
        put = asyncio.ensure_future(self.incoming.put(item))
        gone = getattr(client, "_disconnected", None)  # aiomqtt's end of this connection (its message iterator waits on it too)
        if not isinstance(gone, asyncio.Future):
            await put
            return
        try:
            await asyncio.wait({put, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            put.cancel()
            raise
        if gone.done() and not gone.cancelled():
            gone.exception()  # read here, as aiomqtt's iterator reads it (else asyncio reports it never was)
        if not put.done():
            import aiomqtt

            self._keep(put)  # still queued, first in line
            # what the client library took in (and acknowledged) after it: the broker will not send it again
            taken = getattr(client, "_queue", None)
            while isinstance(taken, asyncio.Queue) and not taken.empty():
                msg = taken.get_nowait()
                self._keep(asyncio.ensure_future(self.incoming.put((str(msg.topic), bytes(msg.payload), time.monotonic()))))
            raise aiomqtt.MqttError("the connection ended while the pipeline was behind")

    def _keep(self, put: asyncio.Future) -> None:
        self._waiting_puts.add(put)
        put.add_done_callback(self._waiting_puts.discard)

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        import aiomqtt

        delay = 0.1
        while True:
            try:
                async with aiomqtt.Client(self.host, self.port, username=self.username, password=self.password,
                                          identifier=self.client_id, clean_session=self.clean_session,
                                          tls_context=self.tls_context, timeout=5,
                                          max_queued_incoming_messages=self.max_backlog) as client:
                    self.client = client
                    for topic in self.subscriptions:
                        await client.subscribe(topic, qos=self.qos)
                    self.connected.set()
                    delay = 0.1
                    log.info("connected to %s:%d as %s", self.host, self.port, self.client_id)
                    async for msg in client.messages:
                        await self._hand_in(client, (str(msg.topic), bytes(msg.payload), time.monotonic()))
            except (aiomqtt.MqttError, ssl.SSLError) as e:
                why = _refusal(e)
                if why is not None:
                    self._fail(f"the MQTT broker {self.host}:{self.port} refused {self.username or 'the anonymous login'!r}: {why}")
                    return
                log.warning("MQTT connection to %s:%d lost or refused (%s); retrying in %.1f s", self.host, self.port, e, delay)
            finally:
                self.connected.clear()
                self.client = None
            self.reconnects += 1
            await asyncio.sleep(delay)
            delay = min(2 * delay, self.max_backoff)

    def _fail(self, message: str) -> None:
        self.failure = MqttFailure(message)
        self.failed.set()
        while not self.incoming.empty():  # wake a reader with the failure
            self.incoming.get_nowait()
        self.incoming.put_nowait(None)

    async def _ready(self) -> None:
        """Wait until connected; raise the failure if the broker refused us for good."""
        if not self.connected.is_set() and not self.failed.is_set():
            waits = [asyncio.ensure_future(self.connected.wait()), asyncio.ensure_future(self.failed.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        if self.failure is not None:
            raise self.failure

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish, waiting for the link and retrying across reconnects until the broker accepts it."""
        import aiomqtt

        self.start()
        while True:
            await self._ready()
            client = self.client
            try:
                await client.publish(topic, payload, qos=self.qos, timeout=10)
                return
            except (aiomqtt.MqttError, AttributeError):  # lost mid-publish (client is None once closed)
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None


def session_slot(topic_filter: str) -> int | None:
    """Which topic segment names the session: the first `+` of the filter (after `$share/GROUP/`)."""
    parts = topic_filter.split("/")
    if parts[0] == "$share":
        parts = parts[2:]
    return parts.index("+") if "+" in parts else None


def server_topic(reply_topic: str) -> str:
    """Where problems that belong to no session go: `a/{session}/out` -> `a/_server/errors`."""
    parts = reply_topic.replace("{session}", SERVER).split("/")
    return "/".join(parts[:-1] + ["errors"]) if len(parts) > 1 else f"{SERVER}/errors"


class ReplyPublisher:
    """Numbers and publishes reply streams: each stream starts with {"type": "start"} at a random
    32-bit sequence number and counts up from there (modulo 2^32)."""

    def __init__(self, link: MqttLink, topic: str, sample_rate: int):
        self.link, self.topic, self.rate = link, topic, sample_rate
        self.next: dict[str, int] = {}

    async def send(self, session: str, body: dict | np.ndarray) -> None:
        topic = self.topic.replace("{session}", session)
        if session not in self.next:
            first = secrets.randbits(32)
            self.next[session] = first + 1
            await self.link.publish(topic, encode_control(session, first, {"type": "start"}))
        n = self.next[session]
        self.next[session] = (n + 1) % SEQ_MOD
        if isinstance(body, dict):
            await self.link.publish(topic, encode_control(session, n, body))
        else:
            await self.link.publish(topic, encode_audio(session, n, body, self.rate))

    def finish(self, session: str) -> None:
        self.next.pop(session, None)


@dataclass
class _Session:
    name: str
    order: Reorder
    rate: int | None = None
    resampler: object = None
    pos: int = 0
    started: bool = False  # a message was delivered
    deadline: float = 0.0  # idle expiry, on this session's own clock
    newest: float = 0.0  # latest sender timestamp
    first: bytes | None = None  # digest of its message 0
    opened: float = 0.0  # when its first message arrived


@dataclass
class _Ended:
    newest: float  # latest sender timestamp of the ended session
    until: float  # forget it after this (monotonic)
    first: bytes | None = None  # digest of its message 0 (a repeat of it is no new session)


def _digest(msg: Message) -> bytes:
    """What tells one message 0 from another: its kind, sender timestamp and content."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{msg.kind} {msg.timestamp!r} {msg.sample_rate}".encode())
    h.update(json.dumps(msg.control, sort_keys=True).encode() if msg.samples is None else np.ascontiguousarray(msg.samples).tobytes())
    return h.digest()


class MqttSource:
    """Sessions arriving on a topic (wildcards allowed); yields pipeline items in sequence order.

    Bounded: at most `max_live` sessions at once (more are refused as busy), per session at most
    `reorder_window` messages and `max_buffer_bytes` waiting for an earlier one, and a session with
    no message for `idle_timeout_s` ends with an error. With `reply_topic` set (the output topic,
    `{session}` in it), refusals for sessions the pipeline has not started, and problems that belong
    to no session, are published there and on the server topic. `max_sessions` ends the source
    after that many sessions completed (audio, then a stop, nothing missing)."""

    def __init__(self, link: MqttLink, topic: str, sample_rate: int, reorder_window: int = 64,
                 idle_timeout_s: float = 30.0, max_sessions: int | None = None, max_live: int = 32,
                 max_buffer_bytes: int = 8 << 20, reply_topic: str | None = None):
        self.link, self.topic, self.rate = link, topic, sample_rate
        self.window, self.idle_timeout, self.max_sessions = reorder_window, idle_timeout_s, max_sessions
        self.max_live, self.max_buffer_bytes = max_live, max_buffer_bytes
        self.slot = session_slot(topic)
        self.reply_topic = reply_topic
        self.sessions: dict[str, _Session] = {}
        self.ended: OrderedDict[str, _Ended] = OrderedDict()  # recently ended: late duplicates are dropped
        self.completed = 0  # sessions that had audio and ended with a stop, nothing missing
        self.malformed = 0  # messages refused
        self.outbox: asyncio.Queue = asyncio.Queue(256)
        self.replies_dropped = 0
        link.subscriptions.append(topic)

    async def __aiter__(self) -> AsyncIterator[Item]:
        self.link.start()
        sender = asyncio.get_running_loop().create_task(self._send_replies()) if self.reply_topic else None
        try:
            while self.max_sessions is None or self.completed < self.max_sessions:
                deadline = min((s.deadline for s in self.sessions.values()), default=None)
                try:  # what already arrived first: a backlog is not idleness
                    got = self.link.incoming.get_nowait()
                except asyncio.QueueEmpty:
                    try:
                        got = await asyncio.wait_for(self.link.incoming.get(), None if deadline is None else max(0.0, deadline - time.monotonic()))
                    except TimeoutError:
                        got = ()
                if got is None:
                    raise self.link.failure
                topic, data, now = got or (None, None, time.monotonic())
                items = self._expire_idle(now)  # judged at the arrival time: a backlog is not idleness
                if topic is not None:
                    items += self._receive(topic, data, now)
                for item in items:
                    yield item
        finally:
            if sender is not None:
                await self._flush_replies(sender)

    # --- one message ------------------------------------------------------------------------

    def _receive(self, topic: str, data: bytes, arrived: float) -> list[Item]:
        """Everything one message causes; whatever goes wrong ends at most the session it names."""
        owner = None
        try:
            if self.slot is not None:
                segments = topic.split("/")
                owner = segments[self.slot] if self.slot < len(segments) else ""
                if not SESSION_ID.fullmatch(owner):
                    return self._refuse(None, f"topic {topic[:120]!r}: {owner[:70]!r} is not a valid session id ({SESSION_RULE})")
            try:
                msg = decode(data)
                if msg.kind == CONTROL:
                    check_input_control(msg)
            except WireError as e:
                return self._refuse(owner or e.session, f"malformed message on {topic}: {e}")
            if msg.session == SERVER:
                return self._refuse(owner, f"message {msg.seq} on {topic} names the server's own session {SERVER!r}")
            if owner is not None and msg.session != owner:
                return self._refuse(owner, f"message {msg.seq} on {topic} names session {msg.session!r}: a message speaks only for its topic's session, {owner!r}")
            return self._accept(msg, arrived)
        except Exception as e:  # a bug, not the client's mistake: still only this session pays
            log.exception("message on %s failed", topic)
            return self._refuse(owner, f"internal error on this message ({type(e).__name__}); the session is ended")

    def _refuse(self, session: str | None, why: str) -> list[Item]:
        """Report a refused message: through the pipeline to a live session (which it ends), else
        straight to the session's reply topic, or to the server topic when it names no session."""
        self.malformed += 1
        log.warning("%s", why)
        if session is not None and session in self.sessions:
            return self._fail(self.sessions[session], why)
        self._reply(session, why)
        return []

    def _reply(self, session: str | None, why: str) -> None:
        if self.reply_topic is None:
            return
        try:
            self.outbox.put_nowait((session, why))
        except asyncio.QueueFull:
            self.replies_dropped += 1

    async def _send_replies(self) -> None:
        replies = ReplyPublisher(self.link, self.reply_topic, self.rate)
        errors = ReplyPublisher(self.link, server_topic(self.reply_topic), self.rate)
        while True:
            session, why = await self.outbox.get()
            try:
                if session is None:
                    await errors.send(SERVER, {"type": "error", "message": why})
                else:
                    await replies.send(session, {"type": "error", "message": why})
                    await replies.send(session, {"type": "end"})
                    replies.finish(session)
            finally:
                self.outbox.task_done()

    async def _flush_replies(self, sender: asyncio.Task) -> None:
        if not self.link.failed.is_set():
            try:
                await asyncio.wait_for(self.outbox.join(), 5.0)
            except TimeoutError:
                pass
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)

    def _accept(self, msg: Message, arrived: float) -> list[Item]:
        s = self.sessions.get(msg.session)
        if s is None:
            ended = self.ended.get(msg.session)
            if ended is not None:
                if msg.seq != 0:
                    return []  # a late repeat of an ended session, or the rest of one that failed
                if msg.timestamp <= ended.newest:
                    if ended.first is not None and _digest(msg) == ended.first:
                        return []  # its message 0 again (a QoS 1 repeat)
                    ago = time.monotonic() - (ended.until - self.idle_timeout)
                    return self._refuse(msg.session, (
                        f"session {msg.session!r} ended {ago:.0f} s ago, and this message 0 of a new session under its id has no "
                        f"later sender timestamp than the old one's last message, so its messages cannot be told from the old "
                        f"one's late repeats: send sender timestamps, use a new session id, or wait {self.idle_timeout:.0f} s"))
                del self.ended[msg.session]  # a first message, sent after that session's last one: a new session
            if len(self.sessions) >= self.max_live:
                return self._refuse(msg.session, f"the server is busy: {self.max_live} sessions are live, its limit; try again later")
            s = self.sessions[msg.session] = _Session(msg.session, Reorder(self.window, self.max_buffer_bytes), opened=arrived)
        s.deadline = arrived + self.idle_timeout
        s.newest = max(s.newest, msg.timestamp)
        if msg.seq == 0 and s.first is None:
            s.first = _digest(msg)
        try:
            ready = s.order.accept(msg)
        except GapError as e:
            return self._fail(s, str(e))
        out: list[Item] = []
        for m in ready:
            if s.name not in self.sessions:
                break  # ended by an earlier one (a stop): what follows it is not this session's
            out += self._deliver(s, m)
        why = ahead_of_real_time(s.pos / self.rate, arrived - s.opened)
        if why is not None and s.name in self.sessions:
            out += self._fail(s, why)
        return out

    def _deliver(self, s: _Session, msg: Message) -> list[Item]:
        started, s.started = s.started, True
        if msg.kind == CONTROL:
            kind, task, options = msg.control["type"], msg.control.get("task"), msg.control.get("options", {})
            if kind == "stop":
                self.completed += s.pos > 0  # an empty session is an error, not a completed one
                return self._end(s)
            if kind == "start" and started:
                return self._fail(s, f"control message {msg.seq}: \"start\" must be the session's first message (use \"task\" to switch)")
            if task is not None:
                try:
                    load_task(task).resolve_options(options)
                except ValueError as e:  # UnknownTask too
                    return self._fail(s, f"control message {msg.seq}: {e}")
            return [Control(s.name, kind, task, dict(options))]
        if s.rate is None:
            s.rate = msg.sample_rate
            if s.rate != self.rate:
                s.resampler = soxr.ResampleStream(s.rate, self.rate, 1, dtype="float32", quality="HQ")
        elif msg.sample_rate != s.rate:
            return self._fail(s, f"audio message {msg.seq}: sample rate changed from {s.rate} to {msg.sample_rate} Hz mid-session")
        x = msg.samples if s.resampler is None else s.resampler.resample_chunk(msg.samples)
        if not len(x):
            return []
        chunk = AudioChunk(s.name, msg.seq, torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), s.pos, time.monotonic())
        s.pos += len(x)
        return [chunk]

    def _close(self, s: _Session) -> None:
        self.sessions.pop(s.name, None)
        self.ended[s.name] = _Ended(s.newest, time.monotonic() + self.idle_timeout, s.first)
        self.ended.move_to_end(s.name)
        while len(self.ended) > 4096:
            self.ended.popitem(last=False)

    def _end(self, s: _Session) -> list[Item]:
        out: list[Item] = []
        if s.resampler is not None:
            tail = s.resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            if len(tail):
                out.append(AudioChunk(s.name, -1, torch.from_numpy(np.ascontiguousarray(tail)), s.pos, time.monotonic()))
                s.pos += len(tail)
        out.append(End(s.name, s.pos, time.monotonic()))
        self._close(s)
        return out

    def _fail(self, s: _Session, why: str) -> list[Item]:
        """End a live session with an error (then its End)."""
        self._close(s)
        return [SessionError(s.name, why), End(s.name, s.pos, time.monotonic())]

    def _expire_idle(self, now: float) -> list[Item]:
        while self.ended and next(iter(self.ended.values())).until < now:  # oldest first: `until` grows with insertion
            self.ended.popitem(last=False)
        out: list[Item] = []
        for s in [s for s in self.sessions.values() if s.deadline <= now]:
            missing = f"; never arrived: {s.order.missing()}" if s.order.waiting else ""
            why = f"no message for {self.idle_timeout:.0f} s and no stop{missing}: the session is ended"
            log.warning("session %s: %s", s.name, why)
            out += self._fail(s, why)
        return out


class MqttSink:
    """Publishes each session's reply stream: {"type": "start"}, its audio (PCM16 at the pipeline
    rate), then {"type": "end"} or an error and the end."""

    def __init__(self, link: MqttLink, topic: str, sample_rate: int):
        self.link, self.topic, self.rate = link, topic, sample_rate
        self.replies = ReplyPublisher(link, topic, sample_rate)  # keeps nothing per session once it ended

    async def write(self, item: Item) -> None:
        if isinstance(item, AudioOut):
            await self.replies.send(item.session, item.samples.numpy())
        elif isinstance(item, End):
            await self.replies.send(item.session, {"type": "end"})
            self.replies.finish(item.session)
        elif isinstance(item, SessionError):
            await self.replies.send(item.session, {"type": "error", "message": item.message})

    async def close(self) -> None:
        await self.link.close()


class Reply:
    """One session's reply stream as a client receives it: feed it every decoded message from the
    session's output topic. It follows the stream that the first {"type": "start"} opens, drops
    repeats and messages of other streams (another server run, an earlier session of the same id),
    and says what was lost: `missing` lists positions (1 = the first message after the start) that
    never arrived before the end."""

    def __init__(self):
        self.first: int | None = None
        self.messages: dict[int, Message] = {}  # by position after the start
        self.early: list[Message] = []  # arrived before the start
        self.end: int | None = None

    def add(self, msg: Message) -> bool:
        """Take one message; True once the stream's end has arrived."""
        if self.first is None:
            if msg.kind == CONTROL and msg.control["type"] == "start":
                self.first = msg.seq
                for m in self.early:
                    self.add(m)
                self.early = []
            else:
                self.early.append(msg)
            return self.done
        i = (msg.seq - self.first) % SEQ_MOD
        if not 1 <= i <= max(self.messages, default=0) + 4096 or i in self.messages:
            return self.done  # a repeat, or another stream (they start 2^31 apart on average)
        self.messages[i] = msg
        if msg.kind == CONTROL and msg.control["type"] == "end":
            self.end = i
        return self.done

    @property
    def done(self) -> bool:
        return self.end is not None

    @property
    def missing(self) -> list[int]:
        last = self.end if self.end is not None else max(self.messages, default=0)
        return [i for i in range(1, last) if i not in self.messages]

    @property
    def control(self) -> list[dict]:
        return [self.messages[i].control for i in sorted(self.messages) if self.messages[i].kind == CONTROL]

    @property
    def error(self) -> str | None:
        return next((c["message"] for c in self.control if c["type"] == "error"), None)

    def audio(self) -> np.ndarray:
        parts = [self.messages[i].samples for i in sorted(self.messages) if self.messages[i].kind == AUDIO]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def tls_context(ca: str | None = None, cert: str | None = None, key: str | None = None, insecure: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
