"""How much of the speech do the units keep, before any vocoder?

Every 10 ms log-mel frame of a test utterance is replaced by the mean log-mel of its unit (the
means are measured on a training manifest), the mel spectrogram is inverted with Griffin-Lim, and
Whisper transcribes it. The same inversion of the true log-mel gives the floor Griffin-Lim itself
sets. A trained vocoder should do better than the unit-mean figure; if it does worse, the vocoder is
what limits resynthesis, not the units.

With `--mel-kmeans K` the same is measured for the alternative unit encoder the issue allows:
k-means with K clusters straight on log-mel (each 20 ms unit frame = its two 10 ms mel frames),
fitted on the same training speech: which inventory keeps more at this size.

    python bench/units_ceiling.py --bundle B --train corpus/en_train.units.tsv --test corpus/en_test.tsv --mel-kmeans 200
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from streamgen.bundle import load_bundle
from streamgen.eval.asr import WhisperASR
from streamgen.eval.metrics import wer
from streamgen.io.files import read_audio
from streamgen.progress import Progress
from streamgen.train.synth import read_manifest
from streamgen.train.units import kmeans
from streamgen.train.vocoder import LogMel

N_FFT, HOP, N_MELS = 1024, 160, 80  # the vocoder loss's log-mel: two frames per 20 ms unit frame


def griffin_lim(logmel: torch.Tensor, fb: torch.Tensor, iters: int = 48) -> torch.Tensor:
    """[frames, n_mels] -> waveform: least-squares linear magnitude, then Griffin-Lim phase."""
    mag = torch.linalg.lstsq(fb.T @ fb + 1e-4 * torch.eye(fb.shape[1]), fb.T @ logmel.exp().T).solution.clamp(min=0)
    window = torch.hann_window(N_FFT)
    phase = torch.exp(2j * torch.pi * torch.rand(mag.shape, generator=torch.Generator().manual_seed(0)))  # reproducible
    for _ in range(iters):
        wave = torch.istft(mag * phase, N_FFT, HOP, window=window)
        spec = torch.stft(wave, N_FFT, HOP, window=window, return_complex=True)
        phase = spec / spec.abs().clamp(min=1e-8)
    return torch.istft(mag * phase, N_FFT, HOP, window=window)


def frame_units(bundle, wave: torch.Tensor, n_frames: int) -> torch.Tensor:
    units, durations = bundle.encode(wave)
    per_frame = torch.repeat_interleave(units, durations)  # one unit per 20 ms
    idx = (torch.arange(n_frames) // 2).clamp(max=len(per_frame) - 1)
    return per_frame[idx]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--train", required=True, help="manifest whose speech gives each unit's mean log-mel")
    ap.add_argument("--test", required=True, help="manifest to resynthesise and transcribe")
    ap.add_argument("--limit", type=int, default=30)
    ap.add_argument("--mel-kmeans", type=int, default=0, help="also: k-means with this many clusters on log-mel")
    args = ap.parse_args()
    b = load_bundle(args.bundle)
    rate, k = b.sample_rate, b.need("kmeans").num_units
    to_mel = LogMel(rate, N_FFT, HOP, N_MELS)
    log_mel = lambda wave: to_mel(wave[None])[0].T  # [T] -> [frames, n_mels]
    fb = to_mel.fb
    sums, counts, pairs = torch.zeros(k, N_MELS), torch.zeros(k), []
    train = read_manifest(args.train)
    with Progress("unit means", len(train)) as bar:
        for r in train:
            wave = read_audio(Path(args.train).parent / r["audio"], rate)
            mel = log_mel(wave)
            u = frame_units(b, wave, len(mel))
            sums.index_add_(0, u, mel)
            counts += torch.bincount(u, minlength=k)
            pairs.append(mel[: len(mel) // 2 * 2].reshape(-1, 2 * N_MELS))  # [F/2, 160]: one row per 20 ms
            bar.update(advance=1)
    means = sums / counts.clamp(min=1)[:, None]
    centroids = kmeans(torch.cat(pairs), args.mel_kmeans) if args.mel_kmeans else None
    asr, refs, hyps = WhisperASR(), [], {"true": [], "units": [], "mel": []}
    test = read_manifest(args.test)[: args.limit]
    with Progress("griffin-lim", len(test)) as bar:
        for r in test:
            wave = read_audio(Path(args.test).parent / r["audio"], rate)
            mel = log_mel(wave)
            refs.append(r["text"])
            hyps["true"].append(asr.transcribe(griffin_lim(mel, fb).numpy()))
            hyps["units"].append(asr.transcribe(griffin_lim(means[frame_units(b, wave, len(mel))], fb).numpy()))
            if centroids is not None:
                x = mel[: len(mel) // 2 * 2].reshape(-1, 2 * N_MELS)
                nearest = torch.cdist(x, centroids).argmin(-1)
                hyps["mel"].append(asr.transcribe(griffin_lim(centroids[nearest].reshape(-1, N_MELS), fb).numpy()))
            bar.update(advance=1)
    print(f"{len(test)} utterances of {args.test}; {int((counts > 0).sum())} of {k} units seen in training")
    print(f"WER, true log-mel + Griffin-Lim (the inversion's floor): {wer(refs, hyps['true']):.3f}")
    print(f"WER, the bundle's {k} units, unit-mean log-mel + Griffin-Lim (what the units keep): {wer(refs, hyps['units']):.3f}")
    if centroids is not None:
        print(f"WER, log-mel k-means {args.mel_kmeans}, centroid log-mel + Griffin-Lim: {wer(refs, hyps['mel']):.3f}")


if __name__ == "__main__":
    main()
