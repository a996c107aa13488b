"""Deep prompts (SpeechPrompt / SpeechGen) for a frozen Unit mBART.

For every self-attention layer of each prompted stack, a prompt holds L key vectors P_k and L value
vectors P_v (each [L, d]). They replace the *inputs* of that layer's key and value projections at L
prefix positions, so the prefix keys/values are k_proj(P_k) and v_proj(P_v): constant for the task.
Prefix positions have no positional embedding and their queries are never needed (every layer's
prefix K/V comes from the prompt, not from the layer below), so the prefix is pure K/V.

Trainable parameters: 2 * L * d per prompted layer; the backbone stays frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .unit_mbart import EOS, UNIT_OFFSET, PromptKV, UnitMBart, units_to_source

STACKS = ("encoder", "decoder")


@dataclass(frozen=True)
class PromptConfig:
    length: int = 16
    stacks: tuple[str, ...] = STACKS  # which self-attentions get a prefix

    def __post_init__(self):
        bad = set(self.stacks) - set(STACKS)
        if bad or not self.stacks:
            raise ValueError(f"prompt stacks must be a non-empty subset of {STACKS}, got {self.stacks}")
        if self.length < 1:
            raise ValueError(f"prompt length must be >= 1, got {self.length}")


class DeepPrompt(nn.Module):
    """One task's prompt: `<stack>_k`, `<stack>_v` parameters of shape [layers, L, d]."""

    def __init__(self, model_cfg, cfg: PromptConfig):
        super().__init__()
        self.cfg = cfg
        for stack in cfg.stacks:
            n = getattr(model_cfg, f"{stack}_layers")
            for kind in "kv":
                self.register_parameter(f"{stack}_{kind}", nn.Parameter(torch.zeros(n, cfg.length, model_cfg.dim)))
        self._shared: tuple[tuple, PromptKV] | None = None

    def kv(self, model: UnitMBart) -> PromptKV:
        """The prefix K/V of every layer, differentiable w.r.t. the prompt (for training)."""
        out = {}
        for stack in STACKS:
            layers, dtype = getattr(model, stack).layers, getattr(model, stack).dtype
            if stack not in self.cfg.stacks:
                out[stack] = (None,) * len(layers)
                continue
            pk, pv = getattr(self, f"{stack}_k").to(dtype), getattr(self, f"{stack}_v").to(dtype)
            out[stack] = tuple(layer.self_attn.prefix_kv(pk[i], pv[i]) for i, layer in enumerate(layers))
        return PromptKV(**out)

    def shared_kv(self, model: UnitMBart) -> PromptKV:
        """The prefix K/V computed once and returned by reference to every session.

        Recomputed only when the model, its device or its stacks' dtypes, or the prompt's values change
        (parameter version counters move on every in-place update, e.g. an optimizer step)."""
        w = model.embed_tokens.weight
        key = (id(model), w.device, *(getattr(model, stack).dtype for stack in STACKS), tuple(p._version for p in self.parameters()), tuple(p.data_ptr() for p in self.parameters()))
        if self._shared is None or self._shared[0] != key:
            with torch.no_grad():
                self._shared = (key, self.kv(model))
        return self._shared[1]

    @torch.no_grad()
    def init_from_model(self, model: UnitMBart, units: Tensor) -> DeepPrompt:
        """Start from what each layer really sees: run the frozen model on real unit sequences
        `units` [N, T] and take, per layer, L of the inputs its key/value projections received.

        (SpeechPrompt's own "init from embeddings" is a no-op, leaving N(0,1) prompts whose scale
        is far from the normalised activations the projections expect.)"""
        if units.dim() != 2 or units.numel() < self.cfg.length:
            raise ValueError(f"need unit sequences [N, T] with at least {self.cfg.length} units, got {tuple(units.shape)}")
        captured: dict[str, list[Tensor]] = {s: [] for s in self.cfg.stacks}
        attns = [(stack, layer.self_attn) for stack in self.cfg.stacks for layer in getattr(model, stack).layers]
        for stack, attn in attns:  # each layer's self-attention `kv` for this pass: it records its input, then projects
            # (the projections are applied as functions, not module calls, so module hooks would see nothing)
            attn.kv = lambda h, s=stack, kv=attn.kv: (captured[s].append(h), kv(h))[1]
        try:
            src = torch.stack([units_to_source(u) for u in units]).to(model.embed_tokens.weight.device)
            prev = torch.cat([torch.full_like(src[:, :1], EOS), units.to(src.device) + UNIT_OFFSET], dim=1)
            model(src, prev)
        finally:
            for _, attn in attns:
                del attn.kv
        g = torch.Generator().manual_seed(0)
        for stack in self.cfg.stacks:
            for i, h in enumerate(captured[stack]):
                flat = h.reshape(-1, h.shape[-1]).float().cpu()
                for kind in "kv":
                    pick = torch.randperm(flat.shape[0], generator=g)[: self.cfg.length]
                    getattr(self, f"{stack}_{kind}").data[i] = flat[pick].to(getattr(self, f"{stack}_{kind}").device)
        return self


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def load_prompt(path, model_cfg) -> DeepPrompt:
    """A prompt saved as safetensors (`<stack>_k`, `<stack>_v`); its length and stacks come from the
    tensors, which must fit the model."""
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such prompt file") from None
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors prompt: {e}") from None
    stacks = tuple(s for s in STACKS if f"{s}_k" in sd)
    if not stacks or any(k not in {f"{s}_{kind}" for s in stacks for kind in "kv"} for k in sd):
        raise ValueError(f"{path}: expected tensors <stack>_k/<stack>_v for stacks {STACKS}, got {sorted(sd)}")
    prompt = DeepPrompt(model_cfg, PromptConfig(length=sd[f"{stacks[0]}_k"].shape[1], stacks=stacks))
    try:
        prompt.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: this prompt was trained for a different model: {e}") from None
    return prompt
