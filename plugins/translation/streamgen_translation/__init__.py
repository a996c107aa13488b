"""Simultaneous speech-to-speech translation: wait-k or local agreement over units."""

from streamgen.pipeline.policies import LocalAgreement, UnitDecoder, WaitK, streaming_refusal
from streamgen.pipeline.tasks import TaskPlugin

POLICIES = ("local-agreement", "wait-k")


def make_policy(decoder: UnitDecoder, policy: str, chunk_ms: int, k: int, ratio: float, lookahead: int):
    if policy == "wait-k":
        return WaitK(decoder, k=k, chunk_ms=chunk_ms, ratio=ratio)
    return LocalAgreement(decoder, chunk_ms=chunk_ms, ratio=ratio, lookahead=lookahead)


def check_options(options: dict, input_s, bundle) -> None:
    if options["lookahead"] and options["policy"] != "local-agreement":
        raise ValueError(f"task 'translation': option lookahead={options['lookahead']} is for policy=local-agreement "
                         f"(policy={options['policy']} decodes only what it commits): add --opt policy=local-agreement or drop it")
    if bundle is not None and bundle.has_backbone("translation"):  # a backbone trained to stream takes its own wait-k only
        why = streaming_refusal(bundle.backbone("translation").cfg, options["policy"], options["k"], options["ratio"])
        if why:
            raise ValueError(f"task 'translation': {why}")


plugin = TaskPlugin(
    name="translation",
    description="Simultaneous speech-to-speech translation, speaking while the talker goes on; "
    "options: policy (wait-k | local-agreement), chunk_ms, k (wait-k, in units), ratio, "
    "lookahead (local agreement: most units decoded past the committed ones per decision; 0: all).",
    policy=make_policy,
    options={"policy": "wait-k", "chunk_ms": 320, "k": 30, "ratio": 1.0, "lookahead": 0},
    choices={"policy": POLICIES},
    ranges={"chunk_ms": (10, 10_000), "k": (0, None), "ratio": (0.1, 10.0), "lookahead": (0, None)},
    validate=check_options,
)
