"""The bundle's own units read through a phone recogniser: units that survive a voice never trained on
(issue 12; bench/QUALITY.md "The bundle's own units, read through the recogniser").

For a window of audio, frame by frame (20 ms; m: the bundle's log-mel front-end `LogMelUnits.features`,
mu and sigma its k-means standardisation, P: hama's phone recogniser fine-tuned to read every voice as it
reads the training voice, `models.phone_recogniser`):

    p_t  = softmax over the phones of P(window)_t, the CTC blank left out
    x_t  = [ sqrt(p_t),                                     posterior features (Hellinger geometry)
             (m_t - mean(m)) / std(m) / sqrt(n_mels),       the window's own normalised log-mel
             (m_t - mu) / sigma / sqrt(n_mels) ]            the log-mel as the k-means sees it
    u_t  = argmax_k PhoneNet(x)_t,k                         one of the bundle's K units

    unless the window fits the training voice:  mean_t min_k |(m_t - mu) / sigma - c_k| <= gate
    (c_k: the k-means centroids)  ->  u_t = the k-means unit of m_t, as the bundle's `logmel_units` gives it

The gate is a novelty test: the k-means was fitted on the training voice, and its speech lies closer to the
centroids (windows of 2.6 s: 1.7-2.5 in standardised log-mel) than any other voice's (3.4 and more), so the
training voice keeps the reading that is exact for it, and every other voice is read through the recogniser.

The classifier (`models.phone_net`) learnt to give the training voice's frames their own k-means units and
another voice's frame the unit of the training voice's frame it aligns to, so the language model, the
prompts and the vocoder are the bundle's as they are; only how a frame gets its unit changes.

The recogniser attends to all of its input, so a frame's unit depends on the audio around it. Reading is
defined on windows, the same offline and live: frames are read `stride` at a time, each group from a
window of up to `left` frames before it and `lookahead` after it (`windows`); at the end of the input the
frames left over are read with whatever audio follows them. `read` gives an utterance's units by that
definition; the engine's `PhoneUnitStream` gives the same units as the audio arrives, whatever its
chunking. Windows of equal length run as one batch (no padding, so a row is what it is alone).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from .logmel_units import LogMelUnits
from .phone_net import PhoneNet, PhoneNetConfig
from .phone_recogniser import PhoneRecogniser, PhoneRecogniserConfig, posterior_features


@dataclass
class PhoneUnitsConfig:
    recogniser: PhoneRecogniserConfig = field(default_factory=PhoneRecogniserConfig)
    classifier: PhoneNetConfig = field(default_factory=lambda: PhoneNetConfig(n_mels=190 + 160, dim=192, kernel=5,
                                                                              dilations=[1, 1, 1], num_phones=500))
    left: int = 100  # frames of left context in each window (2 s)
    lookahead: int = 16  # frames of audio after the frames a window reads (320 ms)
    stride: int = 16  # frames read per window (320 ms)
    hop: int = 320  # samples per frame
    kmeans_tasks: list[str] = field(default_factory=list)  # tasks whose sources stay with the k-means reading
    gate: float | None = None  # windows whose k-means fit (`PhoneUnits.fit`) is at most this keep the k-means units

    def __post_init__(self):
        if isinstance(self.recogniser, dict):
            self.recogniser = PhoneRecogniserConfig(**self.recogniser)
        if isinstance(self.classifier, dict):
            self.classifier = PhoneNetConfig(**self.classifier)
        if self.left < 0 or self.lookahead < 0 or self.stride < 1:
            raise ValueError(f"phone units: left ({self.left}) and lookahead ({self.lookahead}) must be >= 0, stride ({self.stride}) >= 1")
        if self.hop != 2 * self.recogniser.hop:
            raise ValueError(f"phone units: the frame hop ({self.hop}) must be twice the recogniser's STFT hop ({self.recogniser.hop})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, cfg: dict) -> PhoneUnitsConfig:
        return cls(**cfg)


def next_window(a: int, n_frames: int, final: bool, left: int, lookahead: int, stride: int) -> tuple[int, int, int, int] | None:
    """The reading window whose first frame is `a`, with `n_frames` frames of input in: (window start, first
    frame read, frames read, window end), in frames. A whole stride once its look-ahead is in; at the end of
    the input (`final`), the frames left over; else None (not yet)."""
    if a + stride + lookahead <= n_frames:
        return max(0, a - left), a, stride, a + stride + lookahead
    if final and a < n_frames:
        return max(0, a - left), a, n_frames - a, n_frames
    return None


def windows(n_frames: int, left: int, lookahead: int, stride: int) -> list[tuple[int, int, int, int]]:
    """The reading windows of a whole input of `n_frames` frames (`next_window` from frame 0 on)."""
    out, a = [], 0
    while (w := next_window(a, n_frames, True, left, lookahead, stride)) is not None:
        out.append(w)
        a += w[2]
    return out


def classifier_inputs(log_probs: Tensor, mel: Tensor, logmel: LogMelUnits, blank: int, standard: Tensor | None = None) -> Tensor:
    """x_t of the module's equations from the recogniser's log-probabilities [..., T, V] and the log-mel
    [..., T, n_mels] of the same window -> [..., T, V - 1 + 2 n_mels]; `standard`: the log-mel already
    standardised (`LogMelUnits.standardise`), where the caller has it."""
    mel = mel.float()
    scale = mel.shape[-1] ** 0.5
    own = (mel - mel.mean(-2, keepdim=True)) / mel.std(-2, keepdim=True).nan_to_num(0.0).clamp_min(1e-3)  # one frame: 0
    standard = logmel.standardise(mel) if standard is None else standard
    return torch.cat([posterior_features(log_probs, blank), own / scale, standard / scale], dim=-1)


class PhoneUnits(nn.Module):
    """Windows of audio -> the bundle's units, per frame; needs the bundle's `LogMelUnits` (front-end
    and standardisation)."""

    def __init__(self, cfg: PhoneUnitsConfig):
        super().__init__()
        self.cfg = cfg
        self.recogniser = PhoneRecogniser(cfg.recogniser)
        self.classifier = PhoneNet(cfg.classifier)

    @property
    def num_units(self) -> int:
        return self.cfg.classifier.num_phones

    @staticmethod
    def fit(standard: Tensor, logmel: LogMelUnits) -> Tensor:
        """Windows' standardised log-mel [B, T, n_mels] (`LogMelUnits.standardise`) -> how far each window
        is from the training voice: the mean distance of its frames to their nearest k-means centroid [B]."""
        return logmel.quantizer.distance(standard).mean(-1)

    @torch.no_grad()
    def frame_units(self, waves: list[Tensor], logmel: LogMelUnits) -> list[Tensor]:
        """Windows (each [S]) -> each one's unit per frame [S // hop]: the k-means units where the window
        fits the training voice as well as its own speech does (`fit` <= `gate`), else the classifier's;
        windows of equal length run as one batch (the recogniser only on the rows that need it)."""
        if self.cfg.gate is not None and logmel.normalises:
            raise ValueError("the gate compares a window's plain log-mel k-means fit; these log-mel units normalise per utterance")
        out: list[Tensor | None] = [None] * len(waves)
        groups: dict[int, list[int]] = {}
        for i, w in enumerate(waves):
            groups.setdefault(len(w), []).append(i)
        dev = next(self.parameters()).device
        for idx in groups.values():
            batch = torch.stack([waves[i] for i in idx]).to(dev, torch.float32)
            n = batch.shape[-1] // self.cfg.hop
            mel = logmel.features(batch)[:, :n].float()
            standard = logmel.standardise(mel)
            units = logmel.quantizer(standard)
            read = torch.ones(len(idx), dtype=torch.bool, device=dev) if self.cfg.gate is None else self.fit(standard, logmel) > self.cfg.gate
            if read.any():
                rows = read.nonzero()[:, 0]
                x = classifier_inputs(self.recogniser(batch[rows])[:, :n], mel[rows], logmel, self.recogniser.blank, standard[rows])
                units[rows] = self.classifier(x).argmax(-1)
            for row, i in enumerate(idx):
                out[i] = units[row].cpu()
        return out

    @torch.no_grad()
    def read(self, wave: Tensor, logmel: LogMelUnits) -> Tensor:
        """An utterance [S] -> one unit per frame [S // hop], read window by window (`windows`)."""
        c = self.cfg
        n = wave.shape[-1] // c.hop
        spans = windows(n, c.left, c.lookahead, c.stride)
        got = self.frame_units([wave[w0 * c.hop : w1 * c.hop] for w0, _, _, w1 in spans], logmel)
        return torch.cat([u[a - w0 : a - w0 + k] for (w0, a, k, _), u in zip(spans, got)]) if spans else torch.zeros(0, dtype=torch.long)
