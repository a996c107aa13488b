"""Evaluation metrics on hand-computed cases, and the Whisper ASR on real speech."""

import pytest
from speech import espeak, piper

from streamgen.eval.metrics import average_lagging, bleu, cer, distinct_ngrams, normalize, wer


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
    assert bleu(["the cat is on the mat"], ["The cat is on the mat!"]) == pytest.approx(100.0)
    assert bleu(["the cat is on the mat"], ["dogs run fast"]) == pytest.approx(0.0)
    assert normalize("  Hello,   World!  ") == "hello world"
    assert distinct_ngrams([1, 2, 1, 2, 1, 2], 2) == pytest.approx(2 / 5)


def test_whisper_transcribes_real_speech():
    from streamgen.eval.asr import WhisperASR

    asr = WhisperASR()
    text = asr.transcribe(piper("Good morning everyone, the weather is lovely today.").numpy())
    assert wer(["good morning everyone the weather is lovely today"], [text]) <= 0.3, text
    assert asr.transcribe(espeak("").numpy()[:100]) == ""
