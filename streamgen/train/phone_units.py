"""Put a trained phone-unit reader into a bundle (`models.phone_units`): the fine-tuned recogniser and the
unit classifier that `bench/phone_posterior_units.py` trains (stages voices, tune, targets, classify;
recipes/natural.sh step 11g), as the bundle's `phone_units` part beside its `logmel_units`.

    python -m streamgen.train.phone_units --bundle DIR --recogniser RUN/tune/model_800.pt \\
        --classifier RUN/classifier.pt --kmeans-tasks translation --own nat_train.tsv --others PAR/par_*.tsv

The gate (`PhoneUnitsConfig.gate`): windows of the training voice keep the k-means reading, which is exact for
it; it is set halfway between how well the k-means fits the training voice's worst window and another
training voice's best (`--own`, `--others`; every fifth utterance).

The recogniser file is a state dict of `PhoneRecogniser` (hama's shapes); the classifier file holds
{"config": PhoneNetConfig fields, "model": state dict}. Both are read with `weights_only` (no code runs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from torch import Tensor

from ..bundle import BundleError, load_bundle, save_part
from ..io.files import read_audio
from ..models.phone_net import PhoneNetConfig
from ..models.phone_recogniser import PhoneRecogniserConfig
from ..models.phone_units import PhoneUnits, PhoneUnitsConfig, windows
from .synth import read_manifest


def recogniser_config(state: dict) -> PhoneRecogniserConfig:
    """The recogniser's sizes from its weights' shapes."""
    try:
        dim, vocab = state["stem.weight"].shape[0], state["proj.weight"].shape[0]
        layers = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        return PhoneRecogniserConfig(dim=dim, layers=layers, kernel=state["blocks.0.conv.depthwise.weight"].shape[-1], vocab=vocab,
                                     n_fft=2 * (state["mel_fb"].shape[0] - 1))
    except KeyError as e:
        raise ValueError(f"not a PhoneRecogniser state dict (no {e})") from None


def window_fits(reader: PhoneUnits, logmel, manifests: list[str], every: int = 5) -> Tensor:
    """`PhoneUnits.fit` of every reading window (`windows`) of every `every`-th utterance of the manifests."""
    c, fits = reader.cfg, []
    for m in manifests:
        for r in read_manifest(m)[::every]:
            wave = read_audio(Path(m).parent / r["audio"], logmel.cfg.sample_rate)
            for w0, _, _, w1 in windows(len(wave) // c.hop, c.left, c.lookahead, c.stride):
                fits.append(reader.fit(logmel.standardise(logmel.features(wave[w0 * c.hop : w1 * c.hop])[None]), logmel))
    return torch.cat(fits)


def gate_between(reader: PhoneUnits, logmel, own: list[str], others: list[str]) -> float:
    """The gate halfway between the training voice's worst-fitting window and the other training voices'
    best-fitting one (an error if they overlap: then the k-means reading cannot tell them apart)."""
    worst_own, best_other = window_fits(reader, logmel, own).max().item(), window_fits(reader, logmel, others).min().item()
    print(f"window fit: the training voice at most {worst_own:.3f}, the other voices at least {best_other:.3f}")
    if worst_own >= best_other:
        raise ValueError(f"the training voice's windows ({worst_own:.3f}) and the others' ({best_other:.3f}) overlap: no gate")
    return round((worst_own + best_other) / 2, 3)


def pack(bundle: Path, recogniser: Path, classifier: Path, kmeans_tasks: list[str], left: int = 100, lookahead: int = 16,
         stride: int = 16, own: list[str] = (), others: list[str] = ()) -> PhoneUnits:
    """Write the reader into `bundle` (its `logmel_units` must be the units the classifier was trained on);
    with the training voice's manifests (`own`) and other voices' (`others`), with the gate between them."""
    b = load_bundle(bundle)
    if b.logmel_units is None:
        raise BundleError(f"{bundle}: the reader gives a logmel_units part's units, and this bundle has none")
    rec = torch.load(recogniser, map_location="cpu", weights_only=True)
    clf = torch.load(classifier, map_location="cpu", weights_only=True)
    cfg = PhoneUnitsConfig(recogniser=recogniser_config(rec), classifier=PhoneNetConfig(**clf["config"]), left=left,
                           lookahead=lookahead, stride=stride, hop=b.unit_hop, kmeans_tasks=list(kmeans_tasks))
    if cfg.classifier.num_phones != b.logmel_units.num_units:
        raise ValueError(f"the classifier gives {cfg.classifier.num_phones} units, the bundle's k-means has {b.logmel_units.num_units}")
    reader = PhoneUnits(cfg)
    reader.recogniser.load_state_dict(rec)
    reader.classifier.load_state_dict(clf["model"])
    if own and others:
        reader.cfg.gate = gate_between(reader, b.logmel_units, list(own), list(others))
    save_part(bundle, "phone_units", reader)
    return reader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--recogniser", type=Path, required=True, help="the fine-tuned recogniser's state dict (tune's model_<step>.pt)")
    ap.add_argument("--classifier", type=Path, required=True, help="classify's output")
    ap.add_argument("--kmeans-tasks", nargs="*", default=["translation"],
                    help="tasks whose input keeps the k-means reading (their models learnt another language's units)")
    ap.add_argument("--left", type=int, default=100, help="frames of left context per window")
    ap.add_argument("--lookahead", type=int, default=16, help="frames after the frames a window reads")
    ap.add_argument("--stride", type=int, default=16, help="frames read per window")
    ap.add_argument("--own", nargs="*", default=[], help="manifests of the training voice's speech (for the gate)")
    ap.add_argument("--others", nargs="*", default=[], help="manifests of other training voices' speech (for the gate)")
    args = ap.parse_args()
    reader = pack(args.bundle, args.recogniser, args.classifier, args.kmeans_tasks, args.left, args.lookahead, args.stride,
                  args.own, args.others)
    print(f"{args.bundle}: phone_units written (k-means reading kept for: {', '.join(args.kmeans_tasks) or 'no task'}; "
          f"gate {reader.cfg.gate})")


if __name__ == "__main__":
    main()
