"""The Spanish -> English travel domain: seeded, compositional test split (every test pair holds a combination
no training pair has, in words training has), correct Spanish numbers and clock times, resumable corpus."""

import numpy as np
import pytest

from streamgen.train import travel
from streamgen.train.synth import read_manifest
from streamgen.train.travel import FRAMES, contract, es_count, price_pair, time_pair, travel_pairs, words


@pytest.fixture(scope="module")
def pairs():
    return travel_pairs(3000, 150, 200, seed=0)


def test_pairs_are_seeded_distinct_and_sized(pairs):
    assert {s: len(v) for s, v in pairs.items()} == {"train": 3000, "dev": 150, "test": 200}
    again = travel_pairs(3000, 150, 200, seed=0)
    assert all([(p.es, p.en) for p in pairs[s]] == [(p.es, p.en) for p in again[s]] for s in pairs)
    texts = [p.es for s in pairs for p in pairs[s]]
    assert len(set(texts)) == len(texts)  # no Spanish sentence in two splits or twice in one
    assert [p.es for p in travel_pairs(3000, 150, 200, seed=1)["test"]] != [p.es for p in pairs["test"]]


def test_every_test_pair_holds_a_combination_training_never_had(pairs):
    trained = set().union(*(p.combos() for p in pairs["train"]))
    for split in ("test", "dev"):
        for p in pairs[split]:
            assert p.combos() - trained, (split, p)  # the frame never met this value of this slot in training
    # ... and the parts are known: every frame, and every word of both languages, occurs in training
    frames = {p.frame for p in pairs["train"]}
    assert {f[0] for f in FRAMES} <= frames
    es_vocab = set().union(*(words(p.es) for p in pairs["train"]))
    en_vocab = set().union(*(words(p.en) for p in pairs["train"]))
    for p in pairs["test"]:
        assert words(p.es) <= es_vocab and words(p.en) <= en_vocab, p
    # the held-out combinations cover many frames, not one corner of the domain
    assert len({p.frame for p in pairs["test"]}) >= 20


def test_the_domain_is_the_one_the_readme_states(pairs):
    en = " ".join(p.en for p in pairs["train"])
    for word in ("Monday", "is closed on", "o'clock", "quarter to", "half past", "euros", "turn left", "platform",
                 "of March", "tickets", "where is", "the bill, please"):
        assert word in en, word


def test_spanish_numbers_times_and_contractions():
    assert [es_count(n) for n in (1, 21, 31, 101, 7)] == ["un", "veintiún", "treinta y un", "ciento un", "siete"]
    assert [es_count(n, feminine=True) for n in (1, 21, 31)] == ["una", "veintiuna", "treinta y una"]
    assert time_pair(3, 45) == ("las cuatro menos cuarto", "quarter to four")
    assert time_pair(12, 40) == ("la una menos veinte", "twenty to one")
    assert time_pair(1, 30) == ("la una y media", "half past one")
    assert time_pair(9, 0) == ("las nueve", "nine o'clock")
    assert price_pair(21, 50) == ("veintiún euros con cincuenta", "twenty one euros fifty")
    assert contract("para ir a el museo, cerca de el banco") == "para ir al museo, cerca del banco"
    assert contract("a la estación de él") == "a la estación de él"


class FakeTTS:
    calls = 0

    def __init__(self, *args):
        pass

    def __call__(self, text, speed=1.0):
        FakeTTS.calls += 1
        return np.full(160 * (1 + len(text) % 7), 0.01, dtype=np.float32)


def test_corpus_manifests_pair_by_id_and_a_rerun_speaks_nothing_again(tmp_path, monkeypatch):
    monkeypatch.setattr(travel, "Espeak", FakeTTS)
    monkeypatch.setattr(travel, "Piper", FakeTTS)
    before = FakeTTS.calls
    written = travel.travel_corpus(tmp_path, 600, 5, 6, progress=False)
    assert set(written) == {f"es2en_{s}_{side}" for s in ("train", "dev", "test") for side in ("src", "tgt")}
    calls = FakeTTS.calls
    assert calls - before == 2 * (600 + 5 + 6)
    for split in ("train", "dev", "test"):
        src, tgt = read_manifest(written[f"es2en_{split}_src"]), read_manifest(written[f"es2en_{split}_tgt"])
        assert [r["id"] for r in src] == [r["id"] for r in tgt]
        assert all((tmp_path / r["audio"]).is_file() for r in src + tgt)
        if split != "train":
            assert all(r["held"] for r in src)  # the unseen combination is named
    first = {n: p.read_text() for n, p in written.items()}
    travel.travel_corpus(tmp_path, 600, 5, 6, progress=False)
    assert FakeTTS.calls == calls  # resumed: nothing spoken twice
    assert {n: p.read_text() for n, p in written.items()} == first
    with pytest.raises(ValueError, match=r"holds a corpus made with other settings \(seed 0 \(now 1\)\)"):
        travel.travel_corpus(tmp_path, 600, 5, 6, seed=1, progress=False)  # its audio would be kept under other sentences
