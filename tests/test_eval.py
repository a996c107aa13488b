"""Evaluation metrics on hand-computed cases, and the Whisper ASR on real speech."""

import numpy as np
import pytest
from speech import espeak, piper

from streamgen.eval.metrics import aligned_span, average_lagging, bleu, cer, distinct_ngrams, normalize, span_words, wer


def test_average_lagging_by_hand():
    # |X| = 5, |Y| = 4, gamma = 0.8; tau = 4 (d_4 = 5 >= |X|)
    # AL = ((2 - 0) + (3 - 1.25) + (4 - 2.5) + (5 - 3.75)) / 4 = 6.5 / 4
    assert average_lagging([2, 3, 4, 5], 5) == pytest.approx(1.625)
    # tau stops at the first delay that reaches the end of the source; later ones do not count
    assert average_lagging([1, 5, 5, 5], 5) == pytest.approx(((1 - 0) + (5 - 1.25)) / 2)
    # a reference length changes gamma: |Y| = 2 -> gamma = 0.4
    assert average_lagging([2, 3, 4, 5], 5, target_len=2) == pytest.approx(((2 - 0) + (3 - 2.5) + (4 - 5) + (5 - 7.5)) / 4)
    assert average_lagging([7, 8], 5) == 7  # the first output came after the whole source
    with pytest.raises(ValueError):
        average_lagging([], 5)


def test_wer_cer_bleu_by_hand():
    assert wer(["the cat sat"], ["The cat sit on."]) == pytest.approx(2 / 3)  # 1 substitution + 1 insertion
    assert wer(["a b c d"], [""]) == 1.0
    assert cer(["abcd"], ["abed"]) == pytest.approx(1 / 4)
    assert cer(["hi"], [""]) == cer(["good morning everyone"], [" ... "]) == 1.0  # nothing heard: every character missed
    assert bleu(["the cat is on the mat"], ["The cat is on the mat!"]) == pytest.approx(100.0)
    assert bleu(["the cat is on the mat"], ["dogs run fast"]) == pytest.approx(0.0)
    assert normalize("  Hello,   World!  ") == "hello world"
    # Whisper writes digits; the corpus spells numbers out with num2words
    assert normalize("On Wednesday, 19th of August 1993.") == normalize("on Wednesday nineteenth of August one thousand, nine hundred and ninety-three")
    assert normalize("It's 8:35, 8:00 and 1,250 people, 40%") == "it's eight thirty five eight and one thousand two hundred and fifty people forty percent"
    assert wer(["the meeting starts at eight thirty-five"], ["The meeting starts at 8:35."]) == 0.0
    assert normalize("at 8.30 sharp") == "at eight thirty sharp"
    assert distinct_ngrams([1, 2, 1, 2, 1, 2], 2) == pytest.approx(2 / 5)


def test_span_alignment_by_hand():
    ref = "a b c d e".split()
    assert aligned_span(ref, 1, 4, "a x c e".split()) == ["x", "c"]  # b -> x, c kept, d deleted
    assert aligned_span(ref, 1, 4, "a b q c d e".split()) == ["b", "q", "c", "d"]  # an insertion inside the span
    assert aligned_span(ref, 1, 4, "q a b c d e".split()) == ["b", "c", "d"]  # one outside it is not the span's
    assert aligned_span(ref, 1, 4, []) == []
    words = [("Good", 0.0, 0.4), ("morning,", 0.4, 0.9), ("1993.", 1.0, 1.6)]
    flat, i0, i1 = span_words(words, 0.5, 2.0)
    assert flat[i0:i1] == normalize("morning one thousand nine hundred and ninety three").split() and flat[:i0] == ["good"]


def test_whisper_transcribes_real_speech():
    import torch

    from streamgen.eval.asr import WhisperASR

    torch.set_num_threads(1)
    asr = WhisperASR()
    assert torch.get_num_threads() == 1  # CTranslate2 resets OpenMP's count as it loads; the engine's setting stays
    text = asr.transcribe(piper("Good morning everyone, the weather is lovely today.").numpy())
    assert wer(["good morning everyone the weather is lovely today"], [text]) <= 0.3, text
    assert asr.transcribe(espeak("").numpy()[:100]) == ""
    from streamgen.eval.metrics import sounds_like_speech

    speech = piper("Could you tell me where the nearest bus stop is?").numpy()
    assert sounds_like_speech(*asr.hear(speech))
    noise = np.random.default_rng(0).standard_normal(len(speech)).astype(np.float32) * 0.1
    assert not sounds_like_speech(*asr.hear(noise)) and asr.hear(np.zeros(800, np.float32)) == ("", 1.0)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    from streamgen.train.synth import synth

    out = tmp_path_factory.mktemp("evalcorpus")
    synth(out, 0, 0, 2, seed=1, progress=False)
    return out


@pytest.mark.parametrize("task", ["resynthesis", "continuation", "inpainting", "translation"])
def test_eval_reports_quality_latency_and_a_plot(small_corpus, tmp_path, task, test_bundle):
    import json

    from streamgen.eval.asr import WhisperASR
    from streamgen.eval.run import evaluate

    manifest = small_corpus / ("es2en_test_src.tsv" if task == "translation" else "en_test.tsv")
    refs = small_corpus / "es2en_test_tgt.tsv" if task == "translation" else None
    res = evaluate(test_bundle, task, manifest, tmp_path, references=refs, chunk_ms=[160, 320], realtime=task == "resynthesis",
                   options={"max_units": 20, "min_units": 10} if task == "continuation" else None, asr=WhisperASR(), progress=False)
    assert [c["chunk_ms"] for c in res["chunks"]] == [160, 320]
    c = res["chunks"][0]
    assert c["n"] == 2 and c["errors"] == 0 and 0 <= c["wer"] and 0 <= c["asr_bleu"] <= 100
    assert c["start_offset_ms"] is not None and c["rtf"] > 0
    if task == "resynthesis":  # paced: compute-aware latency is measured and at least the ideal one
        assert c["al_ca_ms"] is not None and c["start_offset_ca_ms"] >= c["start_offset_ms"] - 50
    else:
        assert c["al_ca_ms"] is None
    if task == "continuation":
        assert 0 < c["distinct_2"] <= 1 and "intelligible" in c
        # a random tiny bundle babbles: its outputs and the babble baseline are judged alike
        assert all(isinstance(u["speech_like"], bool) and isinstance(u["babble_speech_like"], bool) for u in c["utterances"])
        assert c["speech_like"] == sum(u["speech_like"] for u in c["utterances"]) / 2
    if task == "inpainting":
        assert "baseline_wer" in c and all(0 < u["mask"][0] < u["mask"][1] for u in c["utterances"])
        # the span's words come from the original speech; copying the context leaves the gap silent
        assert c["span_words"] > 0 and c["baseline_span_wer"] >= 0.5 and 0 <= c["span_wer"]
    assert json.loads((tmp_path / "results.json").read_text())["task"] == task
    assert "| chunk_ms |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "quality_vs_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("task", ["resynthesis", "inpainting"])
def test_an_interrupted_eval_resumes_where_it_stopped(small_corpus, tmp_path, test_bundle, task):
    """Results were written only at the end: an interrupt after hours lost every utterance scored. A resumed run
    scores what the whole run scores (inpainting's spans included), after a line the interrupt cut, and only
    for the same evaluation."""
    import json

    from streamgen.eval.asr import WhisperASR
    from streamgen.eval.run import evaluate
    from streamgen.train.synth import read_manifest

    whisper = WhisperASR()

    class Heard:  # the real recogniser, counting what it hears; `stop_at` plays the user's Ctrl-C
        def __init__(self, stop_at=None):
            self.n, self.stop_at = 0, stop_at

        def hear(self, wave):
            self.n += 1
            if self.n == self.stop_at:
                raise KeyboardInterrupt
            return whisper.hear(wave)

        def __getattr__(self, name):  # transcribe, transcribe_words: as the recogniser does
            return getattr(whisper, name)

    run = dict(chunk_ms=[320], realtime=False, progress=False, identity={"bundle": "tiny 1"})
    manifest = small_corpus / "en_test.tsv"
    straight = evaluate(test_bundle, task, manifest, tmp_path / "a", asr=Heard(), **run)
    with pytest.raises(KeyboardInterrupt):
        evaluate(test_bundle, task, manifest, tmp_path / "b", asr=Heard(stop_at=2), **run)
    log = tmp_path / "b" / "utterances.jsonl"
    assert len(log.read_text().splitlines()) == 1
    with log.open("a") as f:
        f.write('{"run": {"task": "res')  # a line the interrupt cut
    for other, named in [({"seed": 1}, "seed 0 \\(now 1\\)"), ({"identity": {"bundle": "tiny 2"}}, "bundle 'tiny 1' \\(now 'tiny 2'\\)")]:
        with pytest.raises(ValueError, match="holds another evaluation's utterances .*" + named):
            evaluate(test_bundle, task, manifest, tmp_path / "b", asr=Heard(), resume=True, **{**run, **other})
    again = Heard()
    resumed = evaluate(test_bundle, task, manifest, tmp_path / "b", asr=again, resume=True, **run)
    assert again.n == 1  # only the utterance the interrupt cut
    ours, theirs = resumed["chunks"][0], straight["chunks"][0]
    for key in ("hypothesis", "mask"):
        assert [u.get(key) for u in ours["utterances"]] == [u.get(key) for u in theirs["utterances"]], key
    assert ours["wer"] == theirs["wer"] and ours["n"] == 2
    assert [json.loads(line)["utterance"]["id"] for line in log.read_text().splitlines()] == [r["id"] for r in read_manifest(manifest)]


def test_latency_agrees_with_simuleval_scorers(tmp_path):
    """SimulEval (where it installs) scores the same delays: AL, StartOffset, and EndOffset through
    its own speech-output playback (SpeechOutputInstance.summarize)."""
    L = pytest.importorskip("simuleval.evaluator.scorers.latency_scorer", reason="simuleval is not installed")
    from simuleval.evaluator.instance import SpeechOutputInstance

    from streamgen.pipeline.stats import SessionStats

    class Instance(SpeechOutputInstance):
        source_length = wav_path = None  # plain values here, not derived from files and arguments

    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 12))
        src_ms = float(rng.uniform(500, 5000))
        delays = sorted(float(d) for d in rng.uniform(0, src_ms * 1.2, n))
        durations = [float(x) for x in rng.integers(20, 900, n)]  # whole ms: samples at a "1 kHz" rate

        class Fixed(L.ALScorer):
            def get_delays_lengths(self, ins):
                return delays, src_ms, n

        assert Fixed().compute(None) == pytest.approx(average_lagging(delays, src_ms))

        ins = Instance.__new__(Instance)  # its playback code, with our delays
        ins.index, ins.reference, ins.source_length, ins.target_sample_rate = 0, None, src_ms, 1000
        ins.delays, ins.durations = delays, durations
        ins.prediction_list = [[0.0] * int(d) for d in durations]
        ins.wav_path = tmp_path / "p.wav"
        ins.dataloader = type("D", (), {"get_source_audio_path": lambda self, i: "src.wav"})()
        ins.summarize()
        ours = SessionStats("x", 1000, started_at=0.0, input_samples=int(src_ms))
        ours.input_samples = src_ms  # ms at a "1 kHz" rate: durations are sample counts
        ours.outputs = [(d, 0.0, int(t)) for d, t in zip(delays, durations)]
        start, end = ours.offsets(delays)
        assert start == L.StartOffsetScorer().compute(ins)
        assert end == pytest.approx(L.EndOffsetScorer().compute(ins), abs=1e-9)


def test_simuleval_agent_drives_the_same_stages(test_bundle):
    """SimulEval's agent machinery (push/pop of speech segments) gets exactly the pipeline's audio."""
    import argparse
    import asyncio

    import torch

    pytest.importorskip("simuleval", reason="simuleval is not installed")
    from simuleval.data.segments import SpeechSegment

    from streamgen.eval.simuleval_agent import StreamgenAgent
    from streamgen.io.memory import MemorySink, MemorySource, chunks_of
    from streamgen.pipeline.runner import Pipeline, build_engine
    from streamgen.pipeline.stats import Stats

    wave = espeak("Good morning, how are you today?")
    options = {"policy": "wait-k", "k": "5"}
    args = argparse.Namespace(bundle=None, task="translation", task_option=[f"{k}={v}" for k, v in options.items()], chunk_ms=320, device="cpu", threads=2)
    agent = StreamgenAgent(args, bundle=test_bundle)
    assert torch.get_num_threads() == 2  # --threads, as `streamgen run` takes it
    pieces = []
    for i in range(0, len(wave), 5120):
        out = agent.pushpop(SpeechSegment(content=wave[i : i + 5120].tolist(), sample_rate=16000, finished=i + 5120 >= len(wave)))
        if not out.is_empty:
            pieces.append(torch.tensor(out.content))
    got = torch.cat(pieces)
    early = sum(len(p) for p in pieces[:-1])  # audio written before the source ended

    sink = MemorySink()
    asyncio.run(Pipeline(MemorySource(chunks_of("s", wave, 1600)), build_engine(test_bundle, "translation", options, chunk_ms=320),
                         sink, Stats(16000)).run())
    assert len(got) > 0 and torch.allclose(got, sink.wave("s"), atol=1e-6)
    assert early > 0  # SimulEval saw simultaneous output, not everything at the end


def test_eval_cli_runs_the_baselines(small_corpus, tmp_path, test_bundle, monkeypatch):
    """`--no-prompt` runs the unprompted backbone, `--mbart` swaps in fine-tuned weights; bad use is named."""
    import json

    import torch

    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from streamgen.cli import app

    test_bundle.save(tmp_path / "b")
    weights = {k: v + 0.01 for k, v in test_bundle.mbart.state_dict().items()}
    save_file(weights, tmp_path / "full.safetensors")
    base = ["eval", "--task", "continuation", "--manifest", str(small_corpus / "en_test.tsv"), "--bundle", str(tmp_path / "b"),
            "--limit", "1", "--no-realtime", "--opt", "max_units=10"]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    r = CliRunner().invoke(app, base + ["--out", str(tmp_path / "e"), "--no-prompt", "--mbart", str(tmp_path / "full.safetensors")])
    assert r.exit_code == 0, r.output
    assert torch.get_num_threads() == 1  # the engine's setting, as `run`'s: its latencies are a live session's
    assert json.loads((tmp_path / "e" / "results.json").read_text())["chunks"][0]["n"] == 1
    (tmp_path / "bad.safetensors").write_bytes(b"not weights")
    r = CliRunner().invoke(app, base + ["--out", str(tmp_path / "x"), "--mbart", str(tmp_path / "bad.safetensors")])
    assert r.exit_code == 2 and "bad.safetensors: cannot replace the bundle's Unit mBART" in r.output
    r = CliRunner().invoke(app, base + ["--out", str(tmp_path / "x"), "--no-prompt", "--prompt", str(tmp_path / "p")])
    assert r.exit_code == 2 and "exclude each other" in r.output


def test_eval_names_a_test_set_it_cannot_score_before_evaluating_anything(tmp_path):
    """Each of these used to fail midway (after the first utterances had been streamed and transcribed) with
    an IndexError / KeyError, or to score silently against the wrong reference (ids used twice)."""
    import soundfile as sf

    from streamgen.eval.run import evaluate

    sf.write(tmp_path / "a.wav", np.zeros(16000, np.float32), 16000)
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    (tmp_path / "afile").write_text("x")

    def tsv(name, *lines):
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        return tmp_path / name

    good = tsv("good.tsv", "id\taudio\ttext", "u1\ta.wav\thello")
    cases = [
        (tsv("none.tsv", "id\taudio\ttext"), None, "none.tsv: the manifest has no rows"),
        (tsv("dup.tsv", "id\taudio\ttext", "u1\ta.wav\thello world", "u1\ta.wav\tgood morning"), None,
         "dup.tsv:3: id 'u1' again; each utterance needs an id of its own"),
        (tsv("notext.tsv", "id\taudio", "u1\ta.wav"), None, "notext.tsv: the manifest needs a text column (the reference), or give --references"),
        (good, tsv("refs.tsv", "id\taudio\ttext", "u9\ta.wav\thi"), "refs.tsv: no reference for 1 of the manifest's ids (first: 'u1')"),
        (tsv("gone.tsv", "id\taudio\ttext", "u1\ta.wav\thi", "u2\tnope.wav\thi"), None, f"gone.tsv:3: {tmp_path / 'nope.wav'}: no such file"),
        (tsv("zero.tsv", "id\taudio\ttext", "u1\tempty.wav\thi"), None, "zero.tsv:2: empty.wav holds no audio samples"),
    ]
    for manifest, refs, message in cases:
        with pytest.raises(ValueError) as e:
            evaluate(None, "resynthesis", manifest, tmp_path / "out", references=refs, asr=object())
        assert message in str(e.value), (manifest.name, str(e.value))
    with pytest.raises(ValueError, match="--out .*afile is a file; give a directory"):
        evaluate(None, "resynthesis", good, tmp_path / "afile", asr=object())
    assert not (tmp_path / "out").exists()


def test_simuleval_agent_names_bad_options_in_one_line_and_goes_on_past_a_source_it_cannot_answer(test_bundle, capsys):
    """A bad option was a traceback; a source with no speech (or stereo, or empty) ended the whole SimulEval run."""
    import argparse

    import torch

    pytest.importorskip("simuleval", reason="simuleval is not installed")
    from simuleval.data.segments import SpeechSegment

    from streamgen.eval.simuleval_agent import StreamgenAgent

    def args(**kw):
        return argparse.Namespace(**{"bundle": None, "task": "resynthesis", "task_option": None, "chunk_ms": 320, "device": "cpu",
                                     "threads": 1, **kw})

    for bad, message in [({"chunk_ms": 0}, "error: --chunk-ms 0: must be from 10 to 10000 ms\n"),
                         ({"task": "nosuch"}, "error: unknown task 'nosuch'"),
                         ({"task_option": ["durations=bogus"]}, "error: task 'resynthesis': option durations=")]:
        with pytest.raises(SystemExit) as e:
            StreamgenAgent(args(**bad), bundle=test_bundle)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err

    agent = StreamgenAgent(args(), bundle=test_bundle)
    silence = agent.pushpop(SpeechSegment(content=[0.0] * 16000, sample_rate=16000, finished=True))
    assert silence.finished and silence.content == []  # no speech heard: logged, scored as silence, no exception
    agent.reset()
    empty = agent.pushpop(SpeechSegment(content=[], sample_rate=0, finished=True))
    assert empty.finished and empty.content == []
    wave = espeak("The weather is nice today.")
    agent.reset()
    mono = agent.pushpop(SpeechSegment(content=wave.tolist(), sample_rate=16000, finished=True))
    agent.reset()
    stereo = agent.pushpop(SpeechSegment(content=torch.stack([wave, wave], 1).tolist(), sample_rate=16000, finished=True))
    assert len(mono.content) > 0 and torch.allclose(torch.tensor(stereo.content), torch.tensor(mono.content), atol=1e-6)


def test_simuleval_asr_bleu_scores_as_streamgen_eval_does(tmp_path):
    """It scored raw transcripts against the references: "Good morning, how are you?" against the corpus's
    "good morning how are you" lost 27 points for case and punctuation."""
    import types

    import soundfile as sf

    pytest.importorskip("simuleval", reason="simuleval is not installed")
    from streamgen.eval.simuleval_agent import StreamgenASRBLEU

    (tmp_path / "wavs").mkdir()
    sf.write(tmp_path / "wavs" / "0.wav", piper("Good morning, how are you?").numpy(), 16000)
    ins = types.SimpleNamespace(prediction=str(tmp_path / "wavs" / "0.wav"), reference="good morning how are you")
    assert StreamgenASRBLEU()({0: ins}) == pytest.approx(100.0)
    assert (tmp_path / "asr_transcripts.txt").read_text().strip().lower().startswith("good morning")
