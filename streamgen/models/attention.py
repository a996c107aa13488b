"""Multi-head attention over a shared prefix plus per-row keys, merged by log-sum-exp.

Shapes: B rows, H heads, D head size, T queries, S per-row keys, L shared prefix keys.

A task's deep prompt gives every attention layer a prefix of L keys/values that is the same
for all rows (all sessions of that task). Concatenating it to each row's keys would copy it
B times per layer per step. Instead the prefix is attended to on its own, with the rows folded
into one sequence of queries so the prefix is only read, and the two partial softmaxes are
merged with their log-sum-exps:

    softmax([s_p, s_r]) @ [V_p; V_r] = w_p * softmax(s_p) @ V_p + w_r * softmax(s_r) @ V_r,
    w_x = exp(lse_x - logaddexp(lse_p, lse_r)),  i.e.  w_r = sigmoid(lse_r - lse_p) = 1 - w_p.

Each part is one call of torch's fused attention kernel that also returns its log-sum-exp
(`attend_seen`, checked against the plain operators on first use), so a prompted decoder step
launches a few kernels more than an unprompted one, not thirty a layer.

That is for decoder steps (one query per row), where the prefix is as large as a row's cache. A full
pass (the encoder, a prefill: T queries per row) reads T x S scores per row and a prefix of L keys
adds only L x T to them, so there the prefix's keys are placed beside each row's for the pass (a
copy freed when the pass ends) and one fused softmax attention (`scaled_dot_product_attention`)
does the rest: on 2 CPU cores it encodes a batch of 16 sources of 200 units 2.5x faster than the
unfused scores/log-sum-exp path. The K/V cache never holds the prefix.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .half_weights import linear

log = logging.getLogger("streamgen")

Prefix = tuple[Tensor, Tensor]  # (k, v), each [H, L, D], shared by every row
# Rows of different tasks in one batch: each task's prefix with the rows that attend to it.
PrefixGroups = list[tuple[Prefix, Tensor]]


def additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A visibility mask (True = visible) as the scores' additive bias in `dtype`: 0 where visible, -inf elsewhere.
    Every function here takes a mask in either form. `scaled_dot_product_attention` turns a boolean mask into
    this at each call (on a GPU, kernels of their own in every layer); a decoder step makes it once for all of
    its layers."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Softmax attention that also returns the log-sum-exp of the scores.

    q [B,H,T,D], k/v [B,H,S,D], mask broadcastable to [B,H,T,S] (True = visible, or `additive`).
    Returns out [B,H,T,D] and lse [B,H,T,1] (float32; -inf where a query sees no key).
    """
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask if mask.is_floating_point() else scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse.clamp_min(torch.finfo(torch.float32).min))  # no NaN on empty rows
    return (probs.to(v.dtype) @ v), lse


# (device type, dtype, with a mask) -> whether torch's fused kernel that also gives the log-sum-exp gave `attend`'s
# numbers there
_fused_ok: dict[tuple[str, torch.dtype, bool], bool] = {}


def _fused_with_lse(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """One call of the fused attention kernel that also returns the log-sum-exp (what training keeps for the
    backward pass): the memory-efficient one on CUDA (its lse padded to a multiple of 32 queries), the flash one
    on a CPU. bias: `additive`, in q's dtype."""
    T, S = q.shape[2], k.shape[2]
    if bias is not None:
        if q.device.type == "cuda" and S % 16:  # the kernel reads the bias in rows of 16 (as torch's own call pads it)
            bias = F.pad(bias, (0, -S % 16))[..., :S]
        bias = bias.expand(q.shape[0], q.shape[1], T, S)
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias)
    return out, lse[..., :T, None].float()


def attend_seen(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """`attend` where every query sees at least one key (a decoder step's own keys: its new token's at least), in
    one fused kernel instead of ten: on a GPU a step is bound by its launches. The kernel is a private torch
    operator, so on each device type and dtype, with a mask and without, its first call is checked against `attend`
    (rows that see no key left out: there the kernels disagree); where it fails or differs, `attend` serves from
    then on, said once."""
    where = (q.device.type, q.dtype, mask is not None)
    ok = _fused_ok.get(where)
    if ok is False:
        return attend(q, k, v, mask)
    bias = mask if mask is None or mask.is_floating_point() else additive(mask, q.dtype)
    try:
        got = _fused_with_lse(q, k, v, bias)
    except (RuntimeError, NotImplementedError) as e:
        log.warning("fused attention with log-sum-exp unavailable on %s %s (mask: %s), attending in ten operators: %s", *where, e)
        _fused_ok[where] = False
        return attend(q, k, v, mask)
    if ok is None:
        want = attend(q, k, v, mask)
        seen = torch.isfinite(want[1])
        tol = 1e-4 if q.dtype == torch.float32 else 5e-2
        kept = lambda x: torch.where(seen, x.float(), 0.0)  # (whatever a kernel leaves where nothing is seen, NaN too)
        close = lambda a, b: bool(torch.allclose(kept(a), kept(b), rtol=tol, atol=tol))
        _fused_ok[where] = close(got[0], want[0]) and close(got[1], want[1])
        if not _fused_ok[where]:
            log.warning("fused attention with log-sum-exp differs from attention in ten operators on %s %s (mask: %s): "
                        "using those", *where)
            return want
    return got


def attend_prefix(q: Tensor, prefix: Prefix) -> tuple[Tensor, Tensor]:
    """Attention of every row's queries to one shared prefix, without copying the prefix.

    q [B,H,T,D]; prefix k/v [H,L,D]. Rows and queries fold into one axis: [1, H, B*T, D] against [1, H, L, D].
    """
    pk, pv = prefix
    B, H, T, D = q.shape
    qh = q.transpose(0, 1).reshape(1, H, B * T, D)  # copies q (small), never the prefix
    out, lse = attend_seen(qh, pk[None], pv[None], None)  # [1, H, B*T, D], [1, H, B*T, 1]
    return out.view(H, B, T, D).transpose(0, 1), lse.view(H, B, T, 1).transpose(0, 1)


def attend_prefix_groups(q: Tensor, groups: PrefixGroups) -> tuple[Tensor, Tensor]:
    """Each group's rows attend to their own shared prefix; rows in no group see no prefix
    (lse -inf, so `merge` gives them weight 0). Every prefix is read once per step, never copied."""
    B, H, T, D = q.shape
    out = q.new_zeros(B, H, T, D)
    lse = torch.full((B, H, T, 1), float("-inf"), device=q.device)
    for prefix, rows in groups:
        o, l = attend_prefix(q[rows], prefix)
        out[rows], lse[rows] = o, l
    return out, lse


def attend_prefix_any(q: Tensor, prefix: Prefix | PrefixGroups) -> tuple[Tensor, Tensor]:
    """`attend_prefix` for one prefix shared by every row, `attend_prefix_groups` for one per group."""
    return attend_prefix(q, prefix) if isinstance(prefix, tuple) else attend_prefix_groups(q, prefix)


def attend_rows(q: Tensor, kv: list[tuple[Tensor, Tensor]], prefix: Prefix | PrefixGroups | None) -> Tensor:
    """Row r's queries q[r] [H,T,D] attend to its own keys/values kv[r] (each [1,H,S_r,D], every key
    visible: views of a cache up to the row's length, so nothing of other rows and no padding is
    read), and every row to the prefix (read once for all rows) -> [B,H,T,D]."""
    if not prefix:
        return torch.cat([F.scaled_dot_product_attention(q[r : r + 1], k, v) for r, (k, v) in enumerate(kv)])
    parts = [attend_seen(q[r : r + 1], k, v, None) for r, (k, v) in enumerate(kv)]
    own = torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])
    return merge(*own, *attend_prefix_any(q, prefix))


def merge(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """Combine two partial attentions over disjoint key sets into attention over their union: a's share of the
    union's softmax mass is exp(lse_a) / (exp(lse_a) + exp(lse_b)) = sigmoid(lse_a - lse_b) (1 where b sees no
    key, 0 where a sees none), and the union's output lies that far from b's towards a's."""
    return torch.lerp(out_b, out_a, torch.sigmoid(lse_a - lse_b).to(out_a.dtype))


def attend_fused(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, prefix: Prefix | PrefixGroups | None) -> Tensor:
    """Softmax attention over the prefix's keys and each row's, in one fused call (full passes).

    q [B,H,T,D], k/v [B,H,S,D], mask [B|1, H|1, T|1, S] (True = visible, or `additive`); a query that
    sees no key gets zeros, as in `attend`."""
    B, H, T, D = q.shape
    if prefix:
        if isinstance(prefix, tuple):  # one prefix for every row
            pk, pv = (t.expand(B, -1, -1, -1) for t in prefix)
            seen = None
        else:  # one per task group; rows in no group see none
            L = max(pk.shape[1] for (pk, _), _ in prefix)
            pk, pv = q.new_zeros(B, H, L, D), q.new_zeros(B, H, L, D)
            seen = torch.zeros(B, 1, 1, L, dtype=torch.bool, device=q.device)
            for (gk, gv), rows in prefix:
                pk[rows, :, : gk.shape[1]], pv[rows, :, : gv.shape[1]] = gk, gv
                seen[rows, ..., : gk.shape[1]] = True
        if mask is not None or seen is not None:
            ones = lambda n: torch.ones(1, 1, 1, n, dtype=torch.bool, device=q.device)
            mask = ones(k.shape[2]) if mask is None else mask
            seen = ones(pk.shape[2]) if seen is None else seen
            if mask.is_floating_point():
                seen = additive(seen, mask.dtype)
            lead = [max(m, s) for m, s in zip(mask.shape[:-1], seen.shape[:-1])]  # both [B|1, H|1, T|1]
            mask = torch.cat([seen.expand(*lead, -1), mask.expand(*lead, -1)], dim=-1)
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    """fairseq-layout multi-head attention (q/k/v/out projections with bias)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def split(self, x: Tensor) -> Tensor:
        """[B, T, H*D] -> [B, H, T, D]"""
        B, T, _ = x.shape
        return x.view(B, T, self.heads, -1).transpose(1, 2)

    def kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of x [B, S, d], each [B, H, S, D]."""
        k, v = linear(x, self.k_proj.weight, self.k_proj.bias), linear(x, self.v_proj.weight, self.v_proj.bias)
        return self.split(k), self.split(v)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of x [B, T, d], each [B, H, T, D]: in inference one product with the three
        projections side by side (a decoder step's three smallest products in one; the joined copy of their
        weights is made on first use and again whenever one of them changes), else three."""
        joined = self._joined()
        if joined is None:
            return tuple(self.split(linear(x, p.weight, p.bias)) for p in (self.q_proj, self.k_proj, self.v_proj))
        return tuple(self.split(t) for t in linear(x, *joined).chunk(3, dim=-1))

    def _joined(self) -> tuple[Tensor, Tensor] | None:
        """[W_q; W_k; W_v] and their biases, kept while the six tensors are the same (None where a gradient is
        wanted, or a tensor keeps no version to tell a change by)."""
        ps = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.q_proj.bias, self.k_proj.bias, self.v_proj.bias)
        if any(t.is_inference() for t in ps) or (torch.is_grad_enabled() and any(t.requires_grad for t in ps)):
            return None
        key = tuple((id(t), t.data_ptr(), t.dtype, t._version) for t in ps)
        cached = self.__dict__.get("_joined_qkv")
        if cached is None or cached[0] != key:
            with torch.inference_mode(False):  # (made in inference mode it would keep no version: never packed, see linear)
                cached = key, torch.cat(ps[:3]), torch.cat(ps[3:])
            self.__dict__["_joined_qkv"] = cached  # (a plain attribute: not a parameter, not in the state dict)
        return cached[1], cached[2]

    def prefix_kv(self, k_in: Tensor, v_in: Tensor) -> Prefix:
        """A deep prompt's prefix: its vectors [L, d] through this layer's own k/v projections."""
        L = k_in.shape[0]
        k = linear(k_in, self.k_proj.weight, self.k_proj.bias).view(L, self.heads, -1).transpose(0, 1)  # [H, L, D]
        v = linear(v_in, self.v_proj.weight, self.v_proj.bias).view(L, self.heads, -1).transpose(0, 1)
        return k, v

    def forward(
        self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, prefix: Prefix | PrefixGroups | None = None
    ) -> Tensor:
        """x [B,T,d] attends to k/v [B,H,S,D] and to a prefix: one shared by every row, or one per
        group of rows (a batch of several tasks) -> [B,T,d]."""
        return self.attend(self.split(linear(x, self.q_proj.weight, self.q_proj.bias)), k, v, mask, prefix)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, prefix: Prefix | PrefixGroups | None = None) -> Tensor:
        """The rest of `forward` from the queries q [B,H,T,D]: attention, then the output projection."""
        return self.project(self.attend_heads(q, k, v, mask, prefix))

    @staticmethod
    def attend_heads(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, prefix: Prefix | PrefixGroups | None = None) -> Tensor:
        """Attention of queries q [B,H,T,D] to k/v [B,H,S,D] and the prefix, per head -> [B,H,T,D]."""
        if q.shape[2] == 1 and prefix:  # a decoder step (its new token's key seen): the prefix read in place, never copied
            return merge(*attend_seen(q, k, v, mask), *attend_prefix_any(q, prefix))
        return attend_fused(q, k, v, mask, prefix)

    def project(self, out: Tensor) -> Tensor:
        """Heads [B,H,T,D] -> the output projection [B,T,d]."""
        B, H, T, D = out.shape
        return linear(out.transpose(1, 2).reshape(B, T, H * D), self.out_proj.weight, self.out_proj.bias)

