"""Simultaneous speech-to-speech translation: wait-k or local agreement over units."""

from streamgen.pipeline.policies import LocalAgreement, UnitDecoder, WaitK
from streamgen.pipeline.tasks import TaskPlugin

POLICIES = ("local-agreement", "wait-k")


def make_policy(decoder: UnitDecoder, policy: str, chunk_ms: int, k: int, ratio: float):
    if policy == "wait-k":
        return WaitK(decoder, k=k, chunk_ms=chunk_ms, ratio=ratio)
    return LocalAgreement(decoder, chunk_ms=chunk_ms, ratio=ratio)


plugin = TaskPlugin(
    name="translation",
    description="Simultaneous speech-to-speech translation, speaking while the talker goes on; "
    "options: policy (local-agreement | wait-k), chunk_ms, k (wait-k, in units), ratio.",
    policy=make_policy,
    options={"policy": "local-agreement", "chunk_ms": 320, "k": 10, "ratio": 1.0},
    choices={"policy": POLICIES},
    ranges={"chunk_ms": (10, 10_000), "k": (0, None), "ratio": (0.1, 10.0)},
)
