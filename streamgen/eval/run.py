"""`streamgen eval`: a task on a test manifest, through the streaming pipeline, scored.

Each utterance is streamed from its file (paced in real time by default, so compute-aware latencies
are wall-clock facts), through the same engine as `streamgen run`; the output is transcribed by the
ASR and compared with the reference text. Per chunk size: ASR-BLEU, WER, CER, StartOffset,
EndOffset and AL (ideal and compute-aware), real-time factor; for continuation also the diversity
of generated units; for inpainting also a baseline that copies the unmasked context.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import numpy as np
import torch

from ..io.files import FileSource, audio_info, read_audio
from ..io.memory import MemorySink
from ..pipeline.items import Control
from ..pipeline.runner import Pipeline, build_engine
from ..pipeline.stats import SessionStats, Stats
from ..resume import differences, whole_lines
from ..train.synth import read_manifest
from .metrics import aligned_span, average_lagging, bleu, cer, distinct_ngrams, normalize, sounds_like_speech, span_words, wer


class _WithControl:
    """A file source preceded by a start message carrying per-utterance task options."""

    def __init__(self, source: FileSource, task: str, options: dict):
        self.source, self.task, self.options = source, task, options

    async def __aiter__(self):
        yield Control(self.source.session, "start", self.task, self.options)
        async for item in self.source:
            yield item


def lagging(st: SessionStats, hop: int) -> tuple[float | None, float | None]:
    """AL (ideal, compute-aware) over output frames: each frame carries its chunk's delay."""
    if not st.outputs or st.started_at is None:
        return None, None
    src_ms = 1000 * st.input_samples / st.sample_rate
    ideal, aware = [], []
    for d, t, n in st.outputs:
        k = max(1, n // hop)
        ideal += [d] * k
        aware += [1000 * (t - st.started_at)] * k
    return average_lagging(ideal, src_ms), average_lagging(aware, src_ms)


def check_test_set(manifest: Path, references: str | Path | None, limit: int | None) -> tuple[list[dict], dict[str, str], dict[str, float]]:
    """The manifest's rows (up to `limit`), each id's reference text and each audio's length (s), or a ValueError
    naming the first problem, before anything is evaluated: a run must not stop at row 90 over row 91's file."""
    rows = read_manifest(manifest)[:limit]
    if not rows:
        raise ValueError(f"{manifest}: the manifest has no rows")
    seen: set[str] = set()
    for n, r in enumerate(rows, start=2):
        if not r.get("id") or not r.get("audio"):
            raise ValueError(f"{manifest}:{n}: a row needs an id and an audio path")
        if r["id"] in seen:
            raise ValueError(f"{manifest}:{n}: id {r['id']!r} again; each utterance needs an id of its own (its reference is found by it)")
        seen.add(r["id"])
    if references:
        ref_rows = read_manifest(references)
        if ref_rows and "text" not in ref_rows[0]:
            raise ValueError(f"{references}: the references manifest needs a text column")
        refs = {r["id"]: r["text"] for r in ref_rows}
        missing = [r["id"] for r in rows if r["id"] not in refs]
        if missing:
            raise ValueError(f"{references}: no reference for {len(missing)} of the manifest's ids (first: {missing[0]!r}); "
                             "the references must carry the same ids")
    else:
        if "text" not in rows[0]:
            raise ValueError(f"{manifest}: the manifest needs a text column (the reference), or give --references")
        refs = {r["id"]: r["text"] for r in rows}
    seconds = {}
    for n, r in enumerate(rows, start=2):
        try:
            info = audio_info(manifest.parent / r["audio"])
        except ValueError as e:  # what the path is instead of audio
            raise ValueError(f"{manifest}:{n}: {e}") from None
        if info.frames == 0:
            raise ValueError(f"{manifest}:{n}: {r['audio']} holds no audio samples")
        seconds[r["id"]] = info.frames / info.samplerate
    return rows, refs, seconds


def inpainting_span(n_samples: int, rate: int, rng: random.Random) -> tuple[float, float]:
    """A middle span of 20-40 % of the utterance, in seconds."""
    dur = n_samples / rate
    span = dur * rng.uniform(0.2, 0.4)
    start = rng.uniform(0.25 * (dur - span), 0.75 * (dur - span))
    return round(start, 3), round(start + span, 3)


def evaluate(bundle, task: str, manifest: str | Path, out_dir: str | Path, *, references: str | Path | None = None,
             chunk_ms: list[int] = (320,), options: dict | None = None, realtime: bool = True, limit: int | None = None,
             asr=None, seed: int = 0, progress: bool = True, resume: bool = False, identity: dict | None = None) -> dict:
    """Each utterance's figures go to OUT/utterances.jsonl as it is scored; with `resume` the ones an
    interrupted run of the same evaluation left there are kept, not run again: the same task, test set,
    options, pacing and seed, and `identity` (what the caller knows of the model: the bundle's files, a
    prompt or weights put in its place)."""
    manifest, out = Path(manifest), Path(out_dir)
    rows, refs, seconds = check_test_set(manifest, references, limit)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for results.json, results.md and the plot")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create it ({e.strerror})") from None
    run = {"task": task, "manifest": str(manifest.resolve()), "references": str(Path(references).resolve()) if references else None,
           "options": {k: str(v) for k, v in (options or {}).items()}, "realtime": realtime, "seed": seed, **(identity or {})}
    done = _scored(out / "utterances.jsonl", run) if resume else {}
    log = (out / "utterances.jsonl").open("a" if resume else "w")
    if asr is None:
        from .asr import WhisperASR

        asr = WhisperASR()
    hop = bundle.unit_vocoder.hop
    results = {"task": task, "manifest": str(manifest), "realtime": realtime, "chunks": []}
    for ms in chunk_ms:
        utts = []
        rng = random.Random(seed)
        for i, row in enumerate(rows):
            opts = dict(options or {})
            path = manifest.parent / row["audio"]
            if task == "inpainting":  # a span of the audio as it is (a manifest's n_frames may be off); drawn for
                # every row, scored or not, so that a resumed run masks what the whole run masks
                opts["mask_start"], opts["mask_end"] = inpainting_span(round(seconds[row["id"]] * bundle.sample_rate), bundle.sample_rate, rng)
            if (ms, row["id"]) in done:
                utts.append(done[ms, row["id"]])
                continue
            spoken: list[int] = []  # the units the task committed (for diversity)
            engine = build_engine(bundle, task, opts, chunk_ms=ms, seed=seed)
            engine.on_commit = lambda _, units: spoken.extend(units.tolist())
            stats, sink = Stats(bundle.sample_rate), MemorySink()
            source = _WithControl(FileSource(path, bundle.sample_rate, session=row["id"], realtime=realtime), task, opts)
            asyncio.run(Pipeline(source, engine, sink, stats).run())
            st = stats.sessions[row["id"]]
            wave = sink.wave(row["id"]).numpy()
            summary = st.summary()
            al, al_ca = lagging(st, hop)
            if not realtime:  # unpaced input: wall-clock delays say nothing about a live talker
                al_ca = None
                for k in ("start_offset_ca_ms", "end_offset_ca_ms"):
                    summary.pop(k, None)
            heard, no_speech = asr.hear(wave)
            utt = {"id": row["id"], "reference": refs[row["id"]], "hypothesis": heard, "output_s": len(wave) / bundle.sample_rate,
                   "al_ms": al, "al_ca_ms": al_ca, **{k: summary.get(k) for k in ("start_offset_ms", "end_offset_ms", "start_offset_ca_ms", "end_offset_ca_ms", "rtf", "error")}}
            if task == "continuation":
                utt["distinct_2"] = distinct_ngrams(spoken, 2)
                utt["no_speech"] = no_speech
                utt["speech_like"] = sounds_like_speech(heard, no_speech)
                # the baseline: as many random units through the same vocoder (babble of the same length)
                g = torch.Generator().manual_seed(seed * 100_003 + i)
                babble = bundle.vocode(torch.randint(0, bundle.need("mbart").cfg.num_units, (max(len(spoken), 1),), generator=g))
                utt["babble_speech_like"] = sounds_like_speech(*asr.hear(babble.float().numpy()))
            if task == "inpainting":
                utt["mask"] = [opts["mask_start"], opts["mask_end"]]
                src = read_audio(path, bundle.sample_rate).numpy().copy()
                a, b = (int(x * bundle.sample_rate) for x in utt["mask"])
                # the span's words: what Whisper hears there in the original (timed words)
                ref_words, i0, i1 = span_words(asr.transcribe_words(src), *utt["mask"])
                utt["span_reference"] = " ".join(ref_words[i0:i1])
                src[a:b] = 0.0  # the baseline: the unmasked context, copied, with silence in the gap
                utt["baseline_hypothesis"] = asr.transcribe(src)
                for key in ("", "baseline_"):
                    said = aligned_span(ref_words, i0, i1, normalize(utt[f"{key}hypothesis"]).split())
                    utt[f"{key}span_hypothesis"] = " ".join(said)
            utts.append(utt)
            log.write(json.dumps({"run": run, "chunk_ms": ms, "utterance": utt}, default=float) + "\n")
            log.flush()
            if progress:
                print(f"[{ms} ms] {i + 1}/{len(rows)} {row['id']}: {utt['hypothesis']!r}", flush=True)
        results["chunks"].append(_aggregate(ms, utts, task))
    log.close()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "quality_vs_latency.png")
    return results


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _scored(path: Path, run: dict) -> dict[tuple[int, str], dict]:
    """The utterances an earlier run of the same evaluation scored, by (chunk ms, id); ValueError if the file is another's."""
    done = {}
    if not path.is_file():
        return done
    for line in whole_lines(path).splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # the line an interrupt cut short: that utterance runs again
            continue
        if rec.get("run") != run:
            raise ValueError(f"--resume: {path} holds another evaluation's utterances ({differences(rec.get('run') or {}, run)}); "
                             "evaluate into another --out, "
                             "or drop --resume to start this one anew")
        done[rec["chunk_ms"], rec["utterance"]["id"]] = rec["utterance"]
    return done


def _aggregate(ms: int, utts: list[dict], task: str) -> dict:
    refs, hyps = [u["reference"] for u in utts], [u["hypothesis"] for u in utts]
    agg = {"chunk_ms": ms, "n": len(utts), "asr_bleu": bleu(refs, hyps), "wer": wer(refs, hyps), "cer": cer(refs, hyps),
           "errors": sum(1 for u in utts if u.get("error"))}
    for k in ("start_offset_ms", "end_offset_ms", "al_ms", "start_offset_ca_ms", "end_offset_ca_ms", "al_ca_ms", "rtf", "output_s"):
        agg[k] = _mean(u.get(k) for u in utts)
    if task == "continuation":
        agg["distinct_2"] = _mean(u["distinct_2"] for u in utts)
        agg["intelligible"] = sum(1 for u in utts if u["hypothesis"].strip()) / len(utts)
        agg["speech_like"] = sum(u["speech_like"] for u in utts) / len(utts)
        agg["babble_speech_like"] = sum(u["babble_speech_like"] for u in utts) / len(utts)
    if task == "inpainting":
        agg["baseline_wer"] = wer(refs, [u["baseline_hypothesis"] for u in utts])
        spans = [u for u in utts if u["span_reference"]]  # a span with no word in it says nothing
        agg["span_words"] = sum(len(u["span_reference"].split()) for u in spans)
        for key in ("", "baseline_"):
            sr, sh = [u["span_reference"] for u in spans], [u[f"{key}span_hypothesis"] for u in spans]
            agg[f"{key}span_wer"] = wer(sr, sh) if spans else None
            agg[f"{key}span_cer"] = cer(sr, sh) if spans else None
    agg["utterances"] = utts
    return agg


def markdown(results: dict) -> str:
    cols = ["chunk_ms", "n", "asr_bleu", "wer", "cer", "start_offset_ms", "end_offset_ms", "al_ms", "start_offset_ca_ms",
            "end_offset_ca_ms", "al_ca_ms", "rtf"]
    extra = [c for c in ("distinct_2", "intelligible", "speech_like", "babble_speech_like", "baseline_wer", "span_words", "span_wer", "span_cer", "baseline_span_wer",
                         "baseline_span_cer") if c in results["chunks"][0]]
    head = cols + extra
    lines = [f"task `{results['task']}` on `{results['manifest']}` ({'real-time' if results['realtime'] else 'unpaced'} input)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in results["chunks"]:
        lines.append("| " + " | ".join("-" if c.get(k) is None else (f"{c[k]:.3f}" if isinstance(c[k], float) else str(c[k])) for k in head) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [c["al_ca_ms"] if c.get("al_ca_ms") is not None else c.get("start_offset_ms") for c in results["chunks"]]
    quality = "asr_bleu" if results["task"] == "translation" else "wer"
    ys = [c[quality] for c in results["chunks"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    line = sorted((x, y) for x, y in zip(xs, ys) if x is not None)  # a frontier left to right, not chunk order
    ax.plot([x for x, _ in line], [y for _, y in line], "o-")
    for c, x, y in zip(results["chunks"], xs, ys):
        if x is not None:
            ax.annotate(f"{c['chunk_ms']} ms", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("AL, compute-aware (ms)" if results["chunks"][0].get("al_ca_ms") is not None else "StartOffset (ms)")
    ax.set_ylabel("ASR-BLEU" if quality == "asr_bleu" else "WER")
    ax.set_title(f"{results['task']}: quality vs latency")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
