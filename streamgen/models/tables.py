"""Fixed tables a module computes when it is built: filterbanks, windows, STFT kernels."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def table(make: Callable[[], T]) -> T:
    """`make()` run on the CPU whatever device the module is being built under, its tensor (or tuple of
    tensors) then placed on that device. A module built on the meta device for its shapes (the bundle's
    shape check) thus runs no Python meta kernel, whose first use imports torch._dynamo."""
    with torch.device("cpu"):
        out = make()
    here = torch.get_default_device()
    return tuple(t.to(here) for t in out) if isinstance(out, tuple) else out.to(here)
