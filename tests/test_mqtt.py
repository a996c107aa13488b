"""MQTT end to end against a real Mosquitto on 127.0.0.1: streaming, reordering, a broker restart
mid-session at QoS 1, and malformed messages."""

import asyncio
import random

import numpy as np
import pytest
import torch
from services import Mosquitto
from speech import espeak

from streamgen.io.memory import MemorySink, MemorySource, chunks_of
from streamgen.io.mqtt import (CONTROL, MqttLink, MqttSink, MqttSource, WireError, decode, encode_audio,
                               encode_control)
from streamgen.pipeline.runner import Pipeline, build_stages
from streamgen.pipeline.stats import Stats

OPTIONS = {"policy": "wait-k", "k": 5, "chunk_ms": 320}
BLOCK = 320  # 20 ms messages


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path)
    b.start()
    yield b
    b.stop()


def pcm16(wave: torch.Tensor) -> torch.Tensor:
    """What a PCM16 message carries."""
    return torch.from_numpy((np.clip(wave.numpy(), -1, 1) * 32767).astype(np.int16).astype(np.float32) / 32768.0)


def reference(bundle, wave) -> np.ndarray:
    """The same session through the pipeline without MQTT, quantised as the MQTT sink sends it."""
    sink = MemorySink()
    asyncio.run(Pipeline(MemorySource(chunks_of("ref", pcm16(wave), BLOCK)), build_stages(bundle, "translation", OPTIONS),
                         sink, Stats(16000)).run())
    return (np.clip(sink.wave("ref").numpy(), -1, 1) * 32767).astype(np.int16)


async def serve(bundle, port, sessions, in_topic="s/+/in", out_topic="s/{session}/out"):
    link = MqttLink("127.0.0.1", port, client_id="streamgen-test-server")
    source = MqttSource(link, in_topic, 16000, max_sessions=sessions)
    p = Pipeline(source, build_stages(bundle, "translation", OPTIONS), MqttSink(link, out_topic, 16000), Stats(16000))
    await p.run()
    return source, p.stats


async def client(port, messages: list[bytes], session: str, on_half=None):
    """Publish messages (QoS 1, retrying across broker restarts); collect the reply until its end."""
    link = MqttLink("127.0.0.1", port, client_id=f"test-client-{session}")
    link.subscriptions.append(f"s/{session}/out")
    link.start()
    await link.connected.wait()
    for i, m in enumerate(messages):
        if on_half is not None and i == len(messages) // 2:
            await on_half()
        await link.publish(f"s/{session}/in", m)
    audio, control = {}, []  # audio by sequence number: QoS 1 may deliver a message twice
    while True:
        _, data = await asyncio.wait_for(link.incoming.get(), timeout=60)
        msg = decode(data)
        if msg.kind == CONTROL:
            control.append(msg.control)
            if msg.control["type"] == "end":
                break
        else:
            audio[msg.seq] = msg.samples
    await link.close()
    pcm = np.concatenate([audio[k] for k in sorted(audio)] or [np.zeros(0)])
    return (pcm * 32768).round().astype(np.int16), control


def session_messages(session: str, wave: torch.Tensor) -> list[bytes]:
    msgs = [encode_audio(session, i, wave[s : s + BLOCK].numpy(), 16000) for i, s in enumerate(range(0, len(wave), BLOCK))]
    return msgs + [encode_control(session, len(msgs), {"type": "stop"})]


def test_wire_format_roundtrip_and_errors():
    x = np.linspace(-1, 1, 321, dtype=np.float32)
    m = decode(encode_audio("café", 7, x, 22050))
    assert (m.session, m.seq, m.sample_rate) == ("café", 7, 22050) and np.abs(m.samples - x).max() < 1e-4
    f = decode(encode_audio("a", 0, x, 16000, encoding=1))
    assert np.array_equal(f.samples, x)
    good = encode_audio("a", 0, x, 16000)
    for bad, msg in [(b"garbage", "shorter than"), (b"XX" + good[2:], "not a streamgen message"),
                     (good[:-1], "not a whole number"), (good[:3] + bytes([9]) + good[4:], "unknown message kind"),
                     (encode_audio("a", 0, x, 4000), "outside"), (encode_control("a", 0, ["stop"]), "JSON object")]:
        with pytest.raises(WireError, match=msg):
            decode(bad)


def test_a_session_streams_in_and_out(broker, test_bundle):
    wave = espeak("Good morning, how are you today?")
    expected = reference(test_bundle, wave)

    async def main():
        server = asyncio.create_task(serve(test_bundle, broker.port, 1))
        await asyncio.sleep(0.3)
        got, control = await client(broker.port, session_messages("alice", pcm16(wave)), "alice")
        source, stats = await server
        return got, control, stats

    got, control, stats = asyncio.run(main())
    assert len(expected) > 0 and np.array_equal(got, expected)
    assert control == [{"type": "end"}]
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
        server = asyncio.create_task(serve(test_bundle, broker.port, 1))
        await asyncio.sleep(0.3)
        got, _ = await client(broker.port, shuffled, "bob")
        source, _ = await server
        return got, source

    got, source = asyncio.run(main())
    assert np.array_equal(got, expected)


def test_broker_restart_mid_session_loses_no_accepted_chunk(broker, test_bundle):
    wave = espeak("Good morning, how are you today?")
    expected = reference(test_bundle, wave)

    async def main():
        server = asyncio.create_task(serve(test_bundle, broker.port, 1))
        await asyncio.sleep(0.3)

        async def restart():
            await asyncio.to_thread(broker.restart)

        got, control = await client(broker.port, session_messages("carol", pcm16(wave)), "carol", on_half=restart)
        source, stats = await server
        return got, source, stats

    got, source, stats = asyncio.run(main())
    assert source.link.reconnects >= 1  # the pipeline really lost its connection
    assert np.array_equal(got, expected)  # every chunk arrived: same output as without the restart
    assert source.skipped == 0
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
    }

    async def main():
        server = asyncio.create_task(serve(test_bundle, broker.port, 4))  # good, odd, rate, huge
        await asyncio.sleep(0.3)
        link = MqttLink("127.0.0.1", broker.port, client_id="test-bad")
        link.subscriptions.append("s/+/out")
        link.start()
        await link.connected.wait()
        for name, msgs in bad.items():
            for m in msgs:
                await link.publish("s/x/in", m)
        got, control = await client(broker.port, good, "good")
        replies = {}
        while len(replies) < 4:
            topic, data = await asyncio.wait_for(link.incoming.get(), timeout=60)
            msg = decode(data)
            if msg.kind == CONTROL and msg.control["type"] == "error":
                replies[msg.session] = msg.control["message"]
        await link.close()
        await asyncio.wait_for(server, 60)
        return got, control, replies

    got, control, replies = asyncio.run(main())
    assert len(got) > 0 and control == [{"type": "end"}]
    assert "shorter than" in replies["unknown"] or "not a streamgen message" in replies["unknown"]
    assert "not a whole number" in replies["odd"]
    assert "sample rate changed from 16000 to 8000" in replies["rate"]
    assert "exceeds the 10 s limit" in replies["huge"]
