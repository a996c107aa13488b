"""The serve hub's bookkeeping, in process: an engine's busy refusal reaches the client and counts."""

import asyncio

from streamgen.pipeline.items import End, SessionError
from streamgen.pipeline.stats import Stats
from streamgen.serve.hub import Hub
from streamgen.serve.metrics import ServeMetrics


class Recorder:
    def __init__(self):
        self.controls = []

    def audio(self, session, samples):
        pass

    def control(self, session, body):
        self.controls.append(body)

    def ended(self, session):
        pass


def test_an_engine_busy_refusal_reaches_the_client_and_the_refused_count():
    async def main():
        metrics = ServeMetrics()
        hub = Hub(Stats(16000), metrics)
        route = Recorder()
        assert hub.open("ws-1", route, "ws") is None
        await hub.write(SessionError("ws-1", "busy: the server is 2.0 s behind real time with 3 live sessions; try again later"))
        await hub.write(End("ws-1"))
        return route, metrics

    route, metrics = asyncio.run(main())
    assert route.controls[0]["type"] == "error" and route.controls[0]["message"].startswith("busy:")
    assert route.controls[-1] == {"type": "end"}
    assert metrics.refused.labels(reason="busy")._value.get() == 1
