"""Natural English sentences and the corpora made from them: training speech for the unit encoder and
the source-filter vocoder, and test sets people would use, in the training voice and in voices no
model was trained on.

Why: Whisper mishears the original audio of random strings of frequent words (WER 0.31-0.52), so a
figure on them measures the recogniser. Everyday statements and questions, times, dates, prices and
directions are what a user says, and Whisper reads their original audio far better (WER 0.07 in piper joe,
0.07 in flite rms, 0.18 in espeak-ng, bench/QUALITY.md).

    OUT/nat_train.tsv          piper joe: templated everyday sentences + faker sentences (the vocoder's voice)
    OUT/nat_voices.tsv         other voices, for speaker-robust units: flite awb, kal16, slt (never rms)
    OUT/nat_test_<voice>.tsv   the same test sentences in piper joe (trained), flite rms and espeak-ng en-us (never trained)

The test sentences are the hand-written `TEST_SENTENCES` (no template makes them) plus templated
sentences whose text never occurs in training. `python -m streamgen.train.natural --out DIR`.
"""

from __future__ import annotations

import argparse
import io
import random
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf

from ..io.files import resample
from ..progress import Progress
from .synth import RATE, Espeak, Piper, write_manifests
from .text import _num, unique

# Written for the test set only: no template below produces any of these.
TEST_SENTENCES = [
    "could you tell me where the nearest bus stop is",
    "I think it is going to rain this afternoon",
    "my sister works at the hospital on the other side of town",
    "do you know what time the library closes on Sundays",
    "we should leave early to avoid the traffic",
    "the coffee here is much better than I expected",
    "can I pay with a credit card",
    "please remember to lock the back door tonight",
    "how long does it take to walk to the museum",
    "the children are playing in the garden",
    "I left my umbrella on the train this morning",
    "would you like some more tea",
    "there is a small bakery around the corner",
    "the doctor said I need to rest for a few days",
    "is this seat taken",
    "my phone battery is almost empty",
    "they moved to a new apartment last summer",
    "what would you like for dinner tonight",
    "the concert was cancelled because of the storm",
    "I am looking for a present for my mother",
    "the elevator is out of order again",
    "could you speak a little louder please",
    "we ran out of milk and bread",
    "the store opens at nine in the morning",
]

# --- templated everyday sentences (training and a part of the test) ---------------------------
PLACES = ["the station", "the airport", "the hotel", "the post office", "the bank", "the pharmacy", "the hospital",
          "the museum", "the supermarket", "the city center", "the beach", "the library", "the park", "the bus stop",
          "the restaurant", "the cinema", "the school", "the market", "the bridge", "the cathedral"]
DIRECTIONS = ["turn left at the traffic lights", "turn right after the bridge", "go straight ahead for two blocks",
              "take the second street on the left", "cross the square and keep going", "it is next to the church",
              "it is across the street from the bank", "go up the hill and turn right", "follow the river for ten minutes",
              "it is behind the old market", "take the first exit at the roundabout", "walk past the park and turn left"]
ITEMS = [("a coffee", "coffee"), ("a sandwich", "sandwich"), ("the ticket", "ticket"), ("a bottle of water", "water"),
         ("the room", "room"), ("a taxi to the airport", "taxi"), ("the shirt", "shirt"), ("two apples", "apples"),
         ("a glass of wine", "wine"), ("the newspaper", "newspaper"), ("this jacket", "jacket"), ("a cup of soup", "soup")]
PEOPLE = ["my brother", "our neighbor", "the manager", "my friend", "the teacher", "my father", "the driver", "our guide",
          "my colleague", "the waiter", "my grandmother", "the pilot"]
EVENTS = ["the meeting", "the train", "the flight", "the concert", "the class", "the film", "the bus", "the game",
          "the party", "the tour", "the appointment", "the ferry"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEATHER = ["sunny", "cold", "windy", "warm", "cloudy", "hot", "foggy", "rainy"]
ACTIONS = ["call you back", "send the documents", "book a table", "meet you at the entrance", "pick up the keys",
           "check the schedule", "buy the tickets", "clean the kitchen", "finish the report", "wait for you outside"]


def spoken_time(r: random.Random) -> str:
    h, m = r.randint(1, 12), r.choice([0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55] + [r.randint(1, 59)])
    if m == 0:
        return f"{_num(h, 'en')} o'clock"
    if m == 15:
        return f"quarter past {_num(h, 'en')}"
    if m == 30:
        return f"half past {_num(h, 'en')}"
    return f"{_num(h, 'en')} {_num(m, 'en')}" if m >= 10 else f"{_num(h, 'en')} oh {_num(m, 'en')}"


def spoken_price(r: random.Random) -> str:
    units, cents = r.randint(1, 250), r.choice([0, 0, 50, 25, 99, r.randint(1, 99)])
    cur = r.choice(["dollars", "euros", "pounds"])
    return f"{_num(units, 'en')} {cur}" + (f" and {_num(cents, 'en')} cents" if cents else "")


def spoken_date(r: random.Random) -> str:
    return f"{r.choice(DAYS)} the {_num(r.randint(1, 31), 'en', ordinal=True)} of {r.choice(MONTHS)}"


class NaturalSentences:
    """Everyday statements and questions with times, dates, prices and directions, seeded."""

    def __init__(self, seed: int, faker_share: float = 0.25):
        from faker import Faker

        self.rng = random.Random(seed)
        self.fake = Faker("en_US")
        self.fake.seed_instance(seed)
        self.faker_share = faker_share
        r = self.rng
        self.templates = [
            lambda: f"{r.choice(EVENTS)} leaves at {spoken_time(r)}",
            lambda: f"what time does {r.choice(EVENTS)} start",
            lambda: f"{r.choice(EVENTS)} starts at {spoken_time(r)} on {r.choice(DAYS)}",
            lambda: f"I will {r.choice(ACTIONS)} at {spoken_time(r)}",
            lambda: f"how much is {r.choice(ITEMS)[0]}",
            lambda: f"{r.choice(ITEMS)[0]} costs {spoken_price(r)}",
            lambda: f"that will be {spoken_price(r)} please",
            lambda: f"I paid {spoken_price(r)} for {r.choice(ITEMS)[0]}",
            lambda: f"excuse me, how do I get to {r.choice(PLACES)}",
            lambda: f"to get to {r.choice(PLACES)}, {r.choice(DIRECTIONS)}",
            lambda: f"is {r.choice(PLACES)} far from here",
            lambda: f"{r.choice(PLACES)} is {_num(r.randint(2, 20), 'en')} minutes from {r.choice(PLACES)}",
            lambda: f"my birthday is on {spoken_date(r)}",
            lambda: f"we are flying home on {spoken_date(r)}",
            lambda: f"{r.choice(PEOPLE)} arrives on {r.choice(DAYS)} at {spoken_time(r)}",
            lambda: f"can {r.choice(PEOPLE)} {r.choice(ACTIONS)} tomorrow",
            lambda: f"it will be {r.choice(WEATHER)} on {r.choice(DAYS)}",
            lambda: f"it was {r.choice(WEATHER)} in {r.choice(MONTHS)}",
            lambda: f"I need {_num(r.randint(2, 12), 'en')} tickets for {r.choice(EVENTS)}",
            lambda: f"{r.choice(PEOPLE)} said that {r.choice(EVENTS)} is late",
            lambda: f"please {r.choice(ACTIONS)} before {spoken_time(r)}",
            lambda: f"do you want {r.choice(ITEMS)[0]} or {r.choice(ITEMS)[0]}",
            lambda: f"the room costs {spoken_price(r)} a night",
            lambda: f"I have been waiting for {_num(r.randint(5, 50), 'en')} minutes",
        ]

    def __call__(self) -> str:
        r = self.rng
        if r.random() < self.faker_share:  # broad vocabulary, still grammatical
            return self.fake.sentence(nb_words=r.randint(5, 11)).rstrip(".").lower()
        return r.choice(self.templates)()


class Flite:
    def __init__(self, voice: str):
        self.voice = voice

    def __call__(self, text: str, speed: float = 1.0) -> np.ndarray:
        try:
            wav = subprocess.run(["flite", "-voice", self.voice, "--setf", f"duration_stretch={1 / speed:.3f}",
                                  "-t", text, "-o", "/dev/stdout"], check=True, capture_output=True).stdout
        except FileNotFoundError:
            raise RuntimeError("flite is missing (Debian: apt-get install flite)") from None
        x, rate = sf.read(io.BytesIO(wav), dtype="float32")
        return resample(x, rate, RATE)


TEST_VOICES = {"joe": lambda: Piper(), "rms": lambda: Flite("rms"), "espeak": lambda: Espeak("en-us")}
UNIT_VOICES = {"awb": lambda: Flite("awb"), "kal16": lambda: Flite("kal16"), "slt": lambda: Flite("slt")}  # never rms


def natural_corpus(out: str | Path, n_train: int = 800, n_templated_test: int = 16, n_voice: int = 150, seed: int = 0,
                   progress: bool = True) -> dict[str, Path]:
    """Write the natural-sentence corpora (see the module docstring); returns the manifests written."""
    out = Path(out)
    texts = [t for t in unique(NaturalSentences(seed), n_train + 3 * n_voice) if t not in TEST_SENTENCES]
    train, voices = texts[:n_train], texts[n_train:]
    # templated test sentences come from templates alone (no faker word strings), and never from training
    seen = set(texts) | set(TEST_SENTENCES)
    templated = unique(NaturalSentences(seed + 1000, faker_share=0.0), n_templated_test + len(seen), max_tries=1000)
    test = TEST_SENTENCES + [t for t in templated if t not in seen][:n_templated_test]
    jobs = [("nat_train", f"nt{i:05d}", t, "joe") for i, t in enumerate(train)]
    for k, v in enumerate(UNIT_VOICES):
        jobs += [("nat_voices", f"nv{v}{i:04d}", t, v) for i, t in enumerate(voices[k::3][:n_voice])]
    for v in TEST_VOICES:
        jobs += [(f"nat_test_{v}", f"ns{i:03d}", t, v) for i, t in enumerate(test)]
    tts = {}
    rng = random.Random(seed + 1)
    manifests: dict[str, list[dict]] = {}
    with Progress("natural sentences", len(jobs), enabled=progress) as bar:
        for name, uid, text, voice in jobs:
            if voice not in tts:
                tts[voice] = {**TEST_VOICES, **UNIT_VOICES}[voice]()
            speed = rng.uniform(0.9, 1.1) if name != "nat_test_joe" else 1.0
            audio = tts[voice](text, speed)
            rel = Path("audio") / name / f"{uid}.flac"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            sf.write(out / rel, audio, RATE, subtype="PCM_16")
            manifests.setdefault(name, []).append({"id": uid, "audio": str(rel), "n_frames": len(audio), "text": text, "voice": voice})
            bar.update(advance=1)
    return write_manifests(out, manifests)


def main() -> None:
    ap = argparse.ArgumentParser(description="natural-sentence corpora and test sets")
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=800)
    ap.add_argument("--voice-utts", type=int, default=150, help="utterances per extra voice (for the unit encoder)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for name, path in natural_corpus(args.out, args.train, n_voice=args.voice_utts, seed=args.seed).items():
        print(name, path)


if __name__ == "__main__":
    main()
