"""What the MQTT tests share: an in-process server on a real broker, a client, the offline reference."""

import asyncio

import numpy as np
import torch

from streamgen.io.memory import MemorySink, MemorySource, chunks_of
from streamgen.io.mqtt import MqttLink, MqttSink, MqttSource, Reply, decode, encode_audio, encode_control, pcm16_decode, pcm16_encode
from streamgen.pipeline.runner import Pipeline, build_engine
from streamgen.pipeline.stats import Stats

TASK, OPTIONS = "resynthesis", {}  # the whole chain, without the generator's decoding
BLOCK = 320  # 20 ms messages


def pcm16(wave: torch.Tensor) -> torch.Tensor:
    """What a PCM16 message carries."""
    return torch.from_numpy(pcm16_decode(pcm16_encode(wave.numpy())))


def reference(bundle, wave, task=TASK, options=OPTIONS) -> np.ndarray:
    """The same session through the pipeline without MQTT, as PCM16 as the MQTT sink sends it."""
    sink = MemorySink()
    asyncio.run(Pipeline(MemorySource(chunks_of("ref", pcm16(wave), BLOCK)), build_engine(bundle, task, options),
                         sink, Stats(16000)).run())
    return pcm16_encode(sink.wave("ref").numpy())


def make_server(bundle, port, sessions, in_topic="s/+/in", out_topic="s/{session}/out", task=TASK,
                options=OPTIONS, client_id="streamgen-test-server", username=None, password=None, **source_options):
    link = MqttLink("127.0.0.1", port, client_id=client_id, username=username, password=password)
    source = MqttSource(link, in_topic, 16000, max_sessions=sessions, reply_topic=out_topic, **source_options)
    return Pipeline(source, build_engine(bundle, task, options), MqttSink(link, out_topic, 16000), Stats(16000))


async def serve(bundle, port, sessions, **kw):
    p = make_server(bundle, port, sessions, **kw)
    await p.run()
    return p.source, p.stats


async def until_subscribed(link: MqttLink, server: asyncio.Task) -> None:
    """Wait until a server's link is subscribed (before it, a fresh broker session drops messages)."""
    ready = asyncio.ensure_future(link.connected.wait())
    await asyncio.wait({ready, server}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if server.done():
        server.result()  # raises what stopped it
    assert link.connected.is_set(), "the server did not connect within 60 s"


async def started(bundle, port, sessions, **kw) -> asyncio.Task:
    """`serve` as a task (its result: source, stats), returned once the server is subscribed."""
    p = make_server(bundle, port, sessions, **kw)

    async def run():
        await p.run()
        return p.source, p.stats

    task = asyncio.create_task(run())
    await until_subscribed(p.source.link, task)
    return task


async def connect(port, client_id, *subscriptions, **kw) -> MqttLink:
    link = MqttLink("127.0.0.1", port, client_id=client_id, **kw)
    link.subscriptions += subscriptions
    link.start()
    await link._ready()
    return link


async def receive(link: MqttLink, timeout: float = 60) -> Reply:
    """One reply stream from the link's subscription, until its end."""
    reply = Reply()
    while not reply.done:
        _, data, _ = await asyncio.wait_for(link.incoming.get(), timeout=timeout)
        reply.add(decode(data))
    return reply


async def client(port, messages: list[bytes], session: str, on_half=None, topic=None, **kw) -> Reply:
    """Publish messages (QoS 1, retrying across broker restarts); collect the reply until its end."""
    link = await connect(port, f"test-client-{session}", f"s/{session}/out", **kw)
    for i, m in enumerate(messages):
        if on_half is not None and i == len(messages) // 2:
            await on_half()
        await link.publish(topic or f"s/{session}/in", m)
    reply = await receive(link)
    await link.close()
    return reply


def session_messages(session: str, wave: torch.Tensor) -> list[bytes]:
    msgs = [encode_audio(session, i, wave[s : s + BLOCK].numpy(), 16000) for i, s in enumerate(range(0, len(wave), BLOCK))]
    return msgs + [encode_control(session, len(msgs), {"type": "stop"})]


def as_pcm(reply: Reply) -> np.ndarray:
    return pcm16_encode(reply.audio())


def same_audio(got: np.ndarray, expected: np.ndarray) -> bool:
    """The same PCM16 audio: same length, every sample within one step. The engine's rows agree with
    a session computed alone to float rounding (1e-5), which rounding to PCM16 can turn into one step."""
    return len(got) == len(expected) > 0 and int(np.abs(got.astype(np.int32) - expected.astype(np.int32)).max()) <= 1
