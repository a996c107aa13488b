"""Training data: pairs of unit sequences, read from a TSV manifest.

    id<TAB>src_units<TAB>tgt_units[<TAB>src_text<TAB>tgt_text]

with a header row; units are space-separated integers (0..K-1); `<mask>` may stand in src_units
(inpainting: one mBART <mask> for a masked span). For denoising pretraining only `tgt_units` is used,
and a unit manifest (`streamgen units` output, with a `units` column) is read as such pairs too.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..models.unit_mbart import EOS, PAD, UNIT_OFFSET, pad_sequences

MASK = "<mask>"


@dataclass
class Pair:
    id: str
    src: list[int | str]  # units, or MASK
    tgt: list[int]


def read_tsv(path: str | Path) -> list[dict]:
    """Rows of a TSV with a header, or a clear error if the file is missing."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            return list(csv.DictReader(f, delimiter="\t"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such manifest") from None


def read_pairs(path: str | Path) -> list[Pair]:
    path = Path(path)
    rows = read_tsv(path)
    cols = set(rows[0]) if rows else set()
    if {"id", "units"} <= cols and "tgt_units" not in cols:  # a unit manifest: each sequence as its own pair (denoising)
        src_col = tgt_col = "units"
    elif {"id", "src_units", "tgt_units"} <= cols:
        src_col, tgt_col = "src_units", "tgt_units"
    else:
        raise ValueError(f"{path}: expected a TSV with a header naming id, src_units, tgt_units (or a unit manifest with id, units)")
    pairs = []
    for n, r in enumerate(rows, start=2):
        try:
            src = [t if t == MASK else int(t) for t in r[src_col].split()]
            tgt = [int(t) for t in r[tgt_col].split()]
        except ValueError:
            raise ValueError(f"{path}:{n}: units must be integers (or {MASK} in src_units)") from None
        pairs.append(Pair(r["id"], src, tgt))
    return pairs


def units_outside(pairs: list[Pair], num_units: int) -> str | None:
    """Why these pairs cannot train a model of `num_units` units (a unit outside 0..K-1 would be read as a
    special token: <mask>, </s>, padding), or None."""
    for p in pairs:
        for side, seq in (("src_units", p.src), ("tgt_units", p.tgt)):
            bad = next((u for u in seq if u != MASK and not 0 <= u < num_units), None)
            if bad is not None:
                return (f"pair {p.id}: {side} has unit {bad}, outside this model's 0..{num_units - 1}: the units were made "
                        "with another unit encoder (k-means) than this bundle's")
    return None


def write_pairs(path: str | Path, pairs: list[Pair], texts: list[tuple[str, str]] | None = None) -> None:
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["id", "src_units", "tgt_units"] + (["src_text", "tgt_text"] if texts else []))
        for i, p in enumerate(pairs):
            row = [p.id, " ".join(map(str, p.src)), " ".join(map(str, p.tgt))]
            w.writerow(row + (list(texts[i]) if texts else []))


def source_tokens(src: list[int | str], mask_token: int | None) -> Tensor:
    toks = []
    for t in src:
        if t == MASK:
            if mask_token is None:
                raise ValueError("the data uses <mask> but the model has no mask_token")
            toks.append(mask_token)
        else:
            toks.append(int(t) + UNIT_OFFSET)
    return torch.tensor(toks + [EOS], dtype=torch.long)


@dataclass
class Batch:
    src: Tensor  # [B, S] encoder input (padded)
    prev: Tensor  # [B, T] decoder input: </s>, prefix, target units
    target: Tensor  # [B, T] next tokens: target units, </s>; <pad> where ignored

    @property
    def tokens(self) -> int:
        return int(self.target.ne(PAD).sum())


def collate(pairs: list[Pair], mask_token: int | None, prefix_tokens: tuple[int, ...] = ()) -> Batch:
    src = pad_sequences([source_tokens(p.src, mask_token) for p in pairs])
    prev, target = [], []
    for p in pairs:
        tgt = torch.tensor(p.tgt, dtype=torch.long) + UNIT_OFFSET
        head = torch.tensor((EOS, *prefix_tokens), dtype=torch.long)
        prev.append(torch.cat([head, tgt]))
        # the forced prefix is given, not predicted: its positions are ignored in the loss
        target.append(torch.cat([torch.full((len(prefix_tokens),), PAD), tgt, torch.tensor([EOS])]))
    return Batch(src, pad_sequences(prev), pad_sequences(target))


def span_mask(units: list[int], generator: torch.Generator, ratio: float = 0.3, mean_span: float = 3.5) -> list[int | str]:
    """mBART text infilling on units: spans (lengths ~ Poisson(mean_span)) covering about `ratio`
    of the sequence are each replaced by one <mask>."""
    n = len(units)
    budget = int(round(n * ratio))
    masked = torch.zeros(n, dtype=torch.bool)
    while int(masked.sum()) < budget:
        length = max(1, int(torch.poisson(torch.tensor([mean_span]), generator=generator)))
        start = int(torch.randint(0, max(1, n - length + 1), (1,), generator=generator))
        masked[start : start + length] = True
    out: list[int | str] = []
    for i, u in enumerate(units):
        if not masked[i]:
            out.append(u)
        elif i == 0 or not masked[i - 1]:
            out.append(MASK)
    return out
