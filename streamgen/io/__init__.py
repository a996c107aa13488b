"""Sources and sinks, chosen by URL-like specs:

    input:  PATH (wav/flac/...), mic, - (raw PCM16 on stdin), mqtt://host:port/topic
    output: PATH (.wav/.flac; {session} for one file per session), speaker, - (raw PCM16 on stdout),
            mqtt://host:port/topic ({session} in the topic for one topic per session)
"""

from __future__ import annotations

from dataclasses import dataclass

from .files import FileSink, FileSource, StdinSource, StdoutSink


@dataclass
class MqttOptions:
    username: str | None = None
    password: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    insecure: bool = False
    qos: int = 1
    client_id: str | None = None
    max_sessions: int | None = None


def open_endpoints(src: str, dst: str, sample_rate: int, *, realtime: bool = False, input_device=None,
                   output_device=None, duration_s: float | None = None, stdin_rate: int | None = None,
                   mqtt: MqttOptions | None = None):
    """(source, sink) for the given specs; a mic and a speaker share one device stream, MQTT input and
    output on one broker share one connection."""
    mqtt = mqtt or MqttOptions()
    device = None
    links: dict = {}

    def get_device():
        nonlocal device
        if device is None:
            from .device import AudioDevice

            device = AudioDevice(sample_rate, input_device, output_device)
        return device

    def get_link(url: str):
        from .mqtt import MqttLink, parse_url, tls_context

        ep = parse_url(url)
        key = (ep.host, ep.port)
        if key not in links:
            ctx = tls_context(mqtt.ca, mqtt.cert, mqtt.key, mqtt.insecure) if (ep.tls or mqtt.ca) else None
            links[key] = MqttLink(ep.host, ep.port, username=ep.username or mqtt.username, password=ep.password or mqtt.password,
                                  tls_context=ctx, client_id=mqtt.client_id, qos=mqtt.qos)
        return links[key], ep.topic

    if src == "mic":
        from .device import MicSource

        source = MicSource(get_device(), duration_s=duration_s)
    elif src == "-":
        source = StdinSource(sample_rate, stdin_rate)
    elif src.startswith(("mqtt://", "mqtts://")):
        from .mqtt import MqttSource

        link, topic = get_link(src)
        source = MqttSource(link, topic, sample_rate, max_sessions=mqtt.max_sessions)
    else:
        source = FileSource(src, sample_rate, realtime=realtime)

    if dst == "speaker":
        from .device import SpeakerSink

        sink = SpeakerSink(get_device())
    elif dst == "-":
        sink = StdoutSink()
    elif dst.startswith(("mqtt://", "mqtts://")):
        from .mqtt import MqttSink

        link, topic = get_link(dst)
        sink = MqttSink(link, topic, sample_rate)
        if src.startswith(("mqtt://", "mqtts://")):
            source.reply_topic = topic  # refusals of sessions the pipeline never saw, and server errors
    else:
        sink = FileSink(dst, sample_rate)
    return source, sink
