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


def test_an_end_whose_sender_is_cancelled_while_the_inbox_is_full_still_reaches_the_engine():
    """A front end cancelled inside `put(End)` (its client vanished while the engine was behind and the
    shared inbox full) has already closed the session's input, so nothing else would end it: the End
    must still arrive, or the session holds its slot for good."""

    async def main():
        hub = Hub(Stats(16000), ServeMetrics(), inbox_size=2)
        for name in ("mine", "other"):
            assert hub.open(name, Recorder(), "ws") is None
        await hub.put(SessionError("other", "a"))
        await hub.put(SessionError("other", "b"))  # the inbox is full
        stop = asyncio.ensure_future(hub.put(End("mine", 0)))
        await asyncio.sleep(0.05)
        assert not stop.done()  # waiting for room
        stop.cancel()
        await asyncio.gather(stop, return_exceptions=True)
        await hub.abort("mine", "the client disconnected")  # what the front end does next: nothing, input is closed
        got = []
        for _ in range(3):
            got.append(await asyncio.wait_for(hub.inbox.get(), 1))
        return got

    got = asyncio.run(main())
    assert [(type(i).__name__, i.session) for i in got] == [("SessionError", "other"), ("SessionError", "other"), ("End", "mine")]


def test_a_cluster_session_whose_output_outruns_the_broker_is_ended_not_buffered_for_ever():
    """A worker's output waits for the broker in one queue; when the broker falls that far behind,
    a session's next audio ends that session with an error saying so, instead of growing the queue."""
    import torch

    from streamgen.serve.cluster import MAX_OUTBOX, ClusterLink, ClusterOptions, _Route, _Session

    async def main():
        hub = Hub(Stats(16000), ServeMetrics())
        link = ClusterLink(hub, ClusterOptions("127.0.0.1", 1883, "sg", "w1"))  # never connected: the broker takes nothing
        s = _Session("talker", "mqtt/talker")
        route = _Route(link, s)
        assert hub.open(s.hub_id, route, "mqtt") is None
        for _ in range(MAX_OUTBOX):
            route.audio(s.hub_id, torch.zeros(320))
        route.audio(s.hub_id, torch.zeros(320))  # one too many
        route.audio(s.hub_id, torch.zeros(320))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return link.outbox.qsize(), [hub.inbox.get_nowait() for _ in range(hub.inbox.qsize())]

    queued, items = asyncio.run(main())
    assert queued == MAX_OUTBOX
    assert [type(i).__name__ for i in items] == ["SessionError", "End"]
    assert "the broker takes this worker's output slower than it is made" in items[0].message


def test_a_client_sending_far_faster_than_real_time_is_ended_and_others_are_not():
    """All clients share one way into the engine: a session whose audio runs more than MAX_AHEAD_S
    ahead of the time since it opened is ended with an error saying so, before it can crowd out the
    others (a client sending 2 s frames as fast as it can got a hundred times the page's share)."""
    import torch

    from streamgen.pipeline.items import AudioChunk
    from streamgen.audio import MAX_AHEAD_S

    async def main():
        hub = Hub(Stats(16000), ServeMetrics(), inbox_size=1000)
        for name in ("flood", "talker"):
            assert hub.open(name, Recorder(), "ws") is None
        for i in range(int(MAX_AHEAD_S) + 2):  # one second per message, all at once
            await hub.put(AudioChunk("flood", i, torch.zeros(16000), 16000 * i, 0.0))
        await hub.put(AudioChunk("talker", 0, torch.zeros(3200), 0, 0.0))  # 0.2 s: within its allowance
        return [hub.inbox.get_nowait() for _ in range(hub.inbox.qsize())]

    items = asyncio.run(main())
    flood = [i for i in items if i.session == "flood"]
    assert [type(i).__name__ for i in flood] == ["AudioChunk"] * int(MAX_AHEAD_S) + ["SessionError", "End"]
    assert "ahead of real time (at most 10 s): this is a live service; send audio at the pace it is spoken" in flood[-2].message
    assert [type(i).__name__ for i in items if i.session == "talker"] == ["AudioChunk"]
