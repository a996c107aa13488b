"""Scale-out: `streamgen serve --mqtt` workers behind one real Mosquitto (with authentication) share
sessions through an MQTT 5 shared subscription. One worker is killed mid-run: its sessions get a
clear error from its will, the others finish unaffected, new sessions go to the survivors. A worker
at capacity leaves new sessions to the others."""

import asyncio
import contextlib
import signal
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serve_helpers import ServeProcess
from services import Mosquitto
from speech import espeak

from streamgen.testing import random_bundle

pytest.importorskip("starlette")
from streamgen.serve.cluster import cluster_session  # noqa: E402

USERS = {"worker": "worker-secret-1", "client": "client-secret-2"}
PREFIX = "sg"
ACL = f"""user worker
topic readwrite {PREFIX}/start
topic read {PREFIX}/sessions/+/in
topic write {PREFIX}/sessions/+/out
topic write {PREFIX}/workers/+

user client
topic write {PREFIX}/start
topic write {PREFIX}/sessions/+/in
topic read {PREFIX}/sessions/+/out
topic read {PREFIX}/workers/+
"""  # the ACL docs/deploy.md shows


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    random_bundle(seed=1).save(d)
    return d


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path, users=USERS, acl=ACL)
    b.start()
    yield b
    b.stop()


def workers(bundle_dir, broker, names: list[str], max_sessions: int) -> list[ServeProcess]:
    def start(name):
        return ServeProcess("--bundle", str(bundle_dir), "--task", "resynthesis", "--status-every", "0",
                            "--mqtt", f"mqtt://127.0.0.1:{broker.port}/{PREFIX}", "--mqtt-username", "worker",
                            "--worker-id", name, "--max-sessions", str(max_sessions),
                            env={"STREAMGEN_MQTT_PASSWORD": USERS["worker"]})

    with ThreadPoolExecutor(len(names)) as ex:
        return list(ex.map(start, names))


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to PCM16 rounding of float noise (batched rows equal a session alone to float rounding)."""
    return len(a) == len(b) and int(np.abs(a.astype(np.int32) - b).max()) <= 1


def session(broker, name: str, wave: np.ndarray, **kw):
    return cluster_session("127.0.0.1", broker.port, PREFIX, name, wave, 16000, username="client", password=USERS["client"], **kw)


async def test_sessions_spread_a_killed_worker_fails_only_its_own(bundle_dir, broker):
    ws = workers(bundle_dir, broker, ["w0", "w1", "w2"], max_sessions=10)
    try:
        assert all(f"as worker w{i}" in "\n".join(w.lines) for i, w in enumerate(ws))
        waves = [np.tile(espeak(t).numpy(), 2) for t in ("the quick brown fox jumps", "seven boats in the harbour")]
        heard: list[list] = [[], []]
        refs = [await session(broker, f"ref-{i}", w, on_audio=lambda seq, x, i=i: heard[i].append((seq, x)))
                for i, w in enumerate(waves)]
        for r, pieces in zip(refs, heard):
            assert r.error is None and r.messages[-1]["type"] == "end" and len(r.audio) > 1600
            # each audio message was handed on as it came, in order: together, the whole reply
            assert [seq for seq, _ in pieces] == sorted(seq for seq, _ in pieces) and len(pieces) > 1
            assert same((np.concatenate([x for _, x in pieces]) * 32768).round().astype(np.int16), r.audio)

        claims: dict[str, str] = {}
        all_claimed = asyncio.Event()

        def on_claimed(name):
            async def note(worker):
                claims[name] = worker
                if len(claims) == 20:
                    all_claimed.set()
            return note

        runs = [asyncio.ensure_future(session(broker, f"run-{i}", waves[i % 2], realtime=True, on_claimed=on_claimed(f"run-{i}")))
                for i in range(20)]
        await asyncio.wait_for(all_claimed.wait(), 30)
        assert set(claims.values()) == {"w0", "w1", "w2"}, claims  # spread over every worker
        ws[0].proc.send_signal(signal.SIGKILL)  # mid-run: every session is still streaming
        replies = await asyncio.gather(*runs)
        for i, r in enumerate(replies):
            if claims[f"run-{i}"] == "w0":
                assert r.error is not None and "worker w0 went offline" in r.error, r.messages
            else:
                assert r.error is None, r.messages
                assert r.messages[-1]["type"] == "end"
                assert same(r.audio, refs[i % 2].audio)  # unaffected: what it gets alone
        assert sum(c == "w0" for c in claims.values()) >= 1

        after = await asyncio.gather(*(session(broker, f"after-{i}", waves[i % 2]) for i in range(4)))
        for i, r in enumerate(after):
            assert r.worker in ("w1", "w2") and r.error is None
            assert same(r.audio, refs[i % 2].audio)
        for w in ws[1:]:
            m = w.metrics()
            assert m[("streamgen_live_sessions", ())] == 0
            assert m[("streamgen_sessions_started_total", (("via", "mqtt"),))] >= 1
    finally:
        for w in ws:
            w.stop()


async def test_a_full_worker_leaves_new_sessions_to_the_others(bundle_dir, broker):
    ws = workers(bundle_dir, broker, ["a", "b"], max_sessions=1)
    try:
        long = np.tile(espeak("a long sentence to keep the worker busy").numpy(), 2)
        first = asyncio.ensure_future(session(broker, "long-0", long, realtime=True))
        await asyncio.sleep(0.5)
        second = asyncio.ensure_future(session(broker, "long-1", long, realtime=True))
        await asyncio.sleep(0.5)
        third = await session(broker, "extra", long[:16000], claim_timeout=2)
        assert third.worker is None and third.error is not None  # every worker is busy: nobody claims it
        r0, r1 = await asyncio.gather(first, second)
        assert {r0.worker, r1.worker} == {"a", "b"}  # the second went to the worker with room
        assert r0.error is None and r1.error is None
        later = await session(broker, "later", long[:16000])
        assert later.worker in ("a", "b") and later.error is None
        # a graceful stop says so on the status topic: no session is left hanging
        ws[0].signal()
        assert ws[0].wait() == 0
        again = await session(broker, "again", long[:16000])
        assert again.worker == "b" and again.error is None
    finally:
        for w in ws:
            w.stop()


async def test_input_that_skips_far_ahead_ends_its_session_with_the_gap_named_and_the_worker_serves_on(bundle_dir, broker):
    """A client's own in topic with sequence numbers far ahead of the next one (a broken or hostile
    client; the field is 32 bits): its session ends with an error naming the missing messages, nothing is
    skipped over, and the worker goes on serving (it used to step over the gap one number at a time on
    its event loop: hours for 2**32)."""
    import aiomqtt

    from streamgen.io.mqtt import encode_audio
    from streamgen.serve.cluster import ClusterOptions

    ws = workers(bundle_dir, broker, ["w"], max_sessions=4)
    try:
        wave = espeak("seven boats in the harbour").numpy()

        async def hostile(worker):
            async with aiomqtt.Client("127.0.0.1", broker.port, username="client", password=USERS["client"],
                                      protocol=aiomqtt.ProtocolVersion.V5) as c:
                for k in range(65):
                    data = encode_audio("gap", 2**32 - 100 + k, np.zeros(16, np.float32), 16000)
                    await c.publish(ClusterOptions("", 0, PREFIX, "client").topic("in", "gap"), data, qos=1)

        r = await session(broker, "gap", wave, on_claimed=hostile)
        assert r.error is not None and "is still missing: more than the reorder window of 64 messages apart" in r.error, r.messages
        assert "never arrived: 1-" in r.error and r.messages[-1]["type"] == "end"
        after = await session(broker, "after", wave)
        assert after.worker == "w" and after.error is None and len(after.audio) > 1600
        assert ws[0].metrics()[("streamgen_protocol_errors_total", (("via", "mqtt"),))] >= 1
    finally:
        for w in ws:
            w.stop()


@contextlib.asynccontextmanager
async def worker_in_process(broker, name: str, inbox_size: int, **options):
    """A cluster worker's MQTT side in this process, its hub's inbox read by the test (no engine), and a
    client of the broker: (hub, options, client)."""
    import aiomqtt

    from streamgen.pipeline.stats import Stats
    from streamgen.serve.cluster import ClusterLink, ClusterOptions
    from streamgen.serve.hub import Hub
    from streamgen.serve.metrics import ServeMetrics

    hub = Hub(Stats(16000), ServeMetrics(), inbox_size=inbox_size)
    opts = ClusterOptions("127.0.0.1", broker.port, PREFIX, name, "worker", USERS["worker"], **options)
    link = ClusterLink(hub, opts, "resynthesis")
    await link.start()
    await link.update_share()
    try:
        async with aiomqtt.Client("127.0.0.1", broker.port, username="client", password=USERS["client"],
                                  protocol=aiomqtt.ProtocolVersion.V5) as c:
            yield link, hub, opts, c
    finally:
        await link.stop()


async def until_claimed(c, worker: str, names: set[str]) -> None:
    """Read the client's messages until `worker` has claimed every session in `names`."""
    from streamgen.io.mqtt import decode

    claimed = set()
    async with asyncio.timeout(10):
        async for m in c.messages:
            msg = decode(bytes(m.payload))
            if msg.control == {"type": "claimed", "worker": worker}:
                claimed.add(msg.session)
            if claimed >= names:
                return


async def test_a_worker_that_is_behind_holds_a_bounded_backlog_and_names_what_it_discarded(broker):
    """The engine's inbox full (here: nobody reads it), a worker's message loop waits, and what the broker
    delivers meanwhile waited in the client library's queue without bound: a flood grew the worker's memory.
    Now at most `max_backlog` wait; the rest is discarded, and the session whose audio was discarded ends with
    the missing messages named (nothing is skipped silently)."""
    from streamgen.io.mqtt import encode_audio, encode_control
    from streamgen.pipeline.items import AudioChunk, Control, SessionError

    async with worker_in_process(broker, "behind", 1, max_backlog=16) as (link, hub, opts, c):
        await c.subscribe(opts.topic("out", "flood"), qos=1)
        await c.publish(opts.topic("start"), encode_control("flood", 0, {"type": "start", "task": "resynthesis"}), qos=1)
        await until_claimed(c, "behind", {"flood"})
        for seq in range(1, 301):
            await c.publish(opts.topic("in", "flood"), encode_audio("flood", seq, np.zeros(320, np.float32), 16000), qos=1)
        await asyncio.sleep(1.0)  # all delivered: the worker waits on its second chunk, the rest queued or discarded
        assert link.client._queue.qsize() <= 16
        got = []
        async with asyncio.timeout(10):
            while len(got) < 16:
                got.append(await hub.inbox.get())
        await c.publish(opts.topic("in", "flood"), encode_audio("flood", 301, np.zeros(320, np.float32), 16000), qos=1)
        async with asyncio.timeout(10):
            while not isinstance(got[-1], SessionError):
                got.append(await hub.inbox.get())
        assert isinstance(got[0], Control) and all(isinstance(i, AudioChunk) for i in got[1:-1])
        assert len(got) - 2 < 300 and "never arrived" in got[-1].message, got[-1]


async def test_a_start_with_a_hop_count_that_is_no_number_is_served_and_the_worker_goes_on(broker):
    """The hop count busy workers add to a start they pass on is a client's user property like any other:
    one that `str.isdigit` takes but `int` does not ('²'), or a number of thousands of digits, once
    ended the worker's MQTT loop for good (its sessions unheard, its status still "online"). Such a
    value counts as no hops; the start is claimed, and so is the next. And a start of megabytes never
    reaches a worker."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from streamgen.io.mqtt import encode_control
    from streamgen.serve.cluster import HOPS

    async with worker_in_process(broker, "w1", 16) as (link, hub, opts, c):
        names = ["superscript", "long", "plain"]
        for name in names:
            await c.subscribe(opts.topic("out", name), qos=1)
        # a start too large for any wire message: the broker drops it (the worker's packet size limit)
        # instead of handing the worker megabytes to read and refuse
        await c.publish(opts.topic("start"), encode_control("huge", 0, {"type": "start", "pad": "x" * (3 << 20)}), qos=1)
        for name, hops in zip(names, ["\u00b2", "9" * 5000, None]):
            props = None
            if hops is not None:
                props = Properties(PacketTypes.PUBLISH)
                props.UserProperty = [(HOPS, hops)]
            await c.publish(opts.topic("start"), encode_control(name, 0, {"type": "start", "task": "resynthesis"}),
                            qos=1, properties=props)
        await until_claimed(c, "w1", set(names))
        assert not link.tasks[0].done()
        assert hub.metrics.protocol_errors.labels(via="mqtt")._value.get() == 0  # the huge start never reached it


async def test_a_message_on_a_sessions_topic_that_is_not_that_sessions_ends_it_with_the_reason(broker):
    """A worker reads each live session's input topic: a message there whose header names another session,
    or that cannot be read at all with an unreadable id, was dropped without a word (the client waited on
    audio that would never come). The topic's session now ends with what was wrong, as `run`'s MQTT source
    does."""
    from streamgen.io.mqtt import encode_audio, encode_control
    from streamgen.pipeline.items import SessionError

    async with worker_in_process(broker, "w1", 64) as (link, hub, opts, c):
        for name in ("alice", "carol"):
            await c.subscribe(opts.topic("out", name), qos=1)
            await c.publish(opts.topic("start"), encode_control(name, 0, {"type": "start", "task": "resynthesis"}), qos=1)
        await until_claimed(c, "w1", {"alice", "carol"})
        await c.publish(opts.topic("in", "alice"), encode_audio("bob", 1, np.zeros(320, np.float32), 16000), qos=1)
        await c.publish(opts.topic("in", "carol"), b"\x00" * 40, qos=1)
        errors = {}
        async with asyncio.timeout(10):
            while len(errors) < 2:
                item = await hub.inbox.get()
                if isinstance(item, SessionError):
                    errors[item.session.removeprefix("mqtt/")] = item.message  # the hub's id: the front end's, then the client's
    assert set(errors) == {"alice", "carol"}, errors
    assert "on sg/sessions/alice/in names session 'bob': a message speaks only for its topic's session" in errors["alice"]
    assert errors["carol"].startswith("malformed message on sg/sessions/carol/in:")


async def test_a_message_the_worker_fails_on_ends_its_session_with_an_error_and_the_worker_goes_on(broker):
    """A bug met while handling one message (here: delivering it raises) ends that message's session with an
    error, so the client does not wait on audio with a hole in it, and the worker serves the next start."""
    from streamgen.io.mqtt import encode_audio, encode_control
    from streamgen.pipeline.items import SessionError

    async with worker_in_process(broker, "w1", 64) as (link, hub, opts, c):
        deliver = link._deliver

        async def deliver_with_a_bug(s, m):
            if s.name == "alice" and m.seq == 2:
                raise KeyError("oops")
            return await deliver(s, m)

        link._deliver = deliver_with_a_bug
        for name in ("alice", "bob"):
            await c.subscribe(opts.topic("out", name), qos=1)
        await c.publish(opts.topic("start"), encode_control("alice", 0, {"type": "start", "task": "resynthesis"}), qos=1)
        await until_claimed(c, "w1", {"alice"})
        for seq in (1, 2, 3):
            await c.publish(opts.topic("in", "alice"), encode_audio("alice", seq, np.zeros(320, np.float32), 16000), qos=1)
        async with asyncio.timeout(10):
            while not isinstance(item := await hub.inbox.get(), SessionError):
                pass
        assert item.message == "internal error on this message (KeyError); the session is ended"
        await c.publish(opts.topic("start"), encode_control("bob", 0, {"type": "start", "task": "resynthesis"}), qos=1)
        await until_claimed(c, "w1", {"bob"})
