"""Products by weights held in float16 (`models.half_weights`): the same model as F.linear where they are used, and a
row's result the same in a batch of any size."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, held_in_float16, random_units

import streamgen.models.half_weights as half_weights
from streamgen.models.half_weights import linear
from streamgen.models.unit_mbart import UnitMBart, units_to_source

pytestmark = pytest.mark.skipif(not half_weights._kernel[0], reason="this torch build has no fbgemm float16 kernel")


def weights(out_dim=96, in_dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out_dim, in_dim, generator=g) * 0.1).half().float(), torch.randn(out_dim, generator=g)


def packed(weight) -> bool:
    return half_weights._packed.get(id(weight), (None, None))[1] is not None


def test_a_float16_held_weight_is_read_from_its_float16_copy_and_gives_float32_products():
    w, b = weights()
    x = torch.randn(7, 5, 64)
    with torch.no_grad():
        y = linear(x, w, b)
    assert packed(w)
    ref = F.linear(x.double(), w.double(), b.double()).float()  # the product in float64, rounded once
    assert (y - ref).abs().max() <= 1e-6 * ref.abs().max() * 4  # float32 sums: the order differs, nothing else
    assert (F.linear(x, w, b) - ref).abs().max() <= 1e-6 * ref.abs().max() * 4


def test_where_it_would_be_another_model_or_need_a_gradient_it_is_f_linear():
    w, b = weights()
    x = torch.randn(3, 64)
    trained = w + 1e-4  # float32 values float16 does not hold
    with torch.no_grad():
        assert torch.equal(linear(x, trained, b), F.linear(x, trained, b)) and not packed(trained)
        assert torch.equal(linear(x.double(), w.double(), b.double()), F.linear(x.double(), w.double(), b.double()))
    wg = w.clone().requires_grad_(True)
    y = linear(x, wg, b)  # a weight being trained: autograd's product
    assert torch.equal(y, F.linear(x, wg, b)) and y.requires_grad
    y.sum().backward()
    assert torch.allclose(wg.grad, x.sum(0).expand_as(wg))


def test_a_row_is_the_same_in_a_batch_of_any_size():
    w, b = weights(1024, 256, seed=1)
    x = torch.randn(300, 256)
    with torch.no_grad():
        alone = torch.cat([linear(x[i : i + 1], w, b) for i in range(300)])
        for n in (1, 2, 3, 5, 8, 16, 17, 64, 300):
            assert torch.equal(linear(x[:n], w, b), alone[:n]), n


def test_a_weight_or_bias_changed_is_packed_again():
    w, b = weights()
    x = torch.randn(4, 64)
    entries = len(half_weights._packed)
    close = lambda y, ref: (y - ref).abs().max() <= 1e-5 * ref.abs().max()  # noqa: E731
    with torch.no_grad():
        before = linear(x, w, b)
        w.mul_(2)  # in place, still held by float16
        assert close(linear(x, w, b), F.linear(x, w, b)) and not close(before, F.linear(x, w, b))
        w.data = weights(seed=3)[0]  # new values under the same tensor (same version)
        assert close(linear(x, w, b), F.linear(x, w, b))
        p = torch.nn.Parameter(w.clone(), requires_grad=False)
        linear(x, p, b)
        p.data = p.data.to(torch.bfloat16).to(torch.float32) * 0.5  # (how `module.to` round trips a dtype)
        assert close(linear(x, p, b), F.linear(x, p, b))
        other = torch.randn(96)
        assert close(linear(x, w, other), F.linear(x, w, other))  # the same weight with another bias
        w.add_(1e-4)  # no longer held by float16: F.linear
        assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    assert len(half_weights._packed) - entries == 2  # one entry per weight (w, p), not per bias or change


def test_the_edges_of_f_linear_stay_f_linears():
    w, b = weights()
    with torch.no_grad():
        x1 = torch.randn(64)
        assert torch.equal(linear(x1, w, b), F.linear(x1, w, b))  # a 1-D input
        wild = w.clone()
        wild[0, 0] = float("inf")
        y = linear(torch.randn(2, 64), wild, b)
        assert wild[0, 0] == float("inf") and not packed(wild) and y.shape == (2, 96)  # untouched, not packed
    with torch.inference_mode():
        made_here = w.clone()  # an inference tensor keeps no version: a change in place could not be seen
        x = torch.randn(3, 64)
        assert torch.equal(linear(x, made_here, b), F.linear(x, made_here, b)) and not packed(made_here)


def test_a_decoder_rows_logits_are_the_same_whoever_shares_its_step():
    """With float16-held weights every product is row by row (and `step_rows` attends each row alone), so a
    session's logits in a step of several rows without a prompt are bitwise those of a step of its own."""
    m = held_in_float16(UnitMBart(TINY).eval().requires_grad_(False))
    src = torch.stack([units_to_source(random_units(30, seed=s)) for s in range(5)])
    with torch.inference_mode():
        together, apart = m.start(src, capacity=64), m.start(src, capacity=64)
        for t in range(6):
            tokens = torch.tensor([4 + (t * 7 + r) % TINY.num_units for r in range(5)])
            rows = [r for r in range(5) if (t + r) % 3]  # ragged: rows sit out some steps
            both = m.step_rows(together, rows, tokens[rows])
            for j, r in enumerate(rows):
                assert torch.equal(both[j], m.step_rows(apart, [r], tokens[r : r + 1])[0]), (t, r)
