"""Units from a phone recogniser trained on real speech: do they survive a voice never trained on?
(issue 12, item 2; bench/QUALITY.md "Units from a phone recogniser trained on real speech" and "The bundle's
own units, read through the recogniser")

Every unit candidate measured before (log-mel k-means, normalised log-mel, phone targets from the TTS
engines' alignments, a second HuBERT iteration, a classifier onto the training voice's units) learnt its
notion of a sound from five to eight synthetic voices, and none brought the unseen voices near 0.45.
`hama` (Apache-2.0, REFERENCE.md) ships a waveform -> IPA phone CTC recogniser whose output frames are
320 samples at 16 kHz, this project's unit hop; `streamgen.models.phone_recogniser` runs it in torch.

New units (features, fit, prepare): each 20 ms frame's phone posteriors (the blank dropped and the rest
renormalised, square-rooted so that Euclidean k-means compares them by the Hellinger distance) are clustered
on the training voice's speech, a source-filter vocoder is trained on those units exactly as the shipped one
was (recipes/natural.sh step 3). With `--logmel-weight W`, the units are k-means of the posteriors and,
beside them, the voice's per-utterance normalised log-mel scaled to W times their norm.

The bundle's own units (voices, tune, targets, classify): the training texts are said again by other
training voices (never flite rms or espeak-ng en-us, the test voices); the recogniser is fine-tuned on them
to read every voice as it reads the training voice's saying of the same text; and a classifier learns, from
its posteriors and the log-mel, the unit the bundle's k-means gives the training voice's frame that each
frame of any voice lands on. The units, the Unit mBART, the translation backbone, the prompts and the
vocoder all stay as shipped; only how a frame is given its unit changes.

Scored as QUALITY.md's rows are: units in the talker's timing -> vocoder -> Whisper tiny.en, 40 natural test
sentences per voice, beside the original audio and the shipped bundle's own units and vocoder; `windows`
measures what a stream would get from windows of left context and look-ahead.

    pip install hama==1.7.0          # its weight package (a dev dependency, as the port's oracle)
    python bench/phone_posterior_units.py features --manifest R/corpus/nat_train.tsv --out RUN/train.pt
    python bench/phone_posterior_units.py fit --features RUN/train.pt --units 150 --out RUN/units150.pt
    python bench/phone_posterior_units.py prepare --manifest R/corpus/nat_train.tsv --codebook RUN/units150.pt --out RUN/voc_data150.pt
    python -m streamgen.train.source_filter train --data RUN/voc_data150.pt --out RUN/sf150 --steps 4000 --batch-size 8 --segment 32 --units 150
    python bench/phone_posterior_units.py score --corpus R/corpus --codebook RUN/units150.pt --vocoder RUN/sf150 --json RUN/score150.json

    pip install hibari-tts           # the heart voice (REFERENCE.md)
    python bench/phone_posterior_units.py voices --manifest R/corpus/nat_train.tsv --out PAR \
        --tts awb kal16 slt kal heart es:en-gb es:en-gb-scotland+f3 es:en-029+m3 es:en-gb-x-rp+f2
    python bench/phone_posterior_units.py tune --manifest R/corpus/nat_train.tsv --parallel PAR/par_*.tsv --out RUN/tune
    python bench/phone_posterior_units.py targets --manifest R/corpus/nat_train.tsv --parallel PAR/par_*.tsv \
        --weights RUN/tune/model_800.pt --out RUN/targets.pt
    python bench/phone_posterior_units.py classify --targets RUN/targets.pt --out RUN/classifier.pt
    python bench/phone_posterior_units.py windowed --targets RUN/targets.pt --manifest R/corpus/nat_train.tsv \
        --parallel PAR/par_*.tsv --weights RUN/tune/model_800.pt --out RUN/targets_w0.pt --part 0/2   # and 1/2
    python bench/phone_posterior_units.py classify --targets RUN/targets_w0.pt RUN/targets_w1.pt --dim 192 \
        --own-share 0.45 --steps 6000 --out RUN/classifier_w.pt          # what ships (recipes/natural.sh 11g)
    python -m streamgen.train.phone_units --bundle B --recogniser RUN/tune/model_800.pt --classifier RUN/classifier_w.pt \
        --own R/corpus/nat_train.tsv --others PAR/par_*.tsv
    python bench/phone_posterior_units.py score --corpus R/corpus --bundle B
    python bench/phone_posterior_units.py score --corpus R/corpus --weights RUN/tune/model_800.pt --classifier RUN/classifier.pt
    python bench/phone_posterior_units.py windows --corpus R/corpus --weights RUN/tune/model_800.pt --classifier RUN/classifier.pt --spans 50:8
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from streamgen.models.logmel_units import LogMelUnits, LogMelUnitsConfig
from streamgen.models.phone_recogniser import PhoneRecogniser, posterior_features

RATE, HOP = 16000, 320


def recogniser(weights: Path | None = None) -> PhoneRecogniser:
    """hama's phone recogniser in torch (`streamgen.models.phone_recogniser`), from `weights` or the
    `asr_waveform.hama` that the installed hama package ships; `weights` may also be a state dict
    (.pt) that `tune` wrote, on top of the installed package's model."""
    if weights is not None and weights.suffix == ".pt":
        model = recogniser(None)
        model.load_state_dict(torch.load(weights))
        return model.eval()
    if weights is None:
        try:
            import hama
        except ImportError as e:
            raise SystemExit(f"hama is not installed ({e}): pip install hama==1.7.0, or give --weights asr_waveform.hama") from None
        weights = Path(hama.__file__).parent / "assets" / "asr_waveform.hama"
    return PhoneRecogniser.from_hamapk(weights)


def log_posteriors(model: PhoneRecogniser, wave: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(wave)


@functools.cache
def logmel_frontend() -> LogMelUnits:
    return LogMelUnits(LogMelUnitsConfig())


def normalised_logmel(wave: torch.Tensor) -> torch.Tensor:
    """The log-mel of the bundle's unit encoder, less its per-utterance mean, over its standard deviation
    (what a voice's own timbre leaves after the speaker normalisation of QUALITY.md's comparison)."""
    return normalised(logmel_frontend().features(wave))


def normalised(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(0)) / x.std(0).clamp_min(1e-3)


def unit_features(log_probs: torch.Tensor, logmel: torch.Tensor, codebook: dict) -> torch.Tensor:
    """Posterior features, and with a log-mel weight w > 0 beside them the normalised log-mel scaled to
    w times their norm (both are about 20 ms frames; the log-mel's are 10 ms later)."""
    x = posterior_features(log_probs, codebook["blank"])
    w = codebook.get("logmel_weight", 0.0)
    if not w:
        return x
    n = min(len(x), len(logmel))
    return torch.cat([x[:n], w * logmel[:n].float() / logmel.shape[1] ** 0.5], dim=1)


def features(manifests: list[str], out: Path, weights: Path | None) -> None:
    from streamgen.io.files import read_audio
    from streamgen.train.synth import read_manifest

    model = recogniser(weights)
    rows = [(Path(m).parent, r) for m in manifests for r in read_manifest(m)]
    data, logmel = {}, {}
    for i, (root, r) in enumerate(rows):
        wave = read_audio(root / r["audio"], RATE)
        data[r["id"]] = log_posteriors(model, wave).half()
        logmel[r["id"]] = normalised_logmel(wave).half()
        if i % 100 == 0:
            print(f"features {i}/{len(rows)}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"blank": model.blank, "log_probs": data, "logmel": logmel}, out)


def fit(features_path: Path, units: int, out: Path, logmel_weight: float = 0.0, max_frames: int = 200_000) -> None:
    from streamgen.train.units import kmeans

    f = torch.load(features_path)
    codebook = {"blank": f["blank"], "logmel_weight": logmel_weight}
    x = torch.cat([unit_features(lp, f["logmel"][k], codebook) for k, lp in f["log_probs"].items()])
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:max_frames]]
    torch.save(codebook | {"centroids": kmeans(x, units, iters=30, seed=0)}, out)
    print(f"{units} units from {len(x)} frames", flush=True)


def assign(log_probs: torch.Tensor, logmel: torch.Tensor, codebook: dict) -> torch.Tensor:
    x = unit_features(log_probs, logmel, codebook)
    return torch.cdist(x, codebook["centroids"]).argmin(1)


def prepare(manifests: list[str], codebook_path: Path, out: Path, weights: Path | None) -> None:
    """The vocoder's training data, written by `streamgen.train.source_filter.prepare` with these units."""
    from streamgen.train.source_filter import prepare as vocoder_data

    model, codebook = recogniser(weights), torch.load(codebook_path)
    vocoder_data(manifests, lambda wave: assign(log_posteriors(model, wave), normalised_logmel(wave), codebook), out, hop=HOP)


# --- the recogniser tuned to synthetic voices -------------------------------------------------------

class Hibari:
    """hibari-tts's bundled voice (af_heart; REFERENCE.md), at 16 kHz."""

    def __init__(self):
        try:
            import hibari
        except ImportError as e:
            raise SystemExit(f"hibari-tts is not installed ({e}): pip install hibari-tts") from None
        self.tts = hibari.Hibari()

    def __call__(self, text: str, speed: float = 1.0):
        from streamgen.io.files import resample

        return resample(self.tts(text, speed=speed), self.tts.sample_rate, RATE)


def tts_voice(name: str):
    """A training voice by name: flite's awb, kal, kal16, slt; hibari's heart; espeak-ng English accents
    other than en-us as `es:<voice>` (e.g. es:en-gb-scotland+f3). flite rms and espeak-ng en-us are the
    unseen test voices and are refused."""
    from streamgen.train.natural import Flite
    from streamgen.train.synth import Espeak

    if name == "rms" or name.startswith("es:en-us"):
        raise SystemExit(f"{name} is a test voice (bench/QUALITY.md): it must stay out of training")
    if name.startswith("es:"):
        return Espeak(name[3:])
    if name == "heart":
        return Hibari()
    if name in ("awb", "kal", "kal16", "slt"):
        return Flite(name)
    raise SystemExit(f"unknown voice {name!r}: flite awb/kal/kal16/slt, heart (hibari-tts) or es:<espeak-ng voice>")


def voices(manifest: str, names: list[str], out: Path) -> None:
    """The manifest's texts said again by each voice (speed 0.9-1.1), as `out`/par_<voice>.tsv with the
    same ids: parallel speech for `tune`. Resumable: audio already written is kept."""
    import random

    import soundfile as sf

    from streamgen.train.synth import read_manifest, write_manifest

    rows = read_manifest(manifest)
    for name in names:
        tts, rng, tag = tts_voice(name), random.Random(name), name.replace(":", "").replace("+", "_")
        written = []
        for i, r in enumerate(rows):
            rel = Path("audio") / tag / f"{r['id']}.flac"
            speed = rng.uniform(0.9, 1.1)
            if not (out / rel).exists():
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                sf.write(out / rel, tts(r["text"], speed), RATE, subtype="PCM_16")
            written.append({"id": r["id"], "audio": str(rel), "n_frames": sf.info(out / rel).frames, "text": r["text"], "voice": name})
            if i % 200 == 0:
                print(f"{name} {i}/{len(rows)}", flush=True)
        write_manifest(out / f"par_{tag}.tsv", written)


def greedy(log_probs: torch.Tensor, blank: int) -> list[int]:
    """CTC best path: the frames' most likely tokens, repeats merged, blanks dropped."""
    best = log_probs.argmax(1).tolist()
    return [t for i, t in enumerate(best) if t != blank and (i == 0 or t != best[i - 1])]


def tune(manifest: str, parallel: list[str], out: Path, steps: int, batch: int = 8, lr: float = 1e-4, kl: float = 1.0,
         own_share: float = 0.25, dev: int = 40, weights: Path | None = None) -> None:
    """Fine-tune the recogniser on parallel speech. Targets: the original recogniser's own reading (CTC best
    path) of the training voice's utterance of the same text, so every voice learns to be read as the
    training voice is; on the training voice's own utterances, beside that CTC loss, the KL divergence from
    the original's posteriors, so its frames keep what its units were fitted on. AdamW, linear warm-up over
    50 steps, gain +-6 dB; the last `dev` texts are held out in every voice. Resumable from out/last.pt;
    writes out/model_<step>.pt (a state dict for --weights) every 100 steps."""
    import copy
    import random

    from streamgen.io.files import read_audio
    from streamgen.train.synth import read_manifest

    torch.manual_seed(0)
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_manifest(manifest)
    path = {("", r["id"]): Path(manifest).parent / r["audio"] for r in rows}
    names = []
    for m in parallel:
        for r in read_manifest(m):
            path[(r["voice"], r["id"])] = Path(m).parent / r["audio"]
        names.append(r["voice"])
    ids = [r["id"] for r in rows]
    train_ids, dev_ids = ids[:-dev], ids[-dev:]
    teacher = recogniser(weights)
    with torch.no_grad():
        original = {i: teacher(read_audio(path[("", i)], RATE)).half() for i in ids}
    labels = {i: torch.tensor(greedy(original[i].float(), teacher.blank)) for i in ids}
    student = copy.deepcopy(teacher).train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    start = 0
    if (out / "last.pt").exists():
        state = torch.load(out / "last.pt")
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]

    def dev_per() -> dict[str, float]:  # phone error rate: jiwer's word error rate over phone tokens
        import jiwer

        student.eval()
        per = {}
        with torch.no_grad():
            for v in [""] + names:
                heard = [greedy(student(read_audio(path[(v, i)], RATE)), student.blank) for i in dev_ids]
                per[v or "training voice"] = round(jiwer.wer([" ".join(map(str, labels[i].tolist())) for i in dev_ids],
                                                              [" ".join(map(str, h)) or "-" for h in heard]), 3)
        student.train()
        return per

    if start == 0:
        print("dev phone error against the training voice's reading, step 0:", dev_per(), flush=True)
    for step in range(start + 1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 50)
        opt.zero_grad()
        ctc_sum = kl_sum = 0.0
        for _ in range(batch):
            i = rng.choice(train_ids)
            v = "" if rng.random() < own_share else rng.choice(names)
            wave = read_audio(path[(v, i)], RATE) * 10 ** (rng.uniform(-6, 6) / 20)
            lp = student(wave)
            y = labels[i]
            loss = F.ctc_loss(lp[:, None], y[None], torch.tensor([len(lp)]), torch.tensor([len(y)]), blank=student.blank, zero_infinity=True)
            ctc_sum += loss.item()
            if v == "":
                t = original[i].float()[: len(lp)]
                divergence = (t.exp() * (t - lp[: len(t)])).sum(1).mean()
                loss = loss + kl * divergence
                kl_sum += divergence.item()
            (loss / batch).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        opt.step()
        if step % 10 == 0:
            print(f"step {step}: ctc {ctc_sum / batch:.3f}, kl {kl_sum / batch:.4f}", flush=True)
        if step % 100 == 0 or step == steps:
            torch.save({"model": student.state_dict(), "opt": opt.state_dict(), "step": step}, out / "last.pt")
            torch.save(student.state_dict(), out / f"model_{step}.pt")
            print(f"dev phone error against the training voice's reading, step {step}:", dev_per(), flush=True)


# --- the bundle's own units, read through the recogniser ---------------------------------------------

def classifier_inputs(model: PhoneRecogniser, wave: torch.Tensor, bundle) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-posteriors [T, V], inputs [T', V - 1 + 160]): the posterior features, the per-utterance
    normalised log-mel and the log-mel standardised as the bundle's k-means sees it, each block about unit
    norm per frame (T' = the frames all three have)."""
    from streamgen.models.phone_units import classifier_inputs as inputs

    log_probs, mel = log_posteriors(model, wave), bundle.logmel_units.features(wave)
    n = min(len(log_probs), len(mel))
    return log_probs, inputs(log_probs[:n], mel[:n], bundle.logmel_units, model.blank)


def targets(manifest: str, parallel: list[str], out: Path, weights: Path | None) -> None:
    """Classifier data: each utterance's inputs, and per frame the bundle's own unit for the training voice
    (what its k-means gives), or for another voice the unit of the training voice's frame it lands on
    when the two sayings of the text are aligned by dynamic time warping over the posterior features
    (cost 1 - their inner product, the Hellinger affinity; `voice_to_units.align`'s steps)."""
    from voice_to_units import align

    from streamgen import load_bundle
    from streamgen.io.files import read_audio
    from streamgen.train.synth import read_manifest

    model, bundle = recogniser(weights), load_bundle(None)
    data, own, skipped = [], {}, 0
    for m in [manifest] + parallel:
        for k, r in enumerate(read_manifest(m)):
            wave = read_audio(Path(m).parent / r["audio"], RATE)
            log_probs, x = classifier_inputs(model, wave, bundle)
            post = x[:, : log_probs.shape[1] - 1]  # the inputs' first block: the posterior features
            if m == manifest:
                y = bundle.logmel_units(wave)[: len(x)]
                x, post = x[: len(y)], post[: len(y)]
                own[r["id"]] = (post, y)
                voice = "training voice"
            else:
                post_own, y_own = own[r["id"]]
                path = align((1 - post @ post_own.T).numpy())
                if path is None:
                    skipped += 1
                    continue
                y, voice = y_own[torch.from_numpy(path)], r["voice"]
            data.append({"id": r["id"], "voice": voice, "x": x.half(), "y": y.short()})
            if k % 200 == 0:
                print(f"targets {m}: {k}", flush=True)
    torch.save(data, out)
    print(f"{len(data)} utterances, {skipped} without an alignment", flush=True)


def window_inputs(model: PhoneRecogniser, wave: torch.Tensor, bundle, left: int, ahead: int, stride: int) -> torch.Tensor:
    """The classifier's inputs as a stream reads `wave`: each frame's from its reading window
    (`streamgen.models.phone_units.windows`), windows of one length in one recogniser call."""
    from streamgen.models.phone_units import classifier_inputs as inputs, windows as reading_windows

    spans = reading_windows(len(wave) // HOP, left, ahead, stride)
    groups: dict[int, list[int]] = {}
    for i, (w0, _, _, w1) in enumerate(spans):
        groups.setdefault(w1 - w0, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(spans)
    with torch.no_grad():
        for n, idx in groups.items():
            batch = torch.stack([wave[spans[i][0] * HOP : spans[i][3] * HOP] for i in idx])
            x = inputs(model(batch)[:, :n], bundle.logmel_units.features(batch)[:, :n], bundle.logmel_units, model.blank)
            for row, i in enumerate(idx):
                w0, a, k, _ = spans[i]
                out[i] = x[row, a - w0 : a - w0 + k]
    return torch.cat(out)


def windowed(targets_path: Path, manifest: str, parallel: list[str], weights: Path | None, out: Path, spans: tuple[int, int, int],
             part: tuple[int, int] = (0, 1)) -> None:
    """`targets`' file with every utterance's inputs made as a stream makes them (`window_inputs`; LEFT, AHEAD,
    STRIDE frames), so that the classifier learns from what it will be given; the targets stay. `part` (i, n):
    only the i-th of n slices of the utterances (run n jobs, then `classify` the files together)."""
    from streamgen import load_bundle
    from streamgen.io.files import read_audio
    from streamgen.train.synth import read_manifest

    model, bundle = recogniser(weights), load_bundle(None)
    audio = {}
    for m in [manifest] + parallel:
        for r in read_manifest(m):
            audio["training voice" if m == manifest else r["voice"], r["id"]] = Path(m).parent / r["audio"]
    data = torch.load(targets_path)
    data = data[part[0] :: part[1]]
    for k, d in enumerate(data):
        x = window_inputs(model, read_audio(audio[d["voice"], d["id"]], RATE), bundle, *spans)
        d["x"] = x[: len(d["y"])].half()
        if k % 500 == 0:
            print(f"windowed: {k} / {len(data)}", flush=True)
    torch.save(data, out)


def classify(targets_path: list[Path], out: Path, steps: int, own_share: float = 0.3, dim: int = 256, kernel: int = 5, dev: int = 40,
             batch: int = 8, frames: int = 150, lr: float = 1e-3) -> None:
    """A `PhoneNet` (three residual convolutions, 6 frames of look-ahead) from the inputs to the bundle's
    500 units: windows of `frames` frames, `own_share` of them from the training voice and the rest from
    any voice; AdamW, warm-up over 100 steps then cosine decay, label smoothing 0.1; the last `dev` texts
    of the training voice's manifest are held out in every voice."""
    import math
    import random

    from streamgen.models.phone_net import PhoneNet, PhoneNetConfig

    torch.manual_seed(0)
    rng = random.Random(0)
    data = [d for path in targets_path for d in torch.load(path)]
    ids = list(dict.fromkeys(d["id"] for d in data))
    held = set(ids[-dev:])
    train, dev_set = [d for d in data if d["id"] not in held], [d for d in data if d["id"] in held]
    own = [d for d in train if d["voice"] == "training voice"]
    cfg = PhoneNetConfig(n_mels=data[0]["x"].shape[1], dim=dim, kernel=kernel, dilations=[1, 1, 1], num_phones=500)
    net = PhoneNet(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr, weight_decay=0.01)
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        xs, ys = [], []
        for _ in range(batch):
            d = rng.choice(own) if rng.random() < own_share else rng.choice(train)
            s = rng.randrange(max(1, len(d["x"]) - frames + 1))
            xs.append(d["x"][s : s + frames].float())
            ys.append(d["y"][s : s + frames].long())
        loss = sum(F.cross_entropy(net(x[None])[0], y, label_smoothing=0.1) for x, y in zip(xs, ys)) / batch
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == steps:
            with torch.no_grad():
                acc = {}
                for v in dict.fromkeys(d["voice"] for d in dev_set):
                    hits = torch.cat([net(d["x"][None].float())[0].argmax(1) == d["y"].long() for d in dev_set if d["voice"] == v])
                    acc[v] = round(hits.float().mean().item(), 3)
            print(f"step {step}: loss {loss.item():.3f}, dev frame accuracy {acc}", flush=True)
            torch.save({"config": cfg.to_dict(), "model": net.state_dict()}, out)


def load_classifier(path: Path):
    from streamgen.models.phone_net import PhoneNet, PhoneNetConfig

    state = torch.load(path)
    net = PhoneNet(PhoneNetConfig(**state["config"]))
    net.load_state_dict(state["model"])
    return net.eval()


def classified_units(net, model: PhoneRecogniser, wave: torch.Tensor, bundle) -> torch.Tensor:
    """The bundle's units of `wave`, one per frame, as the classifier reads them."""
    with torch.no_grad():
        return net(classifier_inputs(model, wave, bundle)[1][None])[0].argmax(1)


def speak(vocoder, units: torch.Tensor) -> torch.Tensor:
    """Units one per frame (the talker's timing) -> waveform."""
    with torch.no_grad():
        return vocoder.generate(units).float().reshape(-1)


def windows(corpus: Path, voices: list[str], weights: Path | None, classifier_path: Path, spans: list[tuple[int, int]],
            chunk: int = 16, utterances: int = 40) -> None:
    """What streaming would cost: the recogniser attends to the whole utterance, so a stream reads each
    chunk of `chunk` frames (320 ms) from a window of `left` frames before it and `ahead` after it (the
    inputs' per-utterance normalisation then runs over the window). Per (left, ahead): the share of frames
    whose classified unit equals the whole-utterance one, the compute against real time, and Whisper's WER
    on the windowed units through the bundle's vocoder."""
    import time

    from streamgen import load_bundle
    from streamgen.eval.asr import WhisperASR
    from streamgen.eval.metrics import wer
    from streamgen.io.files import read_audio
    from streamgen.train.synth import read_manifest

    model, bundle, net, asr = recogniser(weights), load_bundle(None), load_classifier(classifier_path), WhisperASR()

    units = lambda wave: classified_units(net, model, wave, bundle)
    for left, ahead in spans:
        same = total = 0
        seconds = spent = 0.0
        wers = {}
        for v in voices:
            manifest = corpus / f"nat_test_{v}.tsv"
            refs, hyps = [], []
            for r in read_manifest(manifest)[:utterances]:
                wave = read_audio(manifest.parent / r["audio"], RATE)
                whole = units(wave)
                t0, got = time.perf_counter(), []
                for s in range(0, len(whole), chunk):
                    a = max(0, s - left)
                    got.append(units(wave[a * HOP : (s + chunk + ahead) * HOP])[s - a : s - a + chunk])
                spent += time.perf_counter() - t0
                got = torch.cat(got)[: len(whole)]
                same += int((got == whole[: len(got)]).sum())
                total, seconds = total + len(got), seconds + len(wave) / RATE
                refs.append(r["text"])
                hyps.append(asr.transcribe(speak(bundle.unit_vocoder, got).numpy()))
            wers[v] = round(wer(refs, hyps), 3)
        print(f"left {left} ahead {ahead} frames: units equal to whole-utterance {same / total:.3f}, "
              f"compute {spent / seconds:.3f} x real time, WER {wers}", flush=True)


def score(corpus: Path, voices: list[str], json_path: Path | None, weights: Path | None, codebook_path: Path | None = None,
          vocoder_path: Path | None = None, classifier_path: Path | None = None, bundle_path: Path | None = None) -> None:
    """Whisper's WER per test voice on the original audio, on the bundle's own units and vocoder, and on
    the candidates given: posterior units through their vocoder (`codebook_path`, `vocoder_path`), the
    bundle's units as the classifier reads them through the bundle's vocoder (`classifier_path`), and
    another bundle's own reading and vocoder (`bundle_path`: with a phone_units part, its windows); all in
    the talker's timing (one unit per frame)."""
    from streamgen import load_bundle
    from streamgen.eval.asr import WhisperASR
    from streamgen.eval.metrics import wer
    from streamgen.io.files import read_audio
    from streamgen.train.source_filter import load_vocoder
    from streamgen.train.synth import read_manifest

    model, asr, bundle = recogniser(weights), WhisperASR(), load_bundle(None)
    hear = lambda wave: asr.transcribe(wave.numpy())

    rows = {"original": lambda wave: wave, "shipped units and vocoder": lambda wave: speak(bundle.unit_vocoder, bundle.logmel_units(wave))}
    if codebook_path and vocoder_path:
        codebook, vocoder = torch.load(codebook_path), load_vocoder(vocoder_path)
        rows["phone-posterior units"] = lambda wave: speak(vocoder, assign(log_posteriors(model, wave), normalised_logmel(wave), codebook))
    if classifier_path:
        net = load_classifier(classifier_path)
        rows["the bundle's units by the classifier"] = lambda wave: speak(bundle.unit_vocoder, classified_units(net, model, wave, bundle))
    if bundle_path:
        other = load_bundle(bundle_path)
        rows[f"bundle {bundle_path.name}"] = lambda wave: speak(other.unit_vocoder, torch.repeat_interleave(*other.encode(wave)))
    results = {}
    for v in voices:
        manifest = corpus / f"nat_test_{v}.tsv"
        refs, heard = [], {name: [] for name in rows}
        for r in read_manifest(manifest):
            wave = read_audio(manifest.parent / r["audio"], RATE)
            refs.append(r["text"])
            for name, make in rows.items():
                heard[name].append(hear(make(wave)))
        results[v] = {name: round(wer(refs, hyps), 3) for name, hyps in heard.items()}
        print(v, results[v], flush=True)
    if json_path:
        json_path.write_text(json.dumps(results, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=["voices", "tune", "features", "fit", "prepare", "targets", "windowed", "classify", "windows", "score"])
    ap.add_argument("--manifest", nargs="+", default=[])
    ap.add_argument("--features", type=Path)
    ap.add_argument("--units", type=int, default=500)
    ap.add_argument("--logmel-weight", type=float, default=0.0, help="fit: the normalised log-mel beside the posteriors, at this weight (0: none)")
    ap.add_argument("--codebook", type=Path)
    ap.add_argument("--vocoder", type=Path)
    ap.add_argument("--corpus", type=Path)
    ap.add_argument("--voices", nargs="+", default=["joe", "rms", "espeak"])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--weights", type=Path, help="hama's asr_waveform.hama (default: the installed hama package's), or a state dict from tune")
    ap.add_argument("--tts", nargs="+", default=["awb", "kal16", "slt", "kal", "heart"], help="voices: the training voices to say the texts")
    ap.add_argument("--parallel", nargs="+", default=[], help="tune: par_<voice>.tsv manifests written by voices")
    ap.add_argument("--steps", type=int, help="optimiser steps of 8 utterances (tune, default 800) or windows (classify, default 3000)")
    ap.add_argument("--targets", type=Path, nargs="+", help="classify, windowed: the file(s) targets (or windowed) wrote")
    ap.add_argument("--window", default="100:16:16", help="windowed: LEFT:AHEAD:STRIDE frames of the reading windows")
    ap.add_argument("--part", default="0/1", help="windowed: I/N, the I-th of N slices of the utterances")
    ap.add_argument("--own-share", type=float, default=0.3, help="classify: share of training windows from the training voice")
    ap.add_argument("--bundle", type=Path, help="score: also this bundle's own reading (encode) and vocoder")
    ap.add_argument("--dim", type=int, default=256, help="classify: the classifier's width")
    ap.add_argument("--kernel", type=int, default=5, help="classify: its convolutions' kernel (look-ahead 3 (kernel - 1) / 2 frames)")
    ap.add_argument("--classifier", type=Path, help="score, windows: the bundle's units read by this classifier (classify's output)")
    ap.add_argument("--spans", nargs="+", default=["50:8"], help="windows: LEFT:AHEAD frames of context around each 16-frame chunk")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.stage == "voices":
        voices(args.manifest[0], args.tts, args.out)
    elif args.stage == "tune":
        tune(args.manifest[0], args.parallel, args.out, args.steps or 800, weights=args.weights)
    elif args.stage == "features":
        features(args.manifest, args.out, args.weights)
    elif args.stage == "fit":
        fit(args.features, args.units, args.out, args.logmel_weight)
    elif args.stage == "prepare":
        prepare(args.manifest, args.codebook, args.out, args.weights)
    elif args.stage == "targets":
        targets(args.manifest[0], args.parallel, args.out, args.weights)
    elif args.stage == "windowed":
        window = tuple(int(n) for n in args.window.split(":"))
        part = tuple(int(n) for n in args.part.split("/"))
        windowed(args.targets[0], args.manifest[0], args.parallel, args.weights, args.out, window, part)
    elif args.stage == "classify":
        classify(args.targets, args.out, args.steps or 3000, args.own_share, args.dim, args.kernel)
    elif args.stage == "windows":
        spans = [tuple(int(n) for n in span.split(":")) for span in args.spans]
        windows(args.corpus, args.voices, args.weights, args.classifier, spans)
    else:
        score(args.corpus, args.voices, args.json, args.weights, args.codebook, args.vocoder, args.classifier, args.bundle)


if __name__ == "__main__":
    main()
