"""A seeded, structure-aware fuzz of the MQTT service: >= 10,000 messages with valid headers and
hostile fields (ids, sequence numbers, rates, encodings, timestamps, control JSON), interleaved
with good sessions, against a real Mosquitto and the real MqttSource / Pipeline / MqttSink. The
good sessions' outputs must equal the offline run, and the server must still be running."""

import asyncio
import json
import random
import struct
import time

import numpy as np
from mqtt_helpers import as_pcm, connect, make_server, pcm16, receive, reference, session_messages, until_subscribed, same_audio
from speech import espeak

from streamgen.io.mqtt import AUDIO, CONTROL, HEADER, MAGIC, VERSION

SEED, HOSTILE_MESSAGES, GOOD_SESSIONS, FUZZ_IDS = 8, 10_000, 4, 12


def hostile_control(rng: random.Random) -> bytes:
    bodies = [
        lambda: {"type": "start", "options": rng.choice([5, "x", [1], None, True, {"k": [1]}, {"k": {"a": 1}}, {"k": 1e308},
                                                         {"k": 10**30}, {"": 1}, {"a" * 100: 1}, {"k": "v" * 300}, {"emit_every": 0}])},
        lambda: {"type": rng.choice(["start", "task"]), "task": rng.choice(["../../etc/passwd", "nope", 5, None, "", "x" * 100, "resynthesis", "translation"])},
        lambda: {"type": rng.choice(["stop", "start", "task", "end", "error", "", "START", 5, None, [], {}])},
        lambda: {"type": "stop", rng.choice(["extra", "task", "options", ""]): rng.choice([1, "x", None])},
        lambda: {"type": "start", "task": "resynthesis", "options": {}},
        lambda: rng.choice([[], "stop", 5, None, [{"type": "stop"}]]),
        lambda: {"type": "start", "options": {f"o{i}": i for i in range(rng.choice([31, 33, 100]))}},
    ]
    if rng.random() < 0.7:
        return json.dumps(rng.choice(bodies)()).encode()
    n = rng.choice([3, 50, 2000, 3000])
    raw = [lambda: b"[" * n + b"]" * n, lambda: b'{"a":' * n + b"1" + b"}" * n, lambda: b"\xff\xfe\x00", lambda: b'{"type": "stop"',
           lambda: b"NaN", lambda: b'{"type": "start", "options": {"k": Infinity}}', lambda: b'{"type": "stop"}' + b" " * 5000,
           lambda: b'{"type": "stop", "type": "start"}', lambda: b"", lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(64)))]
    return rng.choice(raw)()


def hostile_audio(rng: random.Random, wave: np.ndarray) -> tuple[int, bytes]:
    encoding = rng.choice([0, 1, 0, 1, 2, 255])
    chunk = wave[: rng.choice([1, 160, 320, 320])]
    payload = rng.choice([
        lambda: np.clip(np.rint(chunk * 32768), -32768, 32767).astype("<i2").tobytes(),
        lambda: chunk.astype("<f4").tobytes(),
        lambda: np.array([np.nan, np.inf, -np.inf, 1e38] * 40, "<f4").tobytes(),
        lambda: b"\x01\x02\x03",
        lambda: b"",
        lambda: np.full(rng.choice([80_001, 500_000]), 0.1, "<f4").tobytes() if rng.random() < 0.05 else b"\x00" * 7,
    ])()
    return encoding, payload


def hostile_message(rng: random.Random, owner: str, wave: np.ndarray) -> bytes:
    """A message for `owner`'s topic: a plausible header in which any field may be hostile."""
    session = owner.encode()
    if rng.random() < 0.1:  # a session id that is not the topic's, or not an id at all
        session = rng.choice([b"alice", b"good0", b"_server", b"a+b", b"a/#", b"a\x00b", b"..", b"caf\xc3\xa9", b"x" * 64, b"\xff"])
    kind = rng.choices([AUDIO, CONTROL, rng.randrange(2, 256)], weights=[10, 10, 1])[0]
    seq = rng.choice([0, 1, 2, rng.randrange(100), rng.randrange(2**32), 2**32 - 1 - rng.randrange(100)])
    ts = rng.choice([time.time(), 0.0, float("nan"), float("inf"), -1e300, 1e300])
    if kind == AUDIO:
        rate = rng.choice([16000, 16000, 8000, 44100, 0, 7999, 192001, 2**32 - 1, rng.randrange(2**32)])
        encoding, payload = hostile_audio(rng, wave)
    else:
        rate, encoding, payload = 0, 0, hostile_control(rng)
    n = len(session) if rng.random() < 0.95 else rng.choice([0, 65, 255, len(session) + 1])
    magic, version = (MAGIC, VERSION) if rng.random() < 0.97 else (rng.choice([b"SH", b"\x00\x00"]), rng.choice([0, 2, 255]))
    return struct.pack("<2sBBBBIId", magic, version, kind, encoding, n, rate, seq, ts) + session + payload


def test_ten_thousand_hostile_messages_leave_good_sessions_exact(broker, test_bundle):
    assert HEADER.size == struct.calcsize("<2sBBBBIId")
    wave = pcm16(espeak("Good morning."))
    expected = reference(test_bundle, wave)
    rng = random.Random(SEED)
    events = [(f"s/fuzz{(k := rng.randrange(FUZZ_IDS))}/in", hostile_message(rng, f"fuzz{k}", wave.numpy())) for _ in range(HOSTILE_MESSAGES)]
    events += [(f"s/{rng.choice(['a b', '_server', '..', 'x' * 70, 'é'])}/in", b"SG") for _ in range(50)]  # no session at all
    rng.shuffle(events)
    for g in range(GOOD_SESSIONS):  # spread each good session through the flood, in order
        at = sorted(rng.sample(range(len(events)), len(session_messages(f"good{g}", wave))))
        for i, m in reversed(list(zip(at, session_messages(f"good{g}", wave)))):
            events.insert(i, (f"s/good{g}/in", m))

    async def main():
        pipeline = make_server(test_bundle, broker.port, None, idle_timeout_s=5.0)
        server = asyncio.create_task(pipeline.run())
        await until_subscribed(pipeline.source.link, server)
        readers = [await connect(broker.port, f"good-reader{g}", f"s/good{g}/out") for g in range(GOOD_SESSIONS)]
        replies = [asyncio.create_task(receive(r, timeout=120)) for r in readers]
        sender = await connect(broker.port, "fuzzer")
        for i in range(0, len(events), 32):
            await asyncio.gather(*(sender.publish(t, m) for t, m in events[i : i + 32]))
            assert not server.done(), server.exception()
        got = [await r for r in replies]
        assert not server.done(), server.exception()  # still serving after everything
        source = pipeline.source
        pipeline.request_stop("the test is over")
        stats = await asyncio.wait_for(server, 60)
        for link in readers + [sender]:
            await link.close()
        return got, source, stats

    got, source, stats = asyncio.run(main())
    for g, reply in enumerate(got):
        assert same_audio(as_pcm(reply), expected), f"good{g}"
        assert reply.control == [{"type": "end"}], f"good{g}: {reply.control}"
    assert source.malformed > HOSTILE_MESSAGES // 2  # most were refused, one by one
    assert len(source.sessions) <= source.max_live
