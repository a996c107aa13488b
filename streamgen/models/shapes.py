"""Shapes and copies for a GPU. On a GPU a model call's cost on the host depends on its shapes (cuDNN plans
each new convolution and attention shape, 2.3 and 5.4 ms a call on the H200 of 2026-11-29, where every step
was a new shape), and a copy from ordinary host memory waits for every kernel queued before it. Calls whose
batch and lengths change tick by tick therefore round them to a few sizes (`grid`, `on_grid`; the extra rows
and positions are padding whose results are dropped) and move their inputs with `to_device`."""

from __future__ import annotations

import torch
from torch import Tensor


def grid(n: int) -> int:
    """n rounded up to one of four sizes per octave (at most a quarter more)."""
    if n <= 8:
        return n
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


def on_grid(n: int, device) -> int:
    """On CUDA `grid(n)`, elsewhere n (a CPU has no per-shape planning, and padding would cost it work)."""
    return grid(n) if torch.device(device).type == "cuda" else n


def to_device(t: Tensor, device) -> Tensor:
    """A host tensor on `device` without waiting for the device: on a GPU, through pinned memory and an
    asynchronous copy (a plain copy from pageable memory waits until every queued kernel has run)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
