"""Synthetic corpora (piper + espeak-ng), resumable unit extraction, task pairs."""

import filecmp
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from streamgen.testing import random_bundle
from streamgen.train.data import MASK, read_pairs
from streamgen.train.synth import extract_units, make_pairs, read_manifest, synth
from streamgen.train.text import EnglishSentences, SpanishEnglishPairs, unique


def test_sentences_are_deterministic_and_broad():
    a, b = unique(EnglishSentences(3), 300), unique(EnglishSentences(3), 300)
    assert a == b and unique(EnglishSentences(4), 300) != a
    words = {w for s in a for w in s.split()}
    assert len(words) > 800  # broad vocabulary, not a few templates
    es, en = zip(*unique(SpanishEnglishPairs(0), 50, key=lambda p: p[0]))
    assert all(es) and all(en) and len(set(es)) == 50


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    synth(out, 3, 1, 1, seed=5, progress=False)
    return out


def test_synth_is_deterministic_with_disjoint_splits(corpus, tmp_path):
    again = tmp_path / "again"
    synth(again, 3, 1, 1, seed=5, progress=False)
    for name in ("en_train", "en_test", "es2en_train_src", "es2en_dev_tgt", "en_test_espeak"):
        assert filecmp.cmp(corpus / f"{name}.tsv", again / f"{name}.tsv", shallow=False)
        for row in read_manifest(corpus / f"{name}.tsv"):
            assert filecmp.cmp(corpus / row["audio"], again / row["audio"], shallow=False)  # same audio bytes
    piper_test, espeak_test = read_manifest(corpus / "en_test.tsv"), read_manifest(corpus / "en_test_espeak.tsv")
    assert [(r["id"], r["text"]) for r in piper_test] == [(r["id"], r["text"]) for r in espeak_test]  # same texts, other voice
    assert piper_test[0]["n_frames"] != espeak_test[0]["n_frames"]
    texts = {s: {r["text"] for r in read_manifest(corpus / f"en_{s}.tsv")} for s in ("train", "dev", "test")}
    assert not (texts["train"] & texts["dev"] or texts["train"] & texts["test"] or texts["dev"] & texts["test"])
    src, tgt = read_manifest(corpus / "es2en_train_src.tsv"), read_manifest(corpus / "es2en_train_tgt.tsv")
    assert [r["id"] for r in src] == [r["id"] for r in tgt]
    row = read_manifest(corpus / "en_train.tsv")[0]
    audio, rate = sf.read(corpus / row["audio"])
    assert rate == 16000 and len(audio) == int(row["n_frames"]) > 8000
    # a run stopped midway (its manifests unwritten, one file not yet spoken) resumes: what was spoken is kept
    # as it is, the rest spoken, the same manifests written
    for m in again.glob("*.tsv"):
        m.unlink()
    gone = again / read_manifest(corpus / "es2en_dev_tgt.tsv")[0]["audio"]
    gone.unlink()
    kept = again / row["audio"]
    kept.write_bytes(kept.read_bytes())  # (its bytes as they were, a new modification time)
    stamp = kept.stat().st_mtime_ns
    synth(again, 3, 1, 1, seed=5, progress=False)
    assert kept.stat().st_mtime_ns == stamp and gone.is_file() and not list(again.rglob(".*.partial*"))
    with pytest.raises(ValueError, match=r"holds a corpus made with other settings \(seed 5 \(now 6\)\)"):
        synth(again, 3, 1, 1, seed=6, progress=False)  # its audio would be kept under other sentences
    for name in ("en_train", "en_test", "es2en_train_src", "es2en_dev_tgt", "en_test_espeak"):
        assert filecmp.cmp(corpus / f"{name}.tsv", again / f"{name}.tsv", shallow=False)


def test_unit_extraction_resumes(corpus, tmp_path):
    b = random_bundle()
    full = extract_units(b, corpus / "en_train.tsv", tmp_path / "full.tsv", progress=False)
    lines = full.read_text().splitlines()
    (tmp_path / "part.tsv").write_text("\n".join(lines[:2]) + "\n")  # as if it died after one utterance
    extract_units(b, corpus / "en_train.tsv", tmp_path / "part.tsv", progress=False)
    assert (tmp_path / "part.tsv").read_text() == full.read_text()
    (tmp_path / "cut.tsv").write_text("\n".join(lines[:3])[:-7])  # as if it died writing its second row
    extract_units(b, corpus / "en_train.tsv", tmp_path / "cut.tsv", progress=False)
    assert (tmp_path / "cut.tsv").read_text() == full.read_text()
    rows = read_manifest(full)
    assert len(rows) == 3 and all(len(r["units"].split()) > 10 for r in rows)
    # batched (padded) extraction writes the same units as one utterance at a time, in manifest order
    one = extract_units(b, corpus / "en_train.tsv", tmp_path / "one.tsv", progress=False, batch_seconds=0.1)
    assert one.read_text() == full.read_text()
    for r in rows:
        units, durations = b.encode(sf.read(corpus / r["audio"], dtype="float32")[0])
        assert r["units"] == " ".join(map(str, units.tolist())) and r["durations"] == " ".join(map(str, durations.tolist()))


def test_unit_extraction_names_what_it_cannot_resume_or_read(corpus, tmp_path):
    """A resume into another manifest's unit file wrote rows under the wrong columns; an id used twice lost
    its second row on resume; an empty audio stopped everything with "audio is empty", naming no row; --out
    the manifest itself did nothing and said "wrote"."""
    import shutil

    b = random_bundle()
    m = corpus / "en_train.tsv"
    rows = read_manifest(m)
    head = "\t".join(rows[0])
    with pytest.raises(ValueError, match="is the manifest itself"):
        extract_units(b, m, m, progress=False)
    (tmp_path / "other.tsv").write_text("id\taudio\tunits\tdurations\nx\ty.wav\t1\t2\n")
    with pytest.raises(ValueError, match="other.tsv holds other columns .* it is not this manifest's unit manifest"):
        extract_units(b, m, tmp_path / "other.tsv", progress=False)
    for r in rows:
        shutil.copy(corpus / r["audio"], tmp_path / Path(r["audio"]).name)
    body = [f"{r['id']}\t{Path(r['audio']).name}\t" + "\t".join(list(r.values())[2:]) for r in rows]
    (tmp_path / "dup.tsv").write_text("\n".join([head, body[0], body[1], body[0]]) + "\n")
    with pytest.raises(ValueError, match=r"dup.tsv:4: id '.*' again \(line 2\)"):
        extract_units(b, tmp_path / "dup.tsv", tmp_path / "dup.u.tsv", progress=False)
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    bad = body[1].replace(Path(rows[1]["audio"]).name, "empty.wav").replace(rows[1]["id"], "silent", 1)
    (tmp_path / "bad.tsv").write_text("\n".join([head, body[0], bad]) + "\n")
    with pytest.raises(ValueError, match="bad.tsv:3: .*empty.wav"):
        extract_units(b, tmp_path / "bad.tsv", tmp_path / "bad.u.tsv", progress=False, batch_seconds=0.1)
    with pytest.raises(ValueError, match="is an input manifest: writing the pairs would destroy it"):
        make_pairs("continuation", tmp_path / "bad.u.tsv", tmp_path / "bad.u.tsv")


def test_pairs_for_each_task(corpus, tmp_path):
    b = random_bundle()
    for name in ("en_train", "es2en_train_src", "es2en_train_tgt"):
        extract_units(b, corpus / f"{name}.tsv", tmp_path / f"{name}.u.tsv", progress=False)
    en = {r["id"]: [int(u) for u in r["units"].split()] for r in read_manifest(tmp_path / "en_train.u.tsv")}

    cont = read_pairs(make_pairs("continuation", tmp_path / "en_train.u.tsv", tmp_path / "c.tsv"))
    assert all(p.src + p.tgt == en[p.id] and abs(len(p.src) - len(p.tgt)) <= 1 for p in cont)

    inp = read_pairs(make_pairs("inpainting", tmp_path / "en_train.u.tsv", tmp_path / "i.tsv", seed=1))
    for p in inp:
        assert p.tgt == en[p.id] and p.src.count(MASK) == 1
        hidden = len(p.tgt) - (len(p.src) - 1)
        assert 0.15 <= hidden / len(p.tgt) <= 0.45  # 20-40 % masked (rounding on short inputs)

    tr = read_pairs(make_pairs("translation", tmp_path / "es2en_train_src.u.tsv", tmp_path / "t.tsv", target=tmp_path / "es2en_train_tgt.u.tsv"))
    assert [p.id for p in tr] == [r["id"] for r in read_manifest(corpus / "es2en_train_src.tsv")]
    with pytest.raises(ValueError, match="no units"):
        make_pairs("continuation", corpus / "en_train.tsv", tmp_path / "x.tsv")
