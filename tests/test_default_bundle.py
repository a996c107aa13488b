"""The shipped default bundle: small, complete, and it speaks (Whisper hears words in what it says)."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import streamgen
from streamgen.bundle import default_bundle_path
from streamgen.cli import app
from streamgen.eval.metrics import NO_SPEECH_MAX, wer

BUNDLE = default_bundle_path()
SAMPLE = streamgen.cli.Path(streamgen.__file__).parent / "assets" / "sample.wav"
# measured 0.158 on 2026-11-26 with the vocoder's durations (one word of 19 misheard, one missed; the
# bundle before scored 0.68) and 0.0 in the talker's timing on 2026-11-27; a bundle that does not
# speak scores 1.0 or more
RESYNTHESIS_WER_BOUND = 0.3


@pytest.fixture(scope="module")
def asr():
    from streamgen.eval.asr import WhisperASR

    return WhisperASR()


def test_it_ships_small_in_fp16_with_a_model_for_each_task():
    assert BUNDLE is not None, "streamgen/assets/default is missing: the demo would fall back to random weights"
    size = sum(f.stat().st_size for f in BUNDLE.rglob("*") if f.is_file())
    assert size <= 25_000_000, f"{size / 1e6:.2f} MB"  # the 25 MB budget in bytes (24.96 MB on 2026-11-29)
    for part in ("mbart", "source_filter", "phone_units"):
        with safe_open(str(BUNDLE / f"{part}.safetensors"), "pt") as f:
            assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}, part
    with safe_open(str(BUNDLE / "backbones" / "translation.safetensors"), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}
    b = streamgen.load_bundle(BUNDLE)
    assert {"continuation", "inpainting"} <= set(b.prompts) and "translation" in b.backbones  # fine-tuned for it
    assert b.mbart.cfg.mask_token is not None  # inpainting needs <mask>
    # every task reads its input through the phone recogniser but translation, whose backbone learnt Spanish k-means units
    assert all(b.reads_phone_units(t) for t in ("resynthesis", "continuation", "inpainting")) and not b.reads_phone_units("translation")


@pytest.mark.parametrize("timing", ["source", "predicted"])
def test_resynthesis_of_the_sample_keeps_its_words(asr, timing):
    """audio -> units -> vocoder, in the talker's timing (the resynthesis task's default) and with the
    vocoder's durations (the ceiling of every task whose units come from the language model). The
    reference is Whisper's own reading of the original sample, so the figure measures what the units
    and the vocoder lose."""
    b = streamgen.load_bundle(BUNDLE)
    wave, rate = sf.read(SAMPLE, dtype="float32")
    units, durations = b.encode(wave)
    heard = asr.transcribe(b.vocode(units, durations if timing == "source" else None).numpy())
    reference = asr.transcribe(wave)
    assert wer([reference], [heard]) <= RESYNTHESIS_WER_BOUND, (reference, heard)


# sentences in a voice no part of the bundle was trained on (espeak-ng en-us; its other English accents
# are among the recogniser's training voices, this one is not)
UNSEEN = ["Could you tell me where the nearest pharmacy is?", "The museum opens at nine thirty on Saturday morning.",
          "I paid twelve dollars for two tickets to the concert.", "Please leave the keys with the hotel reception."]
UNSEEN_WER_BOUND = 0.5  # measured 2026-11-29: 0.14 through the recogniser, 1.03 through the k-means


def test_a_voice_never_trained_on_keeps_its_words_through_the_recogniser(asr):
    """The shipped reading (phone recogniser + classifier onto the bundle's units) against the k-means
    reading of the same units, both through the same vocoder in the talker's timing."""
    from speech import espeak

    b = streamgen.load_bundle(BUNDLE)
    refs, read, kmeans = [], [], []
    for text in UNSEEN:
        wave = espeak(text)
        refs.append(text)
        read.append(asr.transcribe(b.vocode(*b.encode(wave)).numpy()))
        kmeans.append(asr.transcribe(b.vocode(*b.logmel_units.encode(wave)).numpy()))
    assert wer(refs, read) <= UNSEEN_WER_BOUND < wer(refs, kmeans), (read, kmeans)


def heard_continuing(asr, sample, audio) -> tuple[int, float]:
    """How Whisper hears `audio` as a continuation of `sample`: the words it adds after the sample's
    own transcript when it hears the two together, and its no-speech probability for `audio` alone."""
    _, no_speech = asr.hear(audio)
    words = lambda x: asr.transcribe(x).split()
    return len(words(np.concatenate([sample, audio]))) - len(words(sample)), no_speech


def continues_the_sample(asr, sample, audio) -> bool:
    """Speech, heard as going on from the sample. Measured 2026-11-26 with the shipped bundle:
    continuations of the sample (six draws, the demo's is seed 0) add 6-10 words with no-speech
    probabilities 0.03-0.34 (the demo's: 8 words, 0.18); babble (random units, or the sample's own
    units shuffled, through the same vocoder) has no-speech 0.375-1.0 in 20 of 20 draws."""
    added, no_speech = heard_continuing(asr, sample, audio)
    return added >= 3 and no_speech < NO_SPEECH_MAX


def test_demo_continues_the_sample_where_babble_does_not(tmp_path, asr):
    out = tmp_path / "demo.wav"
    r = CliRunner().invoke(app, ["demo", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "RANDOMLY" not in r.output and "with prompt continuation" in r.output and "real-time factor" in r.output
    audio, rate = sf.read(out, dtype="float32")
    sample, _ = sf.read(SAMPLE, dtype="float32")
    continuation = audio[len(sample):]
    assert rate == 16000 and len(continuation) >= 75 * 320  # at least the 75 units the demo asks for at least
    assert np.isfinite(continuation).all()
    assert continues_the_sample(asr, sample, continuation), heard_continuing(asr, sample, continuation)

    # the same measure fails babble of the same length through the same vocoder
    b = streamgen.load_bundle(BUNDLE)
    units, _ = b.encode(sample)
    n = len(b.encode(continuation)[0])
    g = torch.Generator().manual_seed(0)
    babble = [torch.randint(0, b.need("logmel_units").num_units, (n,), generator=g) for _ in range(3)]
    babble += [units[torch.randperm(len(units), generator=g)][:n] for _ in range(2)]
    for u in babble:
        noise = b.vocode(u).float().numpy()
        assert not continues_the_sample(asr, sample, noise), heard_continuing(asr, sample, noise)


def test_info_without_a_path_describes_the_default_bundle():
    r = CliRunner().invoke(app, ["info"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"bundle {BUNDLE}  (the default bundle shipped with streamgen)  (sample rate 16000 Hz)")
    for part in ("logmel_units", "mbart", "source_filter"):
        assert f"\n{part} " in r.output
    for task in ("continuation", "inpainting"):
        assert f"prompt {task}:" in r.output
    assert "backbone of task translation" in r.output


# Held-out travel-domain sentences (the test split of `streamgen.train.travel`), spoken by espeak-ng's
# Spanish voice, translated live at 320 ms chunks. Measured 2026-11-27 on the first four: Whisper heard
# 14 of their 21 content words with the first fine-tuned d 256 backbone (the metro leaves on thursday at
# twenty | the ice cream cost twenty two euros fifty | my flight is on the twenty second of november five
# to one | the bus leaves at five passes) and 11 with the one shipped since (better over the 200 test
# pairs: ASR-BLEU 19.0 -> 21.3; four sentences swing either way); with a prompt on the shared d 128
# backbone it heard 1 (the class f private | this he was to one take two nine five pun five | then see
# you twenty | the pus after lease it). Since the default policy became wait-k 30 (sixth session of
# 2026-11-27: a quarter of local agreement's decoder steps, ASR-BLEU 21.1 against 21.9 over the 200
# pairs) all eight are asked: wait-k 30 says 12 of their 40 content words (9 + 3; in bfloat16 too),
# local agreement 13-14 (11 + 2-3; the last four come out as *the name square opens at ten past eleven*,
# *to get to the bus l frustrated hats on from the right*).
TRAVEL = [("el metro sale del andén siete", "the metro leaves from platform seven"),
          ("el helado cuesta cincuenta y ocho euros con cincuenta", "the ice cream costs fifty eight euros fifty"),
          ("mi vuelo es el diecisiete de marzo a la una menos veinticinco", "my flight is on the seventeenth of march at twenty five to one"),
          ("el autobús sale el martes a las cinco menos cinco", "the bus leaves on tuesday at five to five"),
          ("la plaza mayor está delante del castillo", "the main square is in front of the castle"),
          ("quisiera una cerveza, por favor", "i would like a beer please"),
          ("para ir a la catedral, tome la segunda calle a la derecha", "to get to the cathedral take the second street on the right"),
          ("el hotel cierra a las nueve menos diez", "the hotel closes at ten to nine")]
FUNCTION_WORDS = {"the", "a", "an", "at", "on", "is", "of", "to", "from", "in", "for"}


@pytest.mark.parametrize("lm_dtype", [None, torch.bfloat16], ids=["float32", "bfloat16"])
def test_live_translation_says_the_sentences_content_words(asr, lm_dtype):
    import asyncio

    from speech import espeak

    from streamgen.eval.metrics import normalize
    from streamgen.io.memory import MemorySink, MemorySource, chunks_of
    from streamgen.pipeline.runner import Pipeline, build_engine
    from streamgen.pipeline.stats import Stats

    b = streamgen.load_bundle(BUNDLE)
    if lm_dtype is not None:  # --lm-dtype on a CPU: the backbones' encoder stacks; the rest stays float32
        b.lm_to(lm_dtype)
        for m in (b.backbones["translation"], b.mbart):
            assert {p.dtype for p in m.encoder.parameters()} == {lm_dtype}
            assert {p.dtype for p in m.decoder.parameters()} == {m.embed_tokens.weight.dtype} == {torch.float32}
        assert {p.dtype for p in b.unit_vocoder.parameters()} == {x.dtype for x in b.logmel_units.buffers()} == {torch.float32}
    said, heard_words = 0, []
    for spanish, english in TRAVEL:
        engine = build_engine(b, "translation", chunk_ms=320)
        sink = MemorySink()
        asyncio.run(Pipeline(MemorySource(chunks_of("s", espeak(spanish, voice="es"), 5120)), engine, sink, Stats(16000)).run())
        heard = set(normalize(asr.transcribe(sink.wave("s").numpy())).split())
        content = set(english.split()) - FUNCTION_WORDS
        said += len(content & heard)
        heard_words.append(sorted(heard))
    # of 40: the 2-layer decoder (shipped 2026-11-28, twelfth session, live 32.9 over 200 pairs) says 24 in float32, 22
    # in bfloat16; the 4-layer backbone continued at lr 1e-4 before it (live 33.7) 18 in float32, 20 in
    # bfloat16; the 12,000-pair one before it 20 and 20; on 3,000 pairs 21; the one before 12 (eight sentences swing)
    assert said >= 16, (said, heard_words)


def test_the_demo_starts_without_importing_the_compiler_or_sympy(tmp_path):
    """Shapes are checked on skeletons that are not initialised (a random fill of a meta tensor imports
    torch._dynamo) and attention broadcasts its masks itself (`torch.broadcast_shapes` imports sympy):
    1.5 s and 0.5 s of every command's start."""
    code = ("import sys; from streamgen.cli import app; sys.argv = ['streamgen', 'demo', '--out', sys.argv[1]]\n"
            "try:\n    app()\nexcept SystemExit:\n    pass\n"
            "print([m for m in ('torch._dynamo', 'sympy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "demo.wav")], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
    assert (tmp_path / "demo.wav").stat().st_size > 0
