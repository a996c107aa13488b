"""MQTT end to end against a real Mosquitto on 127.0.0.1 (the resynthesis task): streaming, reordering, a broker restart
mid-session at QoS 1, and malformed messages."""

import asyncio
import random

import numpy as np
import pytest
from mqtt_helpers import as_pcm, client, connect, pcm16, reference, session_messages, started, same_audio
from services import Mosquitto
from speech import espeak

from streamgen.io.mqtt import WireError, decode, encode_audio, encode_control, pcm16_decode, pcm16_encode


def test_wire_format_roundtrip_and_errors():
    x = np.linspace(-1, 1, 321, dtype=np.float32)
    m = decode(encode_audio("Alice-2.b_c", 7, x, 22050))  # 1.0 itself clips to 32767 / 32768
    assert (m.session, m.seq, m.sample_rate) == ("Alice-2.b_c", 7, 22050) and np.abs(m.samples - x)[:-1].max() <= 0.5 / 32768
    f = decode(encode_audio("a", 0, x, 16000, encoding=1))
    assert np.array_equal(f.samples, x)
    good = encode_audio("a", 0, x, 16000)
    for bad, msg in [(b"garbage", "shorter than"), (b"XX" + good[2:], "not a streamgen message"),
                     (good[:-1], "not a whole number"), (good[:3] + bytes([9]) + good[4:], "unknown message kind"),
                     (encode_audio("a", 0, x, 4000), "outside"), (encode_control("a", 0, ["stop"]), "JSON object"),
                     (good[:22] + "é".encode() + good[23:], "session id .* is not valid")]:
        with pytest.raises(WireError, match=msg):
            decode(bad)
    with pytest.raises(ValueError, match="session id"):
        encode_audio("café", 0, x, 16000)


def test_pcm16_encode_and_decode_are_inverse():
    every = np.arange(-32768, 32768, dtype=np.int16)
    assert np.array_equal(pcm16_encode(pcm16_decode(every)), every)  # every int16 survives the round trip
    x = np.array([-1.5, -1.0, -0.5, 0.0, 0.5, 32767 / 32768, 1.0, 2.0], np.float32)
    assert pcm16_encode(x).tolist() == [-32768, -32768, -16384, 0, 16384, 32767, 32767, 32767]  # clipped at full scale
    samples = pcm16_decode(every[::7])
    assert np.array_equal(decode(encode_audio("a", 0, samples, 16000)).samples, samples)  # and through the wire


def test_a_session_streams_in_and_out(broker, test_bundle):
    wave = espeak("Good morning, how are you today?")
    expected = reference(test_bundle, wave)

    async def main():
        server = await started(test_bundle, broker.port, 1)
        reply = await client(broker.port, session_messages("alice", pcm16(wave)), "alice")
        source, stats = await server
        return reply, stats

    reply, stats = asyncio.run(main())
    assert len(expected) > 0 and same_audio(as_pcm(reply), expected)
    assert reply.control == [{"type": "end"}] and reply.missing == []
    assert stats.sessions["alice"].summary()["start_offset_ms"] < 2000  # spoke while input was arriving


def test_out_of_order_and_duplicate_chunks_are_reordered(broker, test_bundle):
    wave = espeak("Good morning, how are you today?")
    expected = reference(test_bundle, wave)
    msgs = session_messages("bob", pcm16(wave))
    rng = random.Random(0)
    shuffled = []
    for i in range(0, len(msgs), 6):  # shuffle within windows of 6, and send some twice
        window = msgs[i : i + 6]
        rng.shuffle(window)
        shuffled += window + ([window[0]] if i % 12 == 0 else [])

    async def main():
        server = await started(test_bundle, broker.port, 1)
        reply = await client(broker.port, shuffled, "bob")
        await server
        return reply

    reply = asyncio.run(main())
    assert same_audio(as_pcm(reply), expected) and reply.control == [{"type": "end"}]


def test_broker_restart_mid_session_loses_no_accepted_chunk(broker, test_bundle):
    wave = espeak("Good morning, how are you today?")
    expected = reference(test_bundle, wave)

    async def main():
        server = await started(test_bundle, broker.port, 1)

        async def restart():
            await asyncio.to_thread(broker.restart)

        reply = await client(broker.port, session_messages("carol", pcm16(wave)), "carol", on_half=restart)
        source, stats = await server
        return reply, source, stats

    reply, source, stats = asyncio.run(main())
    assert source.link.reconnects >= 1  # the pipeline really lost its connection
    assert same_audio(as_pcm(reply), expected)  # every chunk arrived: same output as without the restart
    assert reply.control == [{"type": "end"}]
    assert "error" not in stats.sessions["carol"].summary()


def test_malformed_messages_get_errors_and_other_sessions_continue(broker, test_bundle):
    wave = pcm16(espeak("Good morning."))
    good = session_messages("good", wave)
    bad = {
        "garbage": [b"\x00\x01garbage"],
        "odd": [encode_audio("odd", 0, wave[:320].numpy(), 16000)[:-1]],
        "rate": [encode_audio("rate", 0, wave[:320].numpy(), 16000), encode_audio("rate", 1, wave[320:640].numpy(), 8000)],
        "huge": [encode_audio("huge", 0, np.zeros(16000 * 600, np.float32), 16000),  # one 10-minute chunk
                 encode_control("huge", 1, {"type": "stop"})],
        "long": [encode_audio("long", 0, np.zeros(8000 * 11, np.float32), 8000, encoding=1)],  # 11 s in 352 KB
    }

    async def main():
        server = await started(test_bundle, broker.port, 1)  # exits after the one good session
        link = await connect(broker.port, "test-bad", "s/+/out", "s/_server/errors")
        for name, msgs in bad.items():
            for m in msgs:
                await link.publish(f"s/{name}/in", m)
        await link.publish("s/no id/in", encode_control("nobody", 0, {"type": "stop"}))
        reply = await client(broker.port, good, "good")
        errors, server_errors = {}, []
        while len(errors) < len(bad) or not server_errors:
            topic, data, _ = await asyncio.wait_for(link.incoming.get(), timeout=60)
            msg = decode(data)
            if msg.control is not None and msg.control["type"] == "error":
                (server_errors.append(msg.control["message"]) if topic == "s/_server/errors" else errors.setdefault(msg.session, msg.control["message"]))
        await link.close()
        await asyncio.wait_for(server, 60)
        return reply, errors, server_errors

    reply, errors, server_errors = asyncio.run(main())
    assert len(reply.audio()) > 0 and reply.control == [{"type": "end"}]
    assert "shorter than" in errors["garbage"]
    assert "not a whole number" in errors["odd"]
    assert "sample rate changed from 16000 to 8000" in errors["rate"]
    assert "exceeds the 1048576 byte limit" in errors["huge"]
    assert "11.0 s exceeds the 10 s limit" in errors["long"]
    assert "'no id' is not a valid session id" in server_errors[0]


def test_broker_kill_9_loses_nothing_silently(tmp_path, test_bundle):
    """The broker settings the README gives (persistence, autosave_interval 1) and a server with a
    stable client id and clean_session off: the broker is SIGKILLed mid-session and restarted while
    the client goes on sending. The session either comes out exact with a plain end, or its client
    is told which input messages never arrived; never a plain end over missing audio."""
    broker = Mosquitto(tmp_path, autosave_interval=1)
    broker.start()
    wave = espeak("Good morning, how are you today?")
    expected = reference(test_bundle, wave)
    try:
        async def main():
            server = await started(test_bundle, broker.port, 1, idle_timeout_s=5.0)
            await asyncio.sleep(1.5)  # an autosave after the server subscribed: its session survives the kill

            async def kill_and_restart():
                await asyncio.sleep(0.2)
                await asyncio.to_thread(broker.kill)
                await asyncio.to_thread(broker.start)

            reply = await client(broker.port, session_messages("kim", pcm16(wave)), "kim", on_half=kill_and_restart)
            source, stats = await asyncio.wait_for(server, 60)
            return reply, source

        reply, source = asyncio.run(main())
    finally:
        broker.stop()
    assert source.link.reconnects >= 1
    if reply.error is None:
        assert same_audio(as_pcm(reply), expected) and reply.control == [{"type": "end"}]
    else:
        assert "never arrived" in reply.error and reply.control[-1] == {"type": "end"}


def test_an_overloaded_reader_holds_a_bounded_backlog(broker):
    """A server that reads slower than messages arrive keeps at most incoming_size + max_backlog of
    them (the rest are discarded, and their sessions see the gap): its memory stays bounded."""

    async def main():
        reader = await connect(broker.port, "slow-reader", "flood/in", incoming_size=4, max_backlog=8)
        sender = await connect(broker.port, "flooder")
        for i in range(200):
            await sender.publish("flood/in", encode_audio("x", i, np.zeros(320, np.float32), 16000))
        await asyncio.sleep(1.0)  # everything has arrived; nobody has read
        got = []
        while True:
            try:
                got.append(await asyncio.wait_for(reader.incoming.get(), 0.5))
            except TimeoutError:
                break
        await sender.close()
        await reader.close()
        return got

    got = asyncio.run(main())
    assert 4 <= len(got) <= 4 + 8 + 1  # + the one the link was handing over when its queue filled


def test_a_client_can_tell_which_replies_it_lost():
    """Reply follows one stream from its start (random first number, wrapping at 2^32), drops
    repeats and other streams' messages, and lists lost positions."""
    from streamgen.io.mqtt import Reply

    first = 2**32 - 3
    stream = [encode_control("a", first, {"type": "start"})]
    stream += [encode_audio("a", (first + i) % 2**32, np.full(4, i / 100, np.float32), 16000) for i in range(1, 9)]
    stream += [encode_control("a", (first + 9) % 2**32, {"type": "end"})]
    other = [encode_control("a", 2**31 + 77, {"type": "start"}), encode_control("a", 2**31 + 78, {"type": "error", "message": "old"})]
    arrived = [stream[3], stream[0], stream[1], stream[1], other[0], stream[2], other[1], stream[5], stream[6], stream[8], stream[9]]
    reply = Reply()
    done = [reply.add(decode(m)) for m in arrived]
    assert done[-1] and not any(done[:-1])
    assert reply.missing == [4, 7] and reply.error is None and reply.control == [{"type": "end"}]
    assert np.allclose(reply.audio(), np.repeat([0.01, 0.02, 0.03, 0.05, 0.06, 0.08], 4), atol=1e-4)


async def test_a_link_whose_pipeline_is_behind_reconnects_after_a_broker_restart(broker):
    """With `incoming` full (the pipeline behind), the link used to wait on the queue and never see its
    connection end: it neither reconnected nor published again, and the service stood still. It now
    reconnects, and what it held keeps its place ahead of what comes after."""
    listener = await connect(broker.port, "behind", "t/in", incoming_size=2, clean_session=False)
    sender = await connect(broker.port, "sender")
    for i in range(6):
        await sender.publish("t/in", bytes([i]))
    while not listener.incoming.full():
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # the link now waits to hand in its third message
    before = listener.reconnects
    await asyncio.to_thread(broker.restart)
    deadline = asyncio.get_running_loop().time() + 30
    while listener.reconnects == before and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    assert listener.reconnects > before  # it saw the restart although nobody read its queue
    await listener._ready()
    await sender.publish("t/in", bytes([6]))
    got = [(await asyncio.wait_for(listener.incoming.get(), 30))[1][0] for _ in range(7)]
    assert got == list(range(7))  # nothing lost, in order
    await sender.publish("t/out", b"x")  # and it publishes again
    await listener.publish("t/out", b"y")
    await sender.close()
    await listener.close()
