"""A SimulEval agent that runs streamgen's own pipeline stages, so SimulEval can drive streamgen:

    simuleval --agent streamgen/eval/simuleval_agent.py --source-type speech --target-type speech \\
              --source wavs.txt --target refs.txt --output out --no-scoring \\
              --bundle DIR --task translation --task-option policy=wait-k

(run like this with simuleval 1.1.4; its speech-output scoring needs its own ASR extras, so score
with `streamgen eval`, whose latency figures are checked against SimulEval's scorers).

Each policy call feeds the source samples SimulEval has read so far through the chunker, unit
encoder, generator and vocoder (the same classes as `streamgen run`, called in order instead of
through queues) and writes whatever audio came out; at the end of the source the stages flush.
"""

from __future__ import annotations

import torch

from streamgen.pipeline.items import AudioChunk, AudioOut, Control, End, SessionError
from streamgen.pipeline.runner import build_stages

try:
    from simuleval.agents import SpeechToSpeechAgent
    from simuleval.agents.actions import ReadAction, WriteAction
    from simuleval.data.segments import SpeechSegment
    from simuleval.utils import entrypoint
except ImportError as e:  # pragma: no cover - only where simuleval is missing
    raise ImportError("the SimulEval agent needs simuleval: pip install simuleval") from e


def run_stages(stages, item) -> list:
    """Push one item through the stages in order; everything that comes out of the last one."""
    items = [item]
    for stage in stages:
        items = [out for x in items for out in stage.process(x)]
    return items


@entrypoint
class StreamgenAgent(SpeechToSpeechAgent):
    def __init__(self, args, bundle=None):
        super().__init__(args)
        import streamgen
        if bundle is None:  # no --bundle: the default bundle shipped with streamgen
            bundle = streamgen.load_bundle(args.bundle, device=args.device)
        self.bundle = bundle
        self.task, self.options, self.chunk_ms = args.task, dict(kv.split("=", 1) for kv in args.task_option or []), args.chunk_ms
        self.reset()

    @staticmethod
    def add_args(parser):
        parser.add_argument("--bundle", default=None, help="streamgen bundle directory (default: a tiny random one)")
        parser.add_argument("--task", default="translation")
        parser.add_argument("--task-option", action="append", help="KEY=VALUE")
        parser.add_argument("--chunk-ms", type=int, default=320)
        parser.add_argument("--device", default="cpu")

    def reset(self) -> None:
        super().reset()
        if not hasattr(self, "bundle"):  # the base constructor resets before the bundle is loaded
            return
        self.stages = build_stages(self.bundle, self.task, self.options, chunk_ms=self.chunk_ms)
        self.session = "simuleval"
        self.read = 0  # source samples already fed
        self.done = False
        run_stages(self.stages, Control(self.session, "start", self.task, self.options))

    def policy(self, states=None):
        states = states or self.states
        if self.done:
            return ReadAction()
        new = states.source[self.read :]
        out = []
        if new:
            chunk = torch.tensor(new, dtype=torch.float32)
            out += run_stages(self.stages, AudioChunk(self.session, 0, chunk, self.read, 0.0))
            self.read += len(new)
        finished = states.source_finished
        if finished:
            out += run_stages(self.stages, End(self.session, self.read, 0.0))
            self.done = True
        errors = [x.message for x in out if isinstance(x, SessionError)]
        if errors:
            raise RuntimeError("; ".join(errors))
        audio = [x.samples for x in out if isinstance(x, AudioOut)]
        if audio or finished:
            samples = torch.cat(audio).tolist() if audio else []
            return WriteAction(SpeechSegment(content=samples, sample_rate=self.bundle.sample_rate, finished=finished), finished=finished)
        return ReadAction()
