"""Quality and latency metrics.

Latency follows SimulEval's scorers (latency_scorer.py), on per-output-unit delays in ms: every unit
of a committed chunk gets that chunk's delay (the input consumed when it was committed, or, compute-
aware, that plus the wall-clock compute spent until it left the pipeline).

- AL (Average Lagging): tau = first i with d_i >= |X| (else all); gamma = |Y| / |X|;
  AL = (1 / tau) * sum_{i=1..tau} (d_i - (i - 1) / gamma); if d_1 > |X|, AL = d_1.
- StartOffset / EndOffset: see `streamgen.pipeline.stats` (speech output played in order).

Quality: WER and CER (jiwer) and BLEU (sacrebleu) on normalised transcripts.
"""

from __future__ import annotations

import re
import unicodedata


def average_lagging(delays: list[float], source_len: float, target_len: int | None = None) -> float:
    """SimulEval's AL. `delays` per output token (ms of source read), `source_len` in ms;
    `target_len` (tokens) defaults to len(delays) (SimulEval uses the reference length when given)."""
    if not delays:
        raise ValueError("AL of an empty output is undefined")
    if delays[0] > source_len:
        return float(delays[0])
    gamma = (target_len or len(delays)) / source_len
    total, tau = 0.0, 0
    for i, d in enumerate(delays):
        total += d - i / gamma
        tau = i + 1
        if d >= source_len:
            break
    return total / tau


_TIME = re.compile(r"\b(\d{1,2})[:.](\d{2})\b")  # 8:35, and 8.35 as Whisper sometimes writes it
_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(st|nd|rd|th)?\b")


def spell_numbers(text: str) -> str:
    """Digits as words, the way the references are written (num2words): Whisper writes "19th",
    "1993", "8:35" and "40%" where the corpus says "nineteenth", "one thousand, nine hundred and
    ninety-three", "eight thirty-five" and "forty percent"; without this a correct transcript counts
    as several errors per number."""
    from num2words import num2words

    text = _TIME.sub(lambda m: num2words(int(m[1])) + (f" {num2words(int(m[2]))}" if int(m[2]) else ""), text)
    text = text.replace("%", " percent")
    return _NUMBER.sub(lambda m: num2words(int(m[1].replace(",", "")), to="ordinal" if m[2] else "cardinal"), text)


def normalize(text: str) -> str:
    """Numbers spelled out, lower case, no punctuation, single spaces (as ASR-BLEU/WER evaluations do)."""
    text = spell_numbers(unicodedata.normalize("NFKC", text)).lower()
    text = re.sub(r"[^\w\s']", " ", text)
    return " ".join(text.split())


NOTHING_HEARD = "\u2205"  # an empty hypothesis, as one word of one character no reference has: every reference word
# (and character) is then one error, WER and CER 1.0 (a longer placeholder such as "<empty>" was counted as
# characters said: CER 3.5 for "hi")


def wer(references: list[str], hypotheses: list[str]) -> float:
    import jiwer

    return float(jiwer.wer([normalize(r) for r in references], [normalize(h) or NOTHING_HEARD for h in hypotheses]))


def cer(references: list[str], hypotheses: list[str]) -> float:
    import jiwer

    return float(jiwer.cer([normalize(r) for r in references], [normalize(h) or NOTHING_HEARD for h in hypotheses]))


def bleu(references: list[str], hypotheses: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu([normalize(h) for h in hypotheses], [[normalize(r) for r in references]]).score)


def distinct_ngrams(units: list[int], n: int) -> float:
    """Share of distinct unit n-grams (diversity of generated units)."""
    grams = [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def aligned_span(reference: list[str], start: int, end: int, hypothesis: list[str]) -> list[str]:
    """The hypothesis words an edit-distance alignment sets against reference[start:end], with the
    words it inserts strictly inside that span: what a system said where the span was."""
    import jiwer

    if not reference or not hypothesis:
        return []
    out = []
    for c in jiwer.process_words(" ".join(reference), " ".join(hypothesis)).alignments[0]:
        if c.type in ("equal", "substitute"):
            lo, hi = max(start, c.ref_start_idx), min(end, c.ref_end_idx)
            out += hypothesis[c.hyp_start_idx + lo - c.ref_start_idx : c.hyp_start_idx + hi - c.ref_start_idx]
        elif c.type == "insert" and start < c.ref_start_idx < end:
            out += hypothesis[c.hyp_start_idx : c.hyp_end_idx]
    return out


def span_words(words: list[tuple[str, float, float]], start_s: float, end_s: float) -> tuple[list[str], int, int]:
    """Timed ASR words -> (normalised word list, [i0, i1) of the words whose middle lies in the span)."""
    flat, mids = [], []
    for w, a, b in words:
        for n in normalize(w).split():
            flat.append(n)
            mids.append((a + b) / 2)
    inside = [i for i, m in enumerate(mids) if start_s <= m < end_s]
    return flat, (inside[0] if inside else 0), (inside[-1] + 1 if inside else 0)


NO_SPEECH_MAX = 0.3


def sounds_like_speech(heard: str, no_speech: float) -> bool:
    """Whisper hears at least three words and is confident there is speech (no-speech probability
    under 0.3). Calibrated on the shipped bundle (tests/test_default_bundle.py): its continuations
    score 0.03-0.34, random units through its vocoder 0.375-1.0, and Whisper tiny.en "hears" words
    in much of that babble, so words alone do not tell speech from babble."""
    return len(heard.split()) >= 3 and no_speech < NO_SPEECH_MAX
