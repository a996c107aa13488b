"""Send a WAV to a streamgen MQTT session in 20 ms messages and save the spoken reply.

Start a server first:
    streamgen run --task translation --in "mqtt://127.0.0.1:1883/sessions/+/in" \\
                  --out "mqtt://127.0.0.1:1883/sessions/{session}/out" --stats
then:
    python examples/mqtt_translate_client.py talk.wav reply.wav [--session alice] [--host 127.0.0.1] [--fast]
"""

import argparse
import asyncio

import soundfile as sf

from streamgen.io.files import read_audio
from streamgen.io.mqtt import MqttLink, Reply, decode, encode_audio, encode_control

ap = argparse.ArgumentParser()
ap.add_argument("wav")
ap.add_argument("reply")
ap.add_argument("--session", default="alice")
ap.add_argument("--host", default="127.0.0.1")
ap.add_argument("--port", type=int, default=1883)
ap.add_argument("--fast", action="store_true",
                help="send as fast as the broker takes it (the server ends a session more than 10 s ahead of real time)")
args = ap.parse_args()


async def main():
    wave = read_audio(args.wav, 16000).numpy()
    link = MqttLink(args.host, args.port, client_id=f"client-{args.session}")  # reconnects, retries at QoS 1
    link.subscriptions.append(f"sessions/{args.session}/out")
    link.start()
    await link.connected.wait()
    topic = f"sessions/{args.session}/in"
    await link.publish(topic, encode_control(args.session, 0, {"type": "start", "task": "translation"}))
    seq = 1
    for i in range(0, len(wave), 320):
        await link.publish(topic, encode_audio(args.session, seq, wave[i : i + 320], 16000))
        seq += 1
        if not args.fast:  # at the speed of speech, as a live talker
            await asyncio.sleep(0.02)
    await link.publish(topic, encode_control(args.session, seq, {"type": "stop"}))
    reply = Reply()  # follows the reply stream from its start; drops repeats; notices lost messages
    while not reply.done:
        _, data, _ = await link.incoming.get()
        reply.add(decode(data))
    await link.close()
    if reply.error:
        raise SystemExit(f"server error: {reply.error}")
    if reply.missing:
        print(f"warning: {len(reply.missing)} reply messages were lost (read faster, or raise the broker's queue limit)")
    reply = reply.audio()
    sf.write(args.reply, reply, 16000)
    print(f"sent {len(wave) / 16000:.2f} s, received {len(reply) / 16000:.2f} s -> {args.reply}")


asyncio.run(main())
