"""What any MQTT client can send must not hurt the service or another session (issue 8), against a
real Mosquitto and the real MqttSource / Pipeline / MqttSink in process."""

import asyncio
import os
import signal
import subprocess
import sys

import pytest
from mqtt_helpers import as_pcm, client, connect, pcm16, receive, reference, session_messages, started, until_subscribed, same_audio
from services import Mosquitto
from speech import espeak

from streamgen.io.mqtt import HEADER, MqttFailure, MqttLink, Reply, decode, encode_audio, encode_control


@pytest.fixture(scope="module")
def wave():
    return pcm16(espeak("Good morning."))


def with_session_id(message: bytes, raw: bytes) -> bytes:
    """`message` with its header's session id replaced by arbitrary bytes."""
    n = message[5]
    return message[:5] + bytes([len(raw)]) + message[6 : HEADER.size] + raw + message[HEADER.size + n :]


def control_bytes(session: str, seq: int, text: str) -> bytes:
    return encode_control(session, seq, None)[: -len(b"null")] + text.encode()


HOSTILE = {  # the issue's table: each of these stopped or stalled the whole service
    "deep": lambda w: [control_bytes("mallory", 0, "[" * 2000 + "]" * 2000)],
    "options": lambda w: [encode_control("mallory", 0, {"type": "start", "options": v}) for v in (5, "x", [1])],
    "plus": lambda w: [with_session_id(encode_audio("mallory", 0, w[:320].numpy(), 16000), b"a+b"),
                       with_session_id(encode_audio("mallory", 0, w[:320].numpy(), 16000), b"a/#")],
    "nul": lambda w: [with_session_id(encode_audio("mallory", 0, w[:320].numpy(), 16000), b"a\x00b")],
    "far_seq": lambda w: [encode_audio("mallory", 2**32 - 1 - i, w[:320].numpy(), 16000) for i in range(65)],
    "other_session": lambda w: [encode_audio("alice", i, w[:320].numpy(), 16000) for i in range(3)]
                               + [encode_control("alice", 3, {"type": "stop"})],
}
EXPECTED_ERROR = {
    "deep": "nests 2000 levels deep",
    "options": '"options" must be an object',
    "plus": "session id b'a+b' is not valid",
    "nul": r"session id b'a\x00b' is not valid",
    "far_seq": "is still missing: more than the reorder window",
    "other_session": "names session 'alice': a message speaks only for its topic's session, 'mallory'",
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_the_issues_hostile_messages_end_only_their_sender(case, broker, test_bundle, wave):
    """mallory sends one kind of hostile message on her own topic while alice runs a session:
    mallory gets an error on her topic, alice's output equals the offline run, the server goes on."""
    expected = reference(test_bundle, wave)

    async def main():
        server = await started(test_bundle, broker.port, 1)
        mallory = await connect(broker.port, "mallory", "s/mallory/out")
        for m in HOSTILE[case](wave):
            await mallory.publish("s/mallory/in", m)
        error = (await receive(mallory, timeout=60)).error
        alice = await client(broker.port, session_messages("alice", wave), "alice")
        await asyncio.wait_for(server, 60)  # --sessions 1: alice's was the one good session
        await mallory.close()
        return error, alice

    error, alice = asyncio.run(main())
    assert EXPECTED_ERROR[case] in error
    assert same_audio(as_pcm(alice), expected) and alice.control == [{"type": "end"}]


def test_control_fields_are_checked_one_by_one():
    from streamgen.io.mqtt import WireError, check_input_control

    for body, why in [({"type": "start", "task": "../x"}, '"task" must be a task name'),
                      ({"type": "start", "options": {"k": None}}, "must be a string"),
                      ({"type": "start", "options": {"k": 10**20}}, r"integers up to 2\^53"),
                      ({"type": "start", "options": {f"o{i}": 1 for i in range(33)}}, "33 options, at most 32"),
                      ({"type": "stop", "now": True}, "has no field 'now'"),
                      ({"type": "exec"}, "is not one of start, stop, task")]:
        with pytest.raises(WireError, match=why):
            check_input_control(decode(encode_control("a", 0, body)))
    for text, why in [('{"type": "start", "options": {"k": NaN}}', "NaN is not a number JSON allows"),
                      ('{"type": "stop"' + " " * 5000 + "}", "exceeds the 4096 byte limit")]:
        with pytest.raises(WireError, match=why):
            decode(control_bytes("a", 0, text))
    check_input_control(decode(encode_control("a", 0, {"type": "start", "task": "translation", "options": {"k": 5, "r": 0.5, "p": "wait-k", "b": True}})))


def test_an_unknown_task_or_option_is_an_error_for_its_session(broker, test_bundle, wave):
    async def main():
        server = await started(test_bundle, broker.port, 1)
        bad = [await client(broker.port, [encode_control(name, 0, body), encode_audio(name, 1, wave[:320].numpy(), 16000),
                                          encode_control(name, 2, {"type": "stop"})], name)
               for name, body in (("bob", {"type": "start", "task": "nope"}),
                                  ("ben", {"type": "start", "task": "resynthesis", "options": {"k": 1}}))]
        good = await client(broker.port, session_messages("carol", wave), "carol")
        await asyncio.wait_for(server, 60)
        return bad, good

    bad, good = asyncio.run(main())
    assert "unknown task 'nope'" in bad[0].error and "has no option k" in bad[1].error
    assert good.control == [{"type": "end"}]


def test_a_gap_is_reported_with_the_missing_numbers(broker, test_bundle, wave):
    msgs = session_messages("dave", wave)
    holed = msgs[:10] + msgs[13:]  # 10, 11, 12 never sent

    async def main():
        server = await started(test_bundle, broker.port, None, idle_timeout_s=1.0)
        reply = await client(broker.port, holed, "dave")
        server.cancel()
        return reply

    reply = asyncio.run(main())
    assert "never arrived: 10-12" in reply.error and reply.control[-1] == {"type": "end"}


def test_sessions_expire_on_their_own_clock_while_others_talk(broker, test_bundle, wave):
    """An abandoned session ends (with an error) after its idle time even while another client
    keeps sending; before, expiry waited for a second of silence from everyone."""
    chatty = session_messages("chatty", wave)

    async def main():
        server = await started(test_bundle, broker.port, 1, idle_timeout_s=1.0)
        quiet = await connect(broker.port, "quiet", "s/quiet/out")
        for m in session_messages("quiet", wave)[:5]:
            await quiet.publish("s/quiet/in", m)
        talker = await connect(broker.port, "talker", "s/chatty/out")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        expired = asyncio.create_task(receive(quiet, timeout=30))
        error_after = []
        expired.add_done_callback(lambda _: error_after.append(loop.time() - t0))
        for m in chatty:  # a message every 50 ms
            await talker.publish("s/chatty/in", m)
            await asyncio.sleep(0.05)
        sent_for = loop.time() - t0
        reply = await receive(talker)
        await asyncio.wait_for(server, 60)
        await quiet.close()
        await talker.close()
        return (await expired), error_after, sent_for, reply

    expired, error_after, sent_for, reply = asyncio.run(main())
    assert "no message for 1 s and no stop" in expired.error
    assert expired.done and reply.control == [{"type": "end"}]
    assert sent_for > 2 and error_after[0] < sent_for  # it came while chatty was still talking


def test_too_many_sessions_are_refused_as_busy(broker, test_bundle, wave):
    async def main():
        server = await started(test_bundle, broker.port, 1, max_live=2)
        link = await connect(broker.port, "many", "s/+/out")
        for name in ("s1", "s2", "s3"):
            await link.publish(f"s/{name}/in", encode_audio(name, 0, wave[:320].numpy(), 16000))
        reply = None
        while reply is None:
            topic, data, _ = await asyncio.wait_for(link.incoming.get(), 30)
            msg = decode(data)
            if msg.control and msg.control["type"] == "error":
                reply = (msg.session, msg.control["message"])
        for name in ("s1", "s2"):  # the live ones finish normally
            await link.publish(f"s/{name}/in", encode_control(name, 1, {"type": "stop"}))
        server.cancel()
        await link.close()
        return reply

    session, error = asyncio.run(main())
    assert session == "s3" and "the server is busy: 2 sessions are live" in error


def test_the_reorder_buffer_is_bounded_in_bytes(broker, test_bundle, wave):
    msgs = session_messages("eve", wave)[1:40]  # message 0 never comes; 39 x 662 bytes wait

    async def main():
        server = await started(test_bundle, broker.port, None, max_buffer_bytes=16 * 1024)
        reply = await client(broker.port, msgs, "eve")
        server.cancel()
        return reply

    reply = asyncio.run(main())
    assert "MiB of messages are waiting for message 0 (the limit is 0 MiB); never arrived: 0" in reply.error


def test_ids_are_reusable_and_cannot_be_burned_in_advance(broker, test_bundle, wave):
    expected = reference(test_bundle, wave)

    async def main():
        server = await started(test_bundle, broker.port, 2)
        stray = await client(broker.port, [encode_control("fay", 0, {"type": "stop"})], "fay")  # burns nothing
        await asyncio.sleep(0.05)  # the next session's messages are sent later (sender timestamps)
        first = await client(broker.port, session_messages("fay", wave), "fay")
        await asyncio.sleep(0.05)
        second = await client(broker.port, session_messages("fay", wave), "fay")
        await asyncio.wait_for(server, 60)
        return stray, first, second

    stray, first, second = asyncio.run(main())
    assert "empty input" in stray.error
    for r in (first, second):
        assert same_audio(as_pcm(r), expected) and r.control == [{"type": "end"}]


def test_output_sequence_numbers_differ_across_server_runs(broker, test_bundle, wave):
    """Two server runs (the same client id) answer the same session id: their reply streams share
    no sequence number, so a client that drops repeats never drops new audio."""
    async def main():
        streams = []
        for _ in range(2):
            link = await connect(broker.port, "watch", "s/gus/out")
            server = await started(test_bundle, broker.port, 1)
            await client(broker.port, session_messages("gus", wave), "gus")
            await asyncio.wait_for(server, 60)
            seqs = []
            while not link.incoming.empty():
                seqs.append(decode((await link.incoming.get())[1]).seq)
            streams.append(seqs)
            await link.close()
            await asyncio.sleep(0.05)
        return streams

    a, b = asyncio.run(main())
    assert len(a) > 3 and len(b) > 3 and not set(a) & set(b)


def test_a_refused_login_is_an_error_not_a_retry_loop(tmp_path):
    broker = Mosquitto(tmp_path, users={"server": "right"})
    broker.start()
    try:
        async def main():
            link = MqttLink("127.0.0.1", broker.port, username="server", password="wrong", client_id="s")
            link.start()
            with pytest.raises(MqttFailure, match="refused 'server': not authorised; check the user name"):
                await asyncio.wait_for(link.publish("x", b"y"), 10)
            assert link.reconnects == 0
            await link.close()

        asyncio.run(main())
    finally:
        broker.stop()


# --- identities: password file, ACL, TLS; the real `streamgen run` -------------------------------------

ACL = """user srv
topic read s/+/in
topic write s/+/out
topic write s/_server/errors

pattern write s/%u/in
pattern read s/%u/out
"""
USERS = {"srv": "server-secret", "alice": "alice-secret", "mallory": "mallory-secret"}


@pytest.fixture
def acl_broker(tmp_path):
    b = Mosquitto(tmp_path, users=USERS, acl=ACL)
    b.start()
    yield b
    b.stop()


def as_user(name):
    return {"username": name, "password": USERS[name]}


def test_a_client_cannot_inject_into_stop_or_read_another_session(acl_broker, test_bundle, wave):
    expected = reference(test_bundle, wave)
    alice_msgs = session_messages("alice", wave)

    async def main():
        server = await started(test_bundle, acl_broker.port, 1, **as_user("srv"))
        mallory = await connect(acl_broker.port, "mallory", "s/mallory/out", "s/alice/out", **as_user("mallory"))
        alice = await connect(acl_broker.port, "alice", "s/alice/out", **as_user("alice"))
        noise = encode_audio("alice", 5, -wave[:320].numpy(), 16000)
        for i, m in enumerate(alice_msgs):
            await alice.publish("s/alice/in", m)
            if i == 3:  # mid-session: inject and stop, on alice's topic (the ACL drops it) and on her own
                for topic in ("s/alice/in", "s/mallory/in"):
                    await mallory.publish(topic, noise)
                    await mallory.publish(topic, encode_control("alice", 4, {"type": "stop"}))
        reply = await receive(alice)
        await asyncio.wait_for(server, 60)
        seen = []
        while not mallory.incoming.empty():
            topic, data, _ = mallory.incoming.get_nowait()
            seen.append((topic, decode(data)))
        await alice.close()
        await mallory.close()
        return reply, seen

    reply, seen = asyncio.run(main())
    assert same_audio(as_pcm(reply), expected) and reply.control == [{"type": "end"}]
    assert {t for t, _ in seen} == {"s/mallory/out"}  # nothing of alice's reached mallory
    errors = [m.control["message"] for _, m in seen if m.control and m.control["type"] == "error"]
    assert errors and "names session 'alice'" in errors[0]


def test_tls_with_a_self_signed_ca(tmp_path, test_bundle, wave):
    from streamgen.io import MqttOptions, open_endpoints
    from streamgen.pipeline.runner import Pipeline, build_engine
    from streamgen.pipeline.stats import Stats

    broker = Mosquitto(tmp_path, tls=True)
    broker.start()
    expected = reference(test_bundle, wave)
    try:
        async def main():
            url = f"mqtts://127.0.0.1:{broker.tls_port}/s"
            source, sink = open_endpoints(url + "/+/in", url + "/{session}/out", 16000,
                                          mqtt=MqttOptions(ca=str(broker.ca_file), client_id="tls-server", max_sessions=1))
            server = asyncio.create_task(Pipeline(source, build_engine(test_bundle, "resynthesis", {}), sink, Stats(16000)).run())
            await until_subscribed(source.link, server)
            from streamgen.io.mqtt import tls_context
            reply = await client(broker.tls_port, session_messages("tina", wave), "tina", tls_context=tls_context(str(broker.ca_file)))
            await asyncio.wait_for(server, 60)
            untrusting = MqttLink("127.0.0.1", broker.tls_port, client_id="no-ca", tls_context=tls_context())
            untrusting.start()
            with pytest.raises(MqttFailure, match="TLS failed"):
                await asyncio.wait_for(untrusting._ready(), 10)
            await untrusting.close()
            return reply

        reply = asyncio.run(main())
        assert same_audio(as_pcm(reply), expected) and reply.control == [{"type": "end"}]
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    from streamgen.testing import random_bundle

    return random_bundle(seed=1).save(tmp_path_factory.mktemp("bundle"))


def streamgen_run(port, bundle_dir, *extra, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "streamgen.cli", "run", "--bundle", str(bundle_dir), "--task", "resynthesis", "--stats",
         "--in", f"mqtt://127.0.0.1:{port}/s/+/in", "--out", f"mqtt://127.0.0.1:{port}/s/{{session}}/out", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


async def wait_until_serving(port, user, timeout=120):
    """Poke the server with a malformed message until it answers (it answers such a message directly)."""
    link = await connect(port, "poke", f"s/{user}/out", **as_user(user))
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while True:
            await link.publish(f"s/{user}/in", b"poke")
            try:
                await receive(link, timeout=0.5)
                return
            except TimeoutError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
    finally:
        await link.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_drains_the_server_gracefully(sig, acl_broker, bundle_dir, wave, tmp_path):
    """`streamgen run` (password from a file) gets a signal mid-session: the live session is told
    (error, then end), the stats are printed, the exit status is 0."""
    secret = tmp_path / "pw"
    secret.write_text(USERS["srv"] + "\n")
    proc = streamgen_run(acl_broker.port, bundle_dir, "--mqtt-username", "srv", "--mqtt-password-file", str(secret))
    try:
        async def main():
            await wait_until_serving(acl_broker.port, "alice")
            alice = await connect(acl_broker.port, "alice", "s/alice/out", **as_user("alice"))
            for m in session_messages("alice", wave)[:-1]:  # no stop: the session is live
                await alice.publish("s/alice/in", m)
            first = await asyncio.wait_for(alice.incoming.get(), 60)  # its reply has begun
            proc.send_signal(sig)
            reply = Reply()
            reply.add(decode(first[1]))
            while not reply.done:
                reply.add(decode((await asyncio.wait_for(alice.incoming.get(), 60))[1]))
            await alice.close()
            return reply

        reply = asyncio.run(main())
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert reply.error == "the server is shutting down" and reply.control[-1] == {"type": "end"}
    assert proc.returncode == 0, err
    assert "alice" in out + err and "Traceback" not in err  # its stats, and no traceback


def test_a_wrong_password_is_one_error_line_and_an_exit(acl_broker, bundle_dir):
    proc = streamgen_run(acl_broker.port, bundle_dir, "--mqtt-username", "srv", env={"STREAMGEN_MQTT_PASSWORD": "wrong"})
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1, err
    assert lines[0].startswith("error:") and "refused 'srv': not authorised; check the user name and the password" in lines[0]


def test_a_new_session_under_an_ended_id_without_sender_timestamps_is_told_why_it_is_not_heard():
    """A client that sends sender timestamp 0 ("0 if unknown") and starts a new session under an id that
    ended moments ago: its messages cannot be told from the old session's late repeats, and they were
    dropped without a word. Its message 0 now gets one reply naming the cause and the fix; a repeat of
    the old session's own message 0 is still dropped quietly, and a later timestamp starts the session."""
    import re
    import time

    import numpy as np

    from streamgen.io.mqtt import MqttSource
    from streamgen.pipeline.items import AudioChunk, End

    class Link:
        subscriptions: list = []

    src = MqttSource(Link(), "s/+/in", 16000, reply_topic="s/{session}/out")
    w = (np.random.default_rng(0).standard_normal(320) * 0.1).astype(np.float32)

    def send(*messages):
        return [i for m in messages for i in src._receive("s/bob/in", m, time.monotonic())]

    first = [encode_audio("bob", 0, w, 16000, timestamp=0.0), encode_control("bob", 1, {"type": "stop"}, timestamp=0.0)]
    assert [type(i) for i in send(*first)] == [AudioChunk, End]
    assert send(first[0], first[1]) == [] and src.outbox.empty()  # the old session's repeats: quiet
    assert send(encode_audio("bob", 0, w[::-1].copy(), 16000, timestamp=0.0)) == []
    session, why = src.outbox.get_nowait()
    assert session == "bob" and re.match(r"session 'bob' ended \d+ s ago, and this message 0 of a new session", why), why
    assert why.endswith("send sender timestamps, use a new session id, or wait 30 s")
    assert [type(i) for i in send(encode_audio("bob", 0, w, 16000, timestamp=5.0))] == [AudioChunk]  # a later timestamp


def test_a_session_sending_far_ahead_of_real_time_is_ended_saying_so_and_a_paced_one_is_not():
    """`run --in mqtt://` is a live service whose sessions share one way into the engine: a client sending
    a long recording as fast as the broker forwards it filled the pipeline's input and every other session
    fell behind. As on `serve`, audio more than 10 s ahead of the time since the session's first message
    ends that session with the reason; a client that sends at the pace it speaks is never ended."""
    import numpy as np

    from streamgen.io.mqtt import MqttSource
    from streamgen.pipeline.items import AudioChunk, End, SessionError

    class Link:
        subscriptions: list = []

    src = MqttSource(Link(), "s/+/in", 16000, reply_topic="s/{session}/out")
    second = np.zeros(16000, np.float32)
    got: dict[str, list] = {"flood": [], "talker": []}
    for i in range(13):
        got["flood"] += src._receive("s/flood/in", encode_audio("flood", i, second, 16000), 100.0)  # all at once
        got["talker"] += src._receive("s/talker/in", encode_audio("talker", i, second, 16000), 100.0 + i)  # one a second
    kinds = [type(i) for i in got["flood"]]
    assert kinds == [AudioChunk] * 11 + [SessionError, End], kinds
    assert got["flood"][-2].message == ("audio sent 11.0 s ahead of real time (at most 10 s): this is a live service; "
                                        "send audio at the pace it is spoken")
    assert [type(i) for i in got["talker"]] == [AudioChunk] * 13
