"""SimulEval drives streamgen: an agent that runs streamgen's own engine on the source SimulEval
reads, and an ASR-BLEU scorer that hears the output speech with streamgen's recogniser.

Latency only (SimulEval's own command; `--no-scoring` skips its text BLEU, which on speech output
would compare file paths with the references):

    simuleval --agent streamgen/eval/simuleval_agent.py --source-type speech --target-type speech \\
              --source wavs.txt --target refs.txt --output out --no-scoring \\
              --task translation --task-option policy=wait-k [--bundle DIR]

Quality and latency (the same command line through this module, which registers the scorer first):

    python -m streamgen.eval.simuleval_agent --source-type speech --target-type speech \\
              --source wavs.txt --target refs.txt --output out \\
              --quality-metrics STREAMGEN_ASR_BLEU --latency-metrics StartOffset EndOffset AL \\
              --task translation

Sources may have any sample rate (espeak-ng writes 22,050 Hz): they are resampled with soxr to the
bundle's rate as they are read, like every other streamgen input. Each policy call feeds the new
source samples to the engine, lets it work until it has done all it can with them, and writes the
audio that came out; at the end of the source the session is flushed. A source the task cannot answer (no
speech heard) is scored with what it said and logged; the run goes on, as `streamgen eval`'s does.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import soxr
import torch

from streamgen.bundle import BundleError
from streamgen.options import MAX_CHUNK_MS, THREADS_HELP, UsageError, check_task, in_range, parse_kv, set_engine_threads
from streamgen.pipeline.items import AudioChunk, AudioOut, End, SessionError
from streamgen.pipeline.runner import build_engine

try:
    from simuleval.agents import SpeechToSpeechAgent
    from simuleval.agents.actions import ReadAction, WriteAction
    from simuleval.data.segments import SpeechSegment
    from simuleval.evaluator.scorers.quality_scorer import QualityScorer, add_sacrebleu_args, register_quality_scorer
    from simuleval.utils import entrypoint
except ImportError as e:  # pragma: no cover - only where simuleval is missing
    raise ImportError("the SimulEval agent needs simuleval: pip install 'streamgen[dev]' (or pip install simuleval)") from e

SESSION = "simuleval"
log = logging.getLogger("streamgen")


@entrypoint
class StreamgenAgent(SpeechToSpeechAgent):
    def __init__(self, args, bundle=None):
        super().__init__(args)
        import streamgen

        self.task, self.chunk_ms = args.task, args.chunk_ms
        try:  # a mistake in the command line: one line and exit 2, as streamgen's own commands say it
            in_range("--chunk-ms", self.chunk_ms, 10, MAX_CHUNK_MS, "ms")
            self.options = parse_kv(args.task_option, "--task-option")
            set_engine_threads(getattr(args, "threads", None), args.device)  # as `streamgen run`: its latencies are a live session's
            self.bundle = bundle if bundle is not None else streamgen.load_bundle(args.bundle, device=args.device)
            check_task(self.task, self.options, bundle=self.bundle)
        except (UsageError, BundleError, ValueError) as e:
            sys.stderr.write(f"error: {e}\n")
            raise SystemExit(2) from None
        self.reset()

    @staticmethod
    def add_args(parser):
        parser.add_argument("--bundle", default=None, help="streamgen bundle directory (default: the one shipped with streamgen)")
        parser.add_argument("--task", default="translation", help="task plugin (see `streamgen tasks`)")
        parser.add_argument("--task-option", action="append", help="task option KEY=VALUE (repeatable)")
        parser.add_argument("--chunk-ms", type=int, default=320, help="engine chunk size in ms")
        parser.add_argument("--device", default="cpu")
        parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)

    def reset(self) -> None:
        super().reset()
        if not hasattr(self, "bundle"):  # the base constructor resets before the bundle is loaded
            return
        self.engine = build_engine(self.bundle, self.task, self.options, chunk_ms=self.chunk_ms)
        self.outputs: list = []
        self.engine.emit = self.outputs.append
        self.engine.open(SESSION)
        self.source_index = getattr(self, "source_index", -1) + 1
        self.resampler: soxr.ResampleStream | None = None
        self.read = 0  # source samples (at the source rate) already fed
        self.fed = 0  # samples at the bundle's rate already fed
        self.done = False

    def run(self, item) -> list:
        """Hand one item to the session and tick the engine until it has done all it can with it;
        what came out."""
        s = self.engine.sessions.get(SESSION)
        if s is not None:
            s.inbox.append(item)
            while SESSION in self.engine.sessions and (not s.idle or s.input_ended):
                self.engine.tick()
        out = list(self.outputs)
        self.outputs.clear()
        return out

    def policy(self, states=None):
        states = states or self.states
        if self.done:
            return ReadAction()
        finished = states.source_finished
        if states.source_sample_rate <= 0:  # a source without samples: nothing to say, and nothing to resample
            if not finished:
                return ReadAction()
            self.done = True
            return WriteAction(SpeechSegment(content=[], sample_rate=self.bundle.sample_rate, finished=True), finished=True)
        if self.resampler is None:
            self.resampler = soxr.ResampleStream(states.source_sample_rate, self.bundle.sample_rate, 1, dtype="float32", quality="HQ")
        new = np.asarray(states.source[self.read :], dtype=np.float32)
        self.read += len(new)
        if new.ndim == 2:  # several channels: mixed to mono, as every streamgen input is
            new = new.mean(axis=1)
        x = self.resampler.resample_chunk(new, last=finished)
        out = []
        if len(x):
            out += self.run(AudioChunk(SESSION, 0, torch.from_numpy(x.copy()), self.fed, 0.0))
            self.fed += len(x)
        if finished:
            out += self.run(End(SESSION, self.fed, 0.0))
            self.done = True
        for e in out:  # (no speech heard, say): this source is scored with what it said; the run goes on, as `eval`'s does
            if isinstance(e, SessionError):
                log.warning("source %d: %s", self.source_index, e.message)
        audio = [x.samples for x in out if isinstance(x, AudioOut)]
        if audio or finished:
            samples = torch.cat(audio).tolist() if audio else []
            return WriteAction(SpeechSegment(content=samples, sample_rate=self.bundle.sample_rate, finished=finished), finished=finished)
        return ReadAction()


@register_quality_scorer("STREAMGEN_ASR_BLEU")
class StreamgenASRBLEU(QualityScorer):
    """ASR-BLEU with streamgen's own recogniser (Whisper tiny.en from disk, `streamgen.eval.asr`):
    each output wav is transcribed and scored with sacreBLEU against the references; the
    transcripts go to OUTPUT/asr_transcripts.txt."""

    def __init__(self, tokenizer: str = "13a"):
        super().__init__()
        self.tokenizer = tokenizer

    def __call__(self, instances: dict) -> float:
        from sacrebleu.metrics.bleu import BLEU

        from streamgen.eval.asr import WhisperASR
        from streamgen.eval.metrics import normalize
        from streamgen.io.files import read_audio

        asr = WhisperASR()
        hyps = []
        for ins in instances.values():
            wav = Path(ins.prediction)
            hyps.append(asr.transcribe(read_audio(wav, 16000).numpy()) if wav.is_file() and wav.stat().st_size > 44 else "")
        if instances:
            out = Path(next(iter(instances.values())).prediction).parent.parent / "asr_transcripts.txt"
            out.write_text("".join(h + "\n" for h in hyps))
        # normalised as `streamgen eval` scores (numbers spelled out, lower case, no punctuation): Whisper writes
        # "8:35." where a reference says "eight thirty-five", and the two scorers must agree
        refs = [normalize(ins.reference) for ins in instances.values()]
        return BLEU(tokenize=self.tokenizer).corpus_score([normalize(h) for h in hyps], [refs]).score

    @staticmethod
    def add_args(parser):
        add_sacrebleu_args(parser)

    @classmethod
    def from_args(cls, args):
        return cls(args.sacrebleu_tokenizer)


if __name__ == "__main__":  # SimulEval's command line, with this agent and the scorer registered
    from simuleval.cli import main

    main()
