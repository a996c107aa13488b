"""y = x W^T + b with W read from a float16 copy, where float16 holds W exactly: the speech LM's products on a CPU.

The shipped bundle stores its weights in float16, and a decoder step of a few rows reads every weight of the
decoder once: on a CPU its products cost what reading the weights costs (bench/RESULTS.md). fbgemm's kernel reads
a float16 copy of W, half the bytes, and widens it in registers: the activations, the products and the sums are
float32, as in `F.linear`, and W is the same number, so the result differs from `F.linear`'s only by the order of
the sums (a few parts in 10^7). Each row's result is also the same in a batch of any size (MKL's float32 kernel
picks its blocking by the batch), so a session's logits do not depend on who it shares a step with.

Used only where it gives the same model: no gradient wanted (grad mode off, or nothing in the product requiring
one), float32 weights and input on a CPU, and W equal to
its float16 rounding (a weight trained in float32 and never packed keeps `F.linear`). A weight changed in place
(an optimiser step, `load_state_dict`) is looked at again on its next product.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

_packed: dict[tuple[int, int], tuple[int, int, object]] = {}  # (id W, id b) -> (W's version, b's version, packed or None)
_kernel = [hasattr(torch.ops.quantized, "linear_prepack_fp16")]  # [False] once this build turns out to lack it


def _version(t: Tensor | None) -> int:
    if t is None:
        return 0
    try:
        return t._version
    except RuntimeError:  # an inference tensor: it keeps no version (and is not changed outside inference mode)
        return -1


def _pack(weight: Tensor, bias: Tensor | None):
    """The float16 copy of weight (with bias) for fbgemm, None where float16 does not hold the weight exactly."""
    key = (id(weight), id(bias))
    versions = (_version(weight), _version(bias))
    hit = _packed.get(key)
    if hit is not None and hit[:2] == versions:
        return hit[2]
    packed = None
    if torch.equal(weight.half().float(), weight):
        try:
            packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)
        except (RuntimeError, NotImplementedError):  # a build without fbgemm (an ARM CPU): F.linear from now on
            _kernel[0] = False
            return None
    if hit is None:  # the entry goes with the weight or the bias (an id may be reused after that)
        for t in (weight, bias):
            if t is not None:
                weakref.finalize(t, _packed.pop, key, None)
    _packed[key] = (*versions, packed)
    return packed


def _needs_grad(*ts: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`, by the float16 copy of weight where that is the same product (see above)."""
    if (_kernel[0] and weight.dtype == torch.float32 and x.dtype == torch.float32 and weight.device.type == "cpu"
            and not _needs_grad(x, weight, bias)):
        packed = _pack(weight, bias)
        if packed is not None:
            return torch.ops.quantized.linear_dynamic_fp16(x, packed)
    return F.linear(x, weight, bias)
