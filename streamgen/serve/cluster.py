"""Scale-out over an MQTT 5 broker: many `streamgen serve --mqtt URL` workers share the sessions.

Topics under the URL's PREFIX (every message in the wire format of `streamgen.io.mqtt`):

    PREFIX/start                   client -> a worker: control {"type": "start", "task": ..., "options": {...}}
                                   for a new session id (seq 0). Workers read it through the shared
                                   subscription $share/streamgen/PREFIX/start, so one worker gets each.
    PREFIX/sessions/ID/out         worker -> client: control {"type": "claimed", "worker": W} (seq 0), then
                                   audio (PCM16 at the bundle rate), {"type": "stats"}, {"type": "error"}, {"type": "end"}
    PREFIX/sessions/ID/in          client -> the claiming worker, after "claimed": audio from seq 1, then {"type": "stop"}
    PREFIX/workers/W               retained worker status {"worker": W, "status": "online" | "offline", "reason": ...};
                                   the broker publishes "offline" as the worker's will when its connection dies

A client subscribes to its out topic, publishes the start, waits for "claimed" (no claim within a
few seconds: every worker is busy or none runs; retry with a new session id), subscribes to the
claiming worker's status topic, then streams. "offline" from that worker ends the session with an
error. A worker at capacity unsubscribes from the shared start topic, so the broker hands new
sessions to the others; a start that reaches it anyway is published again for them (at most
`MAX_HOPS` times, counted in an MQTT 5 user property; then the client is told every worker is busy).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import soxr
import torch

from ..io.mqtt import (AUDIO, CONTROL, MAX_MESSAGE_BYTES, GapError, Reorder, WireError, check_input_control, decode, encode_audio, encode_control, parse_url,
                       tls_context)
from ..pipeline.items import AudioChunk, Control, End
from ..pipeline.tasks import load_task
from . import ServeError
from .hub import Hub

log = logging.getLogger("streamgen.cluster")
GROUP = "streamgen"
MAX_HOPS = 3
REORDER_WINDOW = 64  # a session's messages that may wait for an earlier one (as `streamgen run`'s MQTT source)
REORDER_BYTES = 8 << 20  # and their bytes
MAX_OUTBOX = 4096  # output messages waiting for the broker, all sessions; past it a session's audio ends it
PUBLISHERS = 4  # publishes in flight at once (each QoS 1 publish waits for its acknowledgement)
MAX_PACKET = MAX_MESSAGE_BYTES + 64 * 1024  # a wire message at most, with the MQTT packet's topic and properties
HOPS = "streamgen-hops"  # MQTT 5 user property: how often busy workers have passed a start on


def _hops(msg) -> int:
    """How often busy workers have passed a start on (a client's own value: anything but a small
    decimal number counts as none)."""
    for key, value in getattr(msg.properties, "UserProperty", None) or []:
        if key == HOPS and isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 3:
            return int(value)
    return 0


@dataclass
class ClusterOptions:
    host: str
    port: int
    prefix: str
    worker_id: str
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None
    qos: int = 1
    # messages the client library holds while the worker is behind (its engine's inbox full): past these the
    # library discards what comes, so a flood cannot grow the worker's memory. Nothing is lost unnamed: a session
    # whose audio was discarded ends naming the missing messages (its Reorder), a discarded start is the client's
    # claim timeout, a discarded stop ends the session by the idle timeout.
    max_backlog: int = 8192

    @classmethod
    def from_url(cls, url: str, worker_id: str | None = None, username: str | None = None, password: str | None = None,
                 ca: str | None = None, cert: str | None = None, key: str | None = None) -> ClusterOptions:
        ep = parse_url(url)
        prefix = ep.topic.strip("/")
        if any(c in prefix for c in "+#") or prefix.startswith("$"):
            raise ValueError(f"--mqtt {url!r}: the topic prefix may not contain + or # or start with $")
        worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        if not worker_id or any(c in worker_id for c in "/+#"):
            raise ValueError(f"--worker-id {worker_id!r}: must be non-empty without / + #")
        ctx = tls_context(ca, cert, key) if (ep.tls or ca) else None
        return cls(ep.host, ep.port, prefix, worker_id, ep.username or username, ep.password or password, ctx)

    def topic(self, kind: str, name: str = "") -> str:
        return {"start": f"{self.prefix}/start", "in": f"{self.prefix}/sessions/{name}/in",
                "out": f"{self.prefix}/sessions/{name}/out", "worker": f"{self.prefix}/workers/{name}"}[kind]


def status_payload(worker: str, status: str, reason: str = "") -> bytes:
    return json.dumps({"worker": worker, "status": status, "reason": reason}).encode()


class _Session:
    """One claimed session's input: ordered by sequence number, resampled to the engine's rate."""

    def __init__(self, name: str, hub_id: str):
        self.name, self.hub_id = name, hub_id
        self.order = Reorder(REORDER_WINDOW, REORDER_BYTES, expected=1)  # seq 0 was the start
        self.rate: int | None = None
        self.resampler = None
        self.pos = 0
        self.out_seq = 0
        self.overflowed = False  # its output outran the broker: the session was ended


class ClusterLink:
    """A worker's MQTT side: claims sessions from the shared start topic and feeds them to the hub."""

    def __init__(self, hub: Hub, opts: ClusterOptions, default_task: str = "continuation", default_options: dict | None = None):
        self.hub, self.o = hub, opts
        self.default = (default_task, default_options or {})
        self.rate = hub.stats.sample_rate
        self.sessions: dict[str, _Session] = {}  # by client session id
        self.outbox: asyncio.Queue[tuple[str, bytes, bool, int]] = asyncio.Queue()
        self.client = None
        self.connected = asyncio.Event()
        self.sharing = False  # subscribed to the shared start topic
        self.accepting = True
        self.tasks: list[asyncio.Task] = []
        self.last_error: str | None = None

    def describe(self) -> str:
        return (f"mqtt://{self.o.host}:{self.o.port}/{self.o.prefix} as worker {self.o.worker_id} "
                f"(claims from $share/{GROUP}/{self.o.topic('start')})")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._run())]
        try:
            await asyncio.wait_for(self.connected.wait(), timeout=10)
        except TimeoutError:
            for t in self.tasks:
                t.cancel()
            raise ServeError(f"--mqtt: no connection to {self.o.host}:{self.o.port} within 10 s ({self.last_error or 'no answer'}); "
                             "check the address, --mqtt-username and $STREAMGEN_MQTT_PASSWORD") from None

    async def _run(self) -> None:
        import aiomqtt
        from paho.mqtt.properties import Properties
        from paho.mqtt.packettypes import PacketTypes

        delay = 0.2
        while True:
            will = aiomqtt.Will(self.o.topic("worker", self.o.worker_id), status_payload(self.o.worker_id, "offline", "its connection to the broker was lost"),
                                qos=1, retain=True)
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0  # its subscriptions (the shared one too) die with it
            props.MaximumPacketSize = MAX_PACKET  # the broker drops larger messages instead of handing them over
            try:
                async with aiomqtt.Client(self.o.host, self.o.port, username=self.o.username, password=self.o.password,
                                          identifier=f"streamgen-worker-{self.o.worker_id}", protocol=aiomqtt.ProtocolVersion.V5,
                                          will=will, clean_start=True, properties=props, tls_context=self.o.tls, timeout=10,
                                          keepalive=10, max_queued_incoming_messages=self.o.max_backlog) as client:
                    self.client, self.sharing, delay = client, False, 0.2
                    await client.publish(self.o.topic("worker", self.o.worker_id), status_payload(self.o.worker_id, "online"), qos=1, retain=True)
                    await self.update_share()
                    self.connected.set()
                    # several publishes in flight: each hands its message to the client library before its first
                    # wait, so they leave in the outbox's order
                    publishers = [asyncio.get_running_loop().create_task(self._publish(client)) for _ in range(PUBLISHERS)]
                    try:
                        async for msg in client.messages:
                            try:
                                await self._on_message(str(msg.topic), bytes(msg.payload), _hops(msg))
                            except aiomqtt.MqttError:
                                raise
                            except Exception as e:  # a bug: its session ends saying so, never the worker's link
                                log.exception("a message on %s could not be handled", msg.topic)
                                await self._refuse(str(msg.topic), f"internal error on this message ({type(e).__name__}); the session is ended")
                    finally:
                        for t in publishers:
                            t.cancel()
            except aiomqtt.MqttError as e:
                self.last_error = str(e)
                log.warning("MQTT link to %s:%d lost or refused (%s); retrying in %.1f s", self.o.host, self.o.port, e, delay)
            finally:
                self.connected.clear()
                self.client = None
            for s in list(self.sessions.values()):  # their clients were told by the will; free the engine
                await self.hub.abort(s.hub_id, "the worker lost its broker connection")
                self.hub.detach(s.hub_id)
            self.sessions.clear()
            await asyncio.sleep(delay)
            delay = min(2 * delay, 5.0)

    async def _publish(self, client) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        while True:
            topic, payload, retain, hops = await self.outbox.get()
            props = None
            if hops:
                props = Properties(PacketTypes.PUBLISH)
                props.UserProperty = [(HOPS, str(hops))]
            await client.publish(topic, payload, qos=self.o.qos, retain=retain, properties=props)
            self.outbox.task_done()

    def _send(self, topic: str, payload: bytes, retain: bool = False, hops: int = 0) -> None:
        self.outbox.put_nowait((topic, payload, retain, hops))

    async def update_share(self) -> None:
        """Take new sessions only while there is room (and the server is not draining)."""
        client = self.client
        if client is None:
            return
        want = self.accepting and self.hub.accepting and not self.hub.full
        if want and not self.sharing:
            self.sharing = True
            await client.subscribe(f"$share/{GROUP}/{self.o.topic('start')}", qos=self.o.qos)
        elif not want and self.sharing:
            self.sharing = False
            await client.unsubscribe(f"$share/{GROUP}/{self.o.topic('start')}")

    def tick(self) -> None:
        asyncio.get_running_loop().create_task(self.update_share())

    def draining(self) -> None:
        self.accepting = False
        self.tick()

    async def stop(self) -> None:
        """After the engine stopped: say so on the status topic, send what is queued, disconnect."""
        if self.client is not None:
            self._send(self.o.topic("worker", self.o.worker_id), status_payload(self.o.worker_id, "offline", "the worker shut down"), retain=True)
            try:
                await asyncio.wait_for(self.outbox.join(), timeout=5)
            except TimeoutError:
                log.warning("MQTT: %d messages not sent at shutdown", self.outbox.qsize())
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    # -- incoming --------------------------------------------------------------------------------
    async def _on_message(self, topic: str, data: bytes, hops: int = 0) -> None:
        if topic == self.o.topic("start"):
            await self._claim(data, hops)
            return
        try:
            msg = decode(data)
        except WireError as e:
            await self._refuse(topic, f"malformed message on {topic}: {e}")
            return
        s = self.sessions.get(msg.session)
        if s is None or topic != self.o.topic("in", msg.session):
            await self._refuse(topic, f"message {msg.seq} on {topic} names session {msg.session!r}: "
                                      "a message speaks only for its topic's session")
            return
        try:
            ready = s.order.accept(msg)  # none for a QoS 1 repeat
        except GapError as e:  # a hole no waiting fills: the session ends with it named, nothing is skipped
            self.hub.metrics.protocol_errors.labels(via="mqtt").inc()
            await self.hub.abort(s.hub_id, str(e))
            return
        for m in ready:
            await self._deliver(s, m)

    async def _refuse(self, topic: str, why: str) -> None:
        """A message on a live session's input topic that is not that session's: the session ends with
        why (nothing it sent is skipped silently). On a topic no live session here owns (a session that
        ended, whose late messages the broker still delivers), it is dropped."""
        owner = next((s for name, s in self.sessions.items() if self.o.topic("in", name) == topic), None)
        if owner is not None:
            self.hub.metrics.protocol_errors.labels(via="mqtt").inc()
            await self.hub.abort(owner.hub_id, why)

    async def _claim(self, data: bytes, hops: int) -> None:
        try:
            msg = decode(data)
            if msg.kind != CONTROL or msg.control.get("type") != "start":
                raise WireError('a message on the start topic must be a control message {"type": "start", ...}', msg.session)
            check_input_control(msg)
        except WireError as e:
            self.hub.metrics.protocol_errors.labels(via="mqtt").inc()
            if e.session:
                self._reply(e.session, {"type": "error", "message": f"malformed start: {e}"}, 0)
                self._reply(e.session, {"type": "end"}, 1)
            return
        name, body = msg.session, msg.control
        if name in self.sessions:
            return  # a QoS 1 repeat of a start this worker holds
        if self.hub.full or not self.hub.accepting or not self.accepting:
            if hops + 1 > MAX_HOPS:
                self.hub.metrics.refused.labels(reason="capacity").inc()
                self._reply(name, {"type": "error", "message": "every worker is at capacity; retry later with a new session id"}, 0)
                self._reply(name, {"type": "end"}, 1)
            else:  # leave it to the others
                self._send(self.o.topic("start"), data, hops=hops + 1)
            await self.update_share()
            return
        task, options = body.get("task"), body.get("options") or {}
        if not task:
            task, options = self.default[0], {**self.default[1], **options}
        try:
            load_task(task).resolve_options(options)
        except ValueError as e:
            self._reply(name, {"type": "error", "message": str(e)}, 0)
            self._reply(name, {"type": "end"}, 1)
            return
        hub_id = f"mqtt/{name}"
        s = _Session(name, hub_id)
        why = self.hub.open(hub_id, _Route(self, s), "mqtt")
        if why is not None:
            self._reply(name, {"type": "error", "message": why}, 0)
            self._reply(name, {"type": "end"}, 1)
            return
        self.sessions[name] = s
        await self.client.subscribe(self.o.topic("in", name), qos=self.o.qos)
        s.out_seq = 1
        self._reply(name, {"type": "claimed", "worker": self.o.worker_id}, 0)
        await self.hub.put(Control(hub_id, "start", task, options))
        await self.update_share()

    def _reply(self, name: str, body: dict, seq: int) -> None:
        self._send(self.o.topic("out", name), encode_control(name, seq, body))

    async def _deliver(self, s: _Session, msg) -> None:
        if msg.kind == CONTROL:
            try:
                check_input_control(msg)
            except WireError as e:
                self.hub.metrics.protocol_errors.labels(via="mqtt").inc()
                await self.hub.abort(s.hub_id, str(e))
                return
            if msg.control.get("type") == "stop":
                if s.resampler is not None:
                    await self._audio(s, msg.seq, s.resampler.resample_chunk(np.zeros(0, np.float32), last=True))
                await self.hub.put(End(s.hub_id, s.pos, time.monotonic()))
            else:
                self.hub.metrics.protocol_errors.labels(via="mqtt").inc()
                await self.hub.abort(s.hub_id, f"control message {msg.seq}: only {{\"type\": \"stop\"}} is taken on a session's in topic, got {msg.control['type']!r}")
            return
        if s.rate is None:
            s.rate = msg.sample_rate
            if s.rate != self.rate:
                s.resampler = soxr.ResampleStream(s.rate, self.rate, 1, dtype="float32", quality="HQ")
        elif msg.sample_rate != s.rate:
            await self.hub.abort(s.hub_id, f"audio message {msg.seq}: sample rate changed from {s.rate} to {msg.sample_rate} Hz mid-session")
            return
        await self._audio(s, msg.seq, msg.samples if s.resampler is None else s.resampler.resample_chunk(msg.samples))

    async def _audio(self, s: _Session, seq: int, x: np.ndarray) -> None:
        if len(x):
            await self.hub.put(AudioChunk(s.hub_id, seq, torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), s.pos, time.monotonic()))
            s.pos += len(x)

    def _ended(self, s: _Session) -> None:
        self.sessions.pop(s.name, None)
        client = self.client
        if client is not None:
            loop = asyncio.get_running_loop()
            loop.create_task(client.unsubscribe(self.o.topic("in", s.name)))
            loop.create_task(self.update_share())


class _Route:
    """Output of one MQTT session, published in order on its out topic."""

    def __init__(self, link: ClusterLink, s: _Session):
        self.link, self.s = link, s

    def audio(self, session: str, samples: torch.Tensor) -> None:
        if self.s.overflowed:
            return  # ended for it (its client hears why)
        if self.link.outbox.qsize() >= MAX_OUTBOX:  # the broker takes output slower than it is made: end, never grow
            self.s.overflowed = True
            asyncio.get_running_loop().create_task(self.link.hub.abort(
                self.s.hub_id, f"the broker takes this worker's output slower than it is made ({MAX_OUTBOX} messages "
                               "waiting); the session is ended: retry later or on another worker"))
            return
        self.link._send(self.link.o.topic("out", self.s.name), encode_audio(self.s.name, self._seq(), samples.numpy(), self.link.rate))

    def control(self, session: str, body: dict) -> None:
        if body.get("type") == "stats" and "session" in body:
            body = {**body, "session": self.s.name}
        self.link._send(self.link.o.topic("out", self.s.name), encode_control(self.s.name, self._seq(), body))

    def ended(self, session: str) -> None:
        self.link._ended(self.s)

    def _seq(self) -> int:
        n = self.s.out_seq
        self.s.out_seq += 1
        return n


# -- the client side, for programs and tests ------------------------------------------------------
@dataclass
class ClusterReply:
    worker: str | None
    audio: np.ndarray  # int16 PCM as sent
    messages: list[dict]  # control messages after "claimed", in order

    @property
    def error(self) -> str | None:
        return next((m["message"] for m in self.messages if m["type"] == "error"), None)


async def cluster_session(host: str, port: int, prefix: str, session: str, wave: np.ndarray, sample_rate: int,
                          task: str | None = None, options: dict | None = None, block: int = 320, realtime: bool = False,
                          claim_timeout: float = 5.0, on_claimed: Callable[[str], Awaitable[None]] | None = None,
                          on_audio: Callable[[int, np.ndarray], None] | None = None,
                          username: str | None = None, password: str | None = None,
                          tls_context: ssl.SSLContext | None = None) -> ClusterReply:
    """Run one session through a cluster: start, wait for the claim, stream `wave` (float32), stop,
    collect the reply until its end, or until the claiming worker goes offline (then an error).
    With `realtime`, each block is sent when its last sample would have been captured (a live
    talker); `on_audio(seq, samples)` sees each audio message as it arrives (to play it, or time it)."""
    import aiomqtt

    o = ClusterOptions("", 0, prefix, "client")
    out_topic = o.topic("out", session)
    body = {"type": "start", **({"task": task} if task else {}), "options": options or {}}
    async with aiomqtt.Client(host, port, username=username, password=password, protocol=aiomqtt.ProtocolVersion.V5,
                              identifier=f"streamgen-client-{session}", tls_context=tls_context, timeout=10) as client:
        await client.subscribe(out_topic, qos=1)
        await client.publish(o.topic("start"), encode_control(session, 0, body), qos=1)
        messages = client.messages
        worker, audio, controls = None, {}, []

        async def next_message(timeout):
            m = await asyncio.wait_for(anext(messages), timeout)
            return str(m.topic), bytes(m.payload)

        try:
            while worker is None:
                topic, data = await next_message(claim_timeout)
                msg = decode(data)
                if msg.kind == CONTROL and msg.control["type"] == "claimed":
                    worker = msg.control["worker"]
                elif msg.kind == CONTROL and msg.control["type"] in ("error", "end"):
                    controls.append(msg.control)
                    if msg.control["type"] == "end":
                        return ClusterReply(None, np.zeros(0, np.int16), controls)
        except TimeoutError:
            return ClusterReply(None, np.zeros(0, np.int16), [{"type": "error", "message": f"no worker claimed session {session} within {claim_timeout:.0f} s"}])
        status_topic = o.topic("worker", worker)
        await client.subscribe(status_topic, qos=1)
        if on_claimed is not None:
            await on_claimed(worker)

        async def send():
            seq = 1
            t0 = time.monotonic()
            for i in range(0, len(wave), block):
                piece = wave[i : i + block]
                if realtime:
                    await asyncio.sleep(max(0.0, t0 + (i + len(piece)) / sample_rate - time.monotonic()))
                await client.publish(o.topic("in", session), encode_audio(session, seq, piece, sample_rate), qos=1)
                seq += 1
            await client.publish(o.topic("in", session), encode_control(session, seq, {"type": "stop"}), qos=1)

        sender = asyncio.get_running_loop().create_task(send())
        try:
            while True:
                topic, data = await next_message(120)
                if topic == status_topic:
                    st = json.loads(data)
                    if st.get("status") == "offline":
                        controls.append({"type": "error", "message": f"worker {worker} went offline ({st.get('reason')}); session {session} is lost"})
                        break
                    continue
                msg = decode(data)
                if msg.kind == AUDIO:
                    audio[msg.seq] = msg.samples
                    if on_audio is not None:
                        on_audio(msg.seq, msg.samples)
                elif msg.control["type"] != "claimed":
                    controls.append(msg.control)
                    if msg.control["type"] == "end":
                        break
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
    pcm = np.concatenate([audio[k] for k in sorted(audio)]) if audio else np.zeros(0, np.float32)
    return ClusterReply(worker, (pcm * 32768).round().astype(np.int16), controls)
