"""y = x W^T + b with W read from a float16 copy, where float16 holds W exactly: the speech LM's products on a CPU.

The shipped bundle stores its weights in float16, and a decoder step of a few rows reads every weight of the
decoder once: on a CPU its products cost what reading the weights costs (bench/RESULTS.md). fbgemm's kernel reads
a float16 copy of W, half the bytes, and widens it in registers: the activations, the products and the sums are
float32, as in `F.linear`, and W is the same number, so the result differs from `F.linear`'s only by the order of
the sums (a few parts in 10^7). Each row's result is also the same in a batch of any size (MKL's float32 kernel
picks its blocking by the batch), so in a step of rows without a prompt a session's logits do not depend on who it
shares the step with (a prompt's prefix is attended for its task's rows together: there, to float rounding).

Used only where it gives the same model: no gradient wanted (grad mode off, or nothing in the product requiring
one), float32 weights and input on a CPU, and W finite and equal to its float16 rounding (a weight trained in float32
and never packed keeps `F.linear`). A weight whose values change (an optimiser step, `load_state_dict`, `.data = `,
a `.to()` round trip) is looked at again on its next product. The speech LM's and HuBERT's projections are applied
through `linear` as functions, not module calls: forward hooks on those `nn.Linear` modules do not fire.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

_packed: dict[int, tuple[tuple, object]] = {}  # id(W) -> (what W and b were when packed, the packed copy or None)
_kernel = [hasattr(torch.ops.quantized, "linear_prepack_fp16")]  # this torch build has the kernel


def _state(t: Tensor | None) -> tuple:
    """What identifies a tensor's values: its storage, dtype and in-place version (`.data = ...`, `.to()` and
    `load_state_dict` each change one of them)."""
    if t is None:
        return (None,)
    return (id(t), t.data_ptr(), t.dtype, t._version)


def _pack(weight: Tensor, bias: Tensor | None):
    """The float16 copy of weight (with bias) for fbgemm, None where float16 does not hold the weight exactly."""
    if weight.is_inference():  # keeps no version: a change in place could not be seen
        return None
    state = (_state(weight), _state(bias))
    hit = _packed.get(id(weight))
    if hit is not None and hit[0] == state:
        return hit[1]
    packed = None
    if torch.isfinite(weight).all() and torch.equal(weight.half().float(), weight):
        try:
            packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)
        except (RuntimeError, NotImplementedError):  # (a build or CPU without fbgemm's kernel): F.linear for this weight
            packed = None
    if hit is None:  # one entry per weight, gone with it (an id may be reused after that)
        weakref.finalize(weight, _packed.pop, id(weight), None)
    _packed[id(weight)] = (state, packed)
    return packed


def _needs_grad(*ts: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`, by the float16 copy of weight where that is the same product (see above)."""
    if (_kernel[0] and weight.dtype == torch.float32 and x.dtype == torch.float32 and weight.device.type == "cpu"
            and x.dim() >= 2 and weight.dim() == 2 and not _needs_grad(x, weight, bias)):
        packed = _pack(weight, bias)
        if packed is not None:
            return torch.ops.quantized.linear_dynamic_fp16(x, packed)
    return F.linear(x, weight, bias)
