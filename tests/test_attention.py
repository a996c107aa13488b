import torch

from streamgen.models.attention import additive, attend, attend_fused, attend_prefix, merge


def softmax_attention(q, k, v, mask):
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


def test_prefix_merge_equals_attention_over_the_concatenation():
    B, H, T, S, L, D = 3, 4, 5, 7, 6, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    pk, pv = torch.randn(H, L, D), torch.randn(H, L, D)
    mask = torch.rand(B, 1, T, S) > 0.4
    mask[0, 0, 0] = False  # a query that sees none of its row's keys: only the prefix
    out = merge(*attend(q, k, v, mask), *attend_prefix(q, (pk, pv)))

    k_cat = torch.cat([pk.expand(B, H, L, D), k], dim=2)
    v_cat = torch.cat([pv.expand(B, H, L, D), v], dim=2)
    mask_cat = torch.cat([torch.ones(B, 1, T, L, dtype=torch.bool), mask], dim=-1)
    ref = softmax_attention(q, k_cat, v_cat, mask_cat)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_fully_masked_rows_give_zero_weight_not_nan():
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    out, lse = attend(q, k, v, torch.zeros(1, 1, 3, 5, dtype=torch.bool))
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_fused_full_pass_equals_the_merged_prefix_path():
    """Full passes (encoder, prefill) attend with the prefix's keys beside each row's in one fused
    call; decoder steps merge by log-sum-exp. Both are softmax over the union, per row and per task
    group (rows of another task see its own prefix, rows of no task none)."""
    torch.manual_seed(0)
    B, H, T, S, D = 4, 2, 5, 7, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    mask = torch.rand(B, 1, T, S) > 0.4
    mask[0, 0, 0] = False  # sees only the prefix
    a = (torch.randn(H, 6, D), torch.randn(H, 6, D))
    b = (torch.randn(H, 3, D), torch.randn(H, 3, D))
    shared = attend_fused(q, k, v, mask, a)
    torch.testing.assert_close(shared, merge(*attend(q, k, v, mask), *attend_prefix(q, a)), atol=1e-6, rtol=1e-5)
    groups = [(a, torch.tensor([0, 2])), (b, torch.tensor([1]))]
    out = attend_fused(q, k, v, mask, groups)
    for rows, prefix in (([0, 2], a), ([1], b)):
        ref = merge(*attend(q[rows], k[rows], v[rows], mask[rows]), *attend_prefix(q[rows], prefix))
        torch.testing.assert_close(out[rows], ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[3], attend(q[3:], k[3:], v[3:], mask[3:])[0][0], atol=1e-6, rtol=1e-5)
    # a key-padding mask [B,1,1,S] (the encoder's) and none at all
    kmask = torch.rand(B, 1, 1, S) > 0.3
    kmask[..., 0] = True
    torch.testing.assert_close(attend_fused(q, k, v, kmask, a), merge(*attend(q, k, v, kmask), *attend_prefix(q, a)), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attend_fused(q, k, v, None, None), softmax_attention(q, k, v, torch.ones(1, 1, 1, S, dtype=torch.bool)), atol=1e-6, rtol=1e-5)


def test_a_mask_as_the_scores_bias_gives_what_the_boolean_mask_gives():
    """A decoder step passes its masks as `additive` biases, made once for all of its layers: the same numbers from
    every attention function (the merged prefix path, the fused one with one prefix, with task groups, and none),
    a query that sees no key included."""
    torch.manual_seed(1)
    B, H, T, S, D = 4, 2, 3, 7, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    a, b = (torch.randn(H, 6, D), torch.randn(H, 6, D)), (torch.randn(H, 3, D), torch.randn(H, 3, D))
    groups = [(a, torch.tensor([0, 2])), (b, torch.tensor([1]))]
    for shape in ((B, 1, T, S), (B, 1, 1, S)):
        mask = torch.rand(*shape) > 0.4
        mask[0, 0, 0] = False
        bias = additive(mask, q.dtype)
        assert bias.dtype == q.dtype and set(bias.unique().tolist()) == {0.0, float("-inf")}
        for got, want in zip(attend(q, k, v, bias), attend(q, k, v, mask)):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
        for prefix in (None, a, groups):
            torch.testing.assert_close(attend_fused(q, k, v, bias, prefix), attend_fused(q, k, v, mask, prefix), atol=1e-6, rtol=1e-6)


def _one_step_shapes(device="cpu", dtype=torch.float32, seed=2):
    g = torch.Generator().manual_seed(seed)
    B, H, S, D = 5, 4, 48, 16
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(device, dtype) for n in (1, S, S))
    mask = torch.arange(S)[None, None, None, :] <= torch.tensor([0, 3, 17, 30, 47])[:, None, None, None]  # ragged caches
    return q, k, v, mask.to(device)


def test_attention_seen_in_one_fused_kernel_gives_the_ten_operators_numbers(monkeypatch, caplog):
    """`attend_seen` (a decoder step's own keys, and a prefix for every row at once) by torch's fused kernel that
    also returns the log-sum-exp: the numbers of `attend`, with a boolean mask, an additive one, and none; the
    first call on a device and dtype is checked, and a kernel that fails or differs is left for good, said once."""
    from streamgen.models import attention

    monkeypatch.setattr(attention, "_fused_ok", {})
    q, k, v, mask = _one_step_shapes()
    for m in (mask, additive(mask, q.dtype), None):
        out, lse = attention.attend_seen(q, k, v, m)
        want_out, want_lse = attend(q, k, v, m)
        torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
        assert lse.shape == (5, 4, 1, 1) and lse.dtype == torch.float32
    assert attention._fused_ok == {("cpu", torch.float32, True): True, ("cpu", torch.float32, False): True}

    # a row that sees no key is left out of the check, whatever a kernel leaves there (NaN too)
    blind = mask.clone()
    blind[1] = False
    right = attention._fused_with_lse

    def nan_where_blind(q, k, v, bias):
        out, lse = right(q, k, v, bias)
        return out.index_fill(0, torch.tensor([1]), float("nan")), lse.index_fill(0, torch.tensor([1]), float("nan"))

    monkeypatch.setattr(attention, "_fused_ok", {})
    monkeypatch.setattr(attention, "_fused_with_lse", nan_where_blind)
    attention.attend_seen(q, k, v, blind)
    assert attention._fused_ok == {("cpu", torch.float32, True): True}
    monkeypatch.setattr(attention, "_fused_with_lse", right)

    calls = []
    monkeypatch.setattr(attention, "_fused_ok", {})
    monkeypatch.setattr(attention, "_fused_with_lse", lambda *a: (calls.append(1), (a[0] * 0, torch.zeros(5, 4, 1, 1)))[1])
    with caplog.at_level("WARNING", logger="streamgen"):
        for _ in range(3):  # wrong numbers: found on the first call, which already answers with attend's
            torch.testing.assert_close(attention.attend_seen(q, k, v, mask)[0], attend(q, k, v, mask)[0])
    assert calls == [1] and attention._fused_ok == {("cpu", torch.float32, True): False}
    assert sum("differs" in r.getMessage() for r in caplog.records) == 1

    def unavailable(*a):
        raise NotImplementedError("no such kernel here")

    caplog.clear()
    monkeypatch.setattr(attention, "_fused_ok", {})
    monkeypatch.setattr(attention, "_fused_with_lse", unavailable)
    with caplog.at_level("WARNING", logger="streamgen"):
        for _ in range(3):
            torch.testing.assert_close(attention.attend_seen(q, k, v, mask)[0], attend(q, k, v, mask)[0])
    assert attention._fused_ok == {("cpu", torch.float32, True): False}
    assert [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()][0].endswith("no such kernel here")
    assert sum("unavailable" in r.getMessage() for r in caplog.records) == 1


def test_attention_seen_is_fused_on_a_gpu(monkeypatch):
    """On CUDA the memory-efficient kernel with its log-sum-exp gives `attend`'s numbers (float32, and bfloat16
    to its rounding), so a prompted decoder step uses it (run by bench/gpu.sh short)."""
    import pytest

    from streamgen.models import attention

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    monkeypatch.setattr(attention, "_fused_ok", {})
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        q, k, v, mask = _one_step_shapes("cuda", dtype)
        for m in (additive(mask, dtype), None):
            out, lse = attention.attend_seen(q, k, v, m)
            want_out, want_lse = attend(q, k, v, m)
            torch.testing.assert_close(out.float(), want_out.float(), atol=tol, rtol=tol)
            torch.testing.assert_close(lse, want_lse, atol=tol, rtol=tol)
        assert attention._fused_ok[("cuda", dtype, True)] is True and attention._fused_ok[("cuda", dtype, False)] is True, dtype
