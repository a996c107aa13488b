"""Shapes and copies for a GPU. On a GPU a model call's cost on the host depends on its shapes (cuDNN plans
each new convolution and attention shape, 2.3 and 5.4 ms a call on the H200 of 2026-11-29, where every step
was a new shape), and a copy from ordinary host memory waits for every kernel queued before it. Calls whose
batch and lengths change tick by tick therefore round them to a few sizes (`grid`, `on_grid`; the extra rows
and positions are padding whose results are dropped) and move their inputs with `to_device`. Inside
`gpu_shapes()` every device rounds as a GPU does: tests prove the padding changes no result, and
bench/shapes.py counts the shapes a GPU would plan, on a CPU."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

_everywhere = False  # set inside `gpu_shapes()`


def rounds(device) -> bool:
    """Whether calls on `device` round their shapes: on CUDA (a CPU plans nothing per shape, and padding would
    cost it work), or on any device inside `gpu_shapes()`."""
    return _everywhere or torch.device(device).type == "cuda"


@contextmanager
def gpu_shapes():
    """Every call made, and every streaming graph built, inside the block rounds its shapes as on a GPU."""
    global _everywhere
    before, _everywhere = _everywhere, True
    try:
        yield
    finally:
        _everywhere = before


def grid(n: int) -> int:
    """n rounded up to one of four sizes per octave (at most a quarter more)."""
    if n <= 8:
        return n
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


def on_grid(n: int, device) -> int:
    """`grid(n)` where calls on `device` round their shapes (`rounds`), else n."""
    return grid(n) if rounds(device) else n


def multiple(n: int, step: int, device) -> int:
    """n rounded up to a multiple of `step` where calls on `device` round their shapes (`rounds`), else n."""
    return -(-n // step) * step if rounds(device) else n


def right_padded(seqs: list[Tensor], width: int, fill) -> Tensor:
    """1-D tensors right-padded with `fill` into one [len(seqs), width] tensor, where the first one is."""
    out = seqs[0].new_full((len(seqs), width), fill)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def padded_rows(seqs: list[Tensor], width: int, fill, device) -> tuple[Tensor, Tensor]:
    """1-D host tensors `right_padded` and their lengths: built on the host and moved with `to_device` (two copies a
    call, where a row at a time on the device would be one each)."""
    return to_device(right_padded(seqs, width, fill), device), to_device(torch.tensor([len(s) for s in seqs]), device)


def padded_batch(seqs: list[Tensor], step: int, fill, device) -> tuple[Tensor, Tensor]:
    """`padded_rows` of a call's inputs as a GPU shapes them (`rounds`): the width a multiple of `step` and the rows
    on the grid, each extra row `fill` over the whole width (its results dropped); elsewhere the inputs as they are."""
    width = multiple(max(len(s) for s in seqs), step, device)
    extra = [seqs[0].new_full((width,), fill)] * (on_grid(len(seqs), device) - len(seqs))
    return padded_rows(list(seqs) + extra, width, fill, device)


def to_device(t: Tensor, device) -> Tensor:
    """A host tensor on `device` without waiting for the device: on a GPU, through pinned memory and an
    asynchronous copy (a plain copy from pageable memory waits until every queued kernel has run)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
