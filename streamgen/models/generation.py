"""Unit generation with the incremental decoder: greedy or sampled (temperature, top-k)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .unit_mbart import EOS, UNIT_OFFSET, PromptKV, UnitMBart, pad_sequences, units_to_source


@dataclass(frozen=True)
class Sampling:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def allowed_tokens_mask(model: UnitMBart, device) -> Tensor:
    """[V] True for tokens that may be generated: the units and </s> (never <s>, <pad>, <unk>,
    language tokens, <mask> or padding rows)."""
    allowed = torch.zeros(model.cfg.vocab_size, dtype=torch.bool, device=device)
    allowed[UNIT_OFFSET : UNIT_OFFSET + model.cfg.num_units] = True
    allowed[EOS] = True
    return allowed


def choose(logits: Tensor, allowed: Tensor, sampling: Sampling, generator: torch.Generator | None) -> Tensor:
    """Next token per row from logits [B, V]."""
    logits = logits.float().masked_fill(~allowed, float("-inf"))
    if sampling.greedy:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model: UnitMBart,
    sources: list[Tensor],
    prompt: PromptKV | None = None,
    max_units: int = 200,
    min_units: int = 0,
    sampling: Sampling = Sampling(),
    prefix_tokens: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Generate units for a batch of unit sequences (each [N_i], values 0..K-1).

    The decoder starts from </s>, then `prefix_tokens` (e.g. a target-language token) are forced;
    each row stops at </s> (never before `min_units` units) or after `max_units` units.
    Finished rows leave the batch.
    Returns one LongTensor of units per source (0..K-1, </s> excluded)."""
    device = model.embed_tokens.weight.device
    src = pad_sequences([units_to_source(u.to(device)) for u in sources])
    state = model.start(src, prompt, capacity=max_units + len(prefix_tokens) + 1)
    allowed = allowed_tokens_mask(model, device)
    no_eos = allowed.clone()
    no_eos[EOS] = False
    B = len(sources)
    rows = torch.arange(B, device=device)  # which source each live row of `state` belongs to
    out = torch.empty(B, max_units, dtype=torch.long, device=device)
    n_out = torch.zeros(B, dtype=torch.long, device=device)
    tokens = torch.full((B,), EOS, dtype=torch.long, device=device)
    for forced in prefix_tokens:
        model.step(state, tokens)
        tokens = torch.full((B,), forced, dtype=torch.long, device=device)
    for t in range(max_units):
        nxt = choose(model.step(state, tokens), allowed if t >= min_units else no_eos, sampling, generator)
        live = nxt.ne(EOS)
        out[rows[live], t] = nxt[live] - UNIT_OFFSET
        n_out[rows[live]] += 1
        if not bool(live.all()):
            if not bool(live.any()):
                break
            keep = live.nonzero()[:, 0]
            state, rows, nxt = state.select(keep), rows[keep], nxt[keep]
        tokens = nxt
    return [out[i, : n_out[i]].clone() for i in range(B)]
