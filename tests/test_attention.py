import torch

from streamgen.models.attention import attend, attend_prefix, merge


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
