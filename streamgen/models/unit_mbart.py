"""Unit mBART: fairseq's `mbart_large` encoder-decoder over discrete speech units.

Dictionary: <s>=0, <pad>=1, </s>=2, <unk>=3, then units "0".."K-1" (token = unit + 4); mBART adds
language tokens, <mask> and padding rows after them, so the vocabulary size comes from the weights.
Source = units + </s>; the decoder starts from </s>. Learned positions are offset by 2
(padding_idx + 1), as in fairseq. Parameter names follow fairseq's state dict, except that the one
shared embedding table lives at `embed_tokens` (fairseq repeats it under the encoder, the decoder
and the output projection).

Two ways to run the decoder, which must agree to fp32 rounding:
- `forward` / `decode`: all target positions at once (training, reference);
- `start` + `step`: incremental, one token per row per step, with a `DecoderState` per batch of
  sessions holding the self-attention K/V cache and the cross-attention K/V of the source.
A task's deep prompt enters both as a shared prefix (`PromptKV`), never copied per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Attention, Prefix, PrefixGroups, additive, attend_rows
from .half_weights import linear
from .shapes import on_grid, right_padded, to_device

BOS, PAD, EOS, UNK = 0, 1, 2, 3
UNIT_OFFSET = 4


@dataclass(frozen=True)
class UnitMBartConfig:
    vocab_size: int = 1008
    num_units: int = 1000  # tokens 4 .. 4+num_units-1 are units; only they and </s> are generated
    dim: int = 1024
    ffn_dim: int = 4096
    heads: int = 16
    encoder_layers: int = 12
    decoder_layers: int = 12
    max_positions: int = 1024
    normalize_before: bool = True  # pre-norm layers and a final LayerNorm per stack (mBART recipe)
    scale_embedding: bool = True  # token embeddings times sqrt(dim) (fairseq no_scale_embedding=False)
    layernorm_embedding: bool = True
    dropout: float = 0.1  # residual dropout; active only in training mode
    mask_token: int | None = None  # mBART's <mask> (inpainting); its index depends on the dictionary
    # A model trained to stream (simultaneous translation): the encoder is causal (a source token
    # sees only those before it, so a grown source never changes what was encoded), and decoder
    # position q attends to the first `visible_source(q)` source tokens, the wait-k schedule
    # k + floor(q / ratio) + 1 (so what was decoded never changes either). None: bidirectional
    # encoder, every position sees the whole source (fairseq's Unit mBART).
    wait_k: int | None = None
    wait_ratio: float = 1.0

    def __post_init__(self):
        if self.wait_k is not None and (self.wait_k < 0 or not self.wait_ratio > 0):
            raise ValueError(f"a streaming Unit mBART needs wait_k >= 0 and wait_ratio > 0, got {self.wait_k}, {self.wait_ratio}")

    @property
    def streams(self) -> bool:
        return self.wait_k is not None

    def visible_source(self, q: Tensor) -> Tensor:
        """Source tokens decoder positions q (a LongTensor) attend to under the wait-k schedule."""
        return self.wait_k + torch.floor(q.double() / self.wait_ratio).long() + 1

    def decodable(self, source_tokens: int) -> int:
        """How many decoder positions the schedule lets run with this many source tokens read: the q
        with visible_source(q) <= source_tokens (q < (S - k) * ratio)."""
        q = torch.arange(self.max_positions)
        return int((self.visible_source(q) <= source_tokens).sum())

    @classmethod
    def from_dict(cls, d: dict) -> UnitMBartConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class PromptKV:
    """A task prompt's prefix keys/values for every layer: (k, v) each [H, L, D], or None."""

    encoder: tuple[Prefix | None, ...]
    decoder: tuple[Prefix | None, ...]


def group_prompts(prompts: list[PromptKV | None], device) -> list[tuple[PromptKV, Tensor, bool]]:
    """Rows by prompt object: (prompt, rows, whether it is every row's)."""
    by_id: dict[int, tuple[PromptKV, list[int]]] = {}
    for row, p in enumerate(prompts):
        if p is not None:
            by_id.setdefault(id(p), (p, []))[1].append(row)
    return [(p, torch.tensor(rows, device=device), len(rows) == len(prompts)) for p, rows in by_id.values()]


def layer_prefix(groups: list[tuple[PromptKV, Tensor, bool]], stack: str, i: int) -> Prefix | PrefixGroups | None:
    """Layer i's prompt prefix for a batch: the shared one when every row has the same prompt, else
    (prefix, rows) per task group; each prompt is attended once, never copied per row."""
    parts = [(getattr(p, stack)[i], rows, whole) for p, rows, whole in groups if getattr(p, stack)[i] is not None]
    if len(parts) == 1 and parts[0][2]:
        return parts[0][0]
    return [(pf, rows) for pf, rows, _ in parts] or None


def units_to_source(units: Tensor) -> Tensor:
    """Units [N] (0..K-1) -> encoder input tokens [N+1]: units + 4, then </s>."""
    return torch.cat([units.long() + UNIT_OFFSET, units.new_full((1,), EOS, dtype=torch.long)])


def rows_of(t: Tensor, rows: list[int], n: int) -> Tensor:
    """t[rows, :, :n]: a view when the rows are consecutive (nothing copied), else gathered."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return t[rows[0] : rows[0] + len(rows), :, :n]
    return t[torch.tensor(rows, device=t.device), :, :n]


def pad_sequences(seqs: list[Tensor], value: int = PAD) -> Tensor:
    """Right-pad 1-D token tensors to one [B, T] tensor."""
    return right_padded(seqs, max(len(s) for s in seqs), value)


def make_positions(tokens: Tensor) -> Tensor:
    """fairseq's learned-position indices: 2, 3, ... for real tokens, 1 (padding_idx) for <pad>."""
    real = tokens.ne(PAD)
    return torch.cumsum(real, dim=1) * real + PAD


class Layer(nn.Module):
    """One transformer layer; the decoder's adds cross-attention to the encoder output."""

    def __init__(self, cfg: UnitMBartConfig, cross: bool):
        super().__init__()
        d = cfg.dim
        self.self_attn = Attention(d, cfg.heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        if cross:
            self.encoder_attn = Attention(d, cfg.heads)
            self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.pre = cfg.normalize_before
        self.drop = nn.Dropout(cfg.dropout)

    def residual(self, x: Tensor, norm: nn.LayerNorm, f) -> Tensor:
        """x + f(LN(x)) (pre-norm) or LN(x + f(x)), dropout on f's output in training; the norm applied
        as a function (see `step`)."""
        ln = lambda h: F.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        drop = lambda h: F.dropout(h, self.drop.p, self.training)
        if self.pre:
            return x + drop(f(ln(x)))
        return ln(x + drop(f(x)))

    def ffn(self, h: Tensor) -> Tensor:
        return linear(F.gelu(linear(h, self.fc1.weight, self.fc1.bias)), self.fc2.weight, self.fc2.bias)

    def forward(self, x, self_kv, self_mask, prefix=None, cross_kv=None, cross_mask=None) -> Tensor:
        """x [B,T,d]. self_kv(h) gives the keys/values self-attention sees for its input h:
        h's own for a full pass, the cache with h appended for an incremental step."""
        x = self.residual(x, self.self_attn_layer_norm, lambda h: self.self_attn(h, *self_kv(h), self_mask, prefix))
        if cross_kv is not None:
            x = self.residual(x, self.encoder_attn_layer_norm, lambda h: self.encoder_attn(h, *cross_kv, cross_mask))
        return self.residual(x, self.final_layer_norm, self.ffn)

    def step(self, x: Tensor, self_attend, cross_attend=None) -> Tensor:
        """`forward` for new tokens of an incremental pass, in inference (a decoder step, a streaming
        encoder's next source tokens): x [B,T,d]; self_attend(q, k, v) gets the new tokens' queries,
        keys and values [B,H,T,D], puts the keys/values into the layer's cache and returns the
        attention's heads [B,H,T,D]; cross_attend(q) the heads of the attention to the source. The
        same equations with the projections applied as functions: a batch-1 decoder step on a CPU paid
        more in module-call overhead than in arithmetic."""
        sa = self.self_attn

        def self_attention(h: Tensor) -> Tensor:
            return sa.project(self_attend(*sa.qkv(h)))

        def cross_attention(h: Tensor) -> Tensor:
            ca = self.encoder_attn
            return ca.project(cross_attend(ca.split(linear(h, ca.q_proj.weight, ca.q_proj.bias))))

        x = self.residual(x, self.self_attn_layer_norm, self_attention)
        if cross_attend is not None:
            x = self.residual(x, self.encoder_attn_layer_norm, cross_attention)
        return self.residual(x, self.final_layer_norm, self.ffn)


class Stack(nn.Module):
    """Positions, embedding LayerNorm, layers and final LayerNorm of the encoder or the decoder."""

    def __init__(self, cfg: UnitMBartConfig, n_layers: int, cross: bool):
        super().__init__()
        self.embed_positions = nn.Embedding(cfg.max_positions + 2, cfg.dim)
        self.layernorm_embedding = nn.LayerNorm(cfg.dim) if cfg.layernorm_embedding else None
        self.layers = nn.ModuleList(Layer(cfg, cross) for _ in range(n_layers))
        self.layer_norm = nn.LayerNorm(cfg.dim) if cfg.normalize_before else None
        self.drop = nn.Dropout(cfg.dropout)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_positions.weight.dtype

    def embed(self, tokens_emb: Tensor, positions: Tensor) -> Tensor:
        x = tokens_emb + self.embed_positions(positions)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return self.drop(x)

    def finish(self, x: Tensor) -> Tensor:
        return x if self.layer_norm is None else self.layer_norm(x)


@dataclass
class DecoderState:
    """Incremental decoding state of B rows (sessions), stepped together.

    k, v:      per decoder layer, self-attention cache [B, H, C, D]; row b holds lengths[b] entries
    lengths:   [B] decoder tokens consumed per row (rows may differ: ragged sessions)
    cross:     per decoder layer, (k, v) of the row's encoder output [B, H, S, D]
    src_mask:  [B, S] True at real source positions
    prompts:   per row, its task's shared prefix (held by reference, never copied) or None
    enc:       a streaming model's encoder cache: per encoder layer, (k, v) [B, H, S, D] of the
               source read so far, so a grown source encodes only its new tokens (None otherwise)

    Used as a pool of slots by the serving engine: a row is a slot; sessions `insert` their state
    into free slots and `release` them, and a step advances only the `active` rows, so nobody's
    cache moves when another session joins or leaves.
    """

    k: list[Tensor]
    v: list[Tensor]
    lengths: Tensor
    cross: list[tuple[Tensor, Tensor]]
    src_mask: Tensor
    prompts: list[PromptKV | None]
    enc: list[tuple[Tensor, Tensor]] | None = None

    def __post_init__(self):
        self._groups = None

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def source_capacity(self) -> int:
        return self.src_mask.shape[1]

    def prefix(self, i: int) -> Prefix | PrefixGroups | None:
        """Decoder layer i's prompt prefix for these rows (see `layer_prefix`)."""
        if self._groups is None:
            self._groups = group_prompts(self.prompts, self.lengths.device)
        return layer_prefix(self._groups, "decoder", i)

    def grow(self, capacity: int) -> None:
        """Make room for `capacity` cached tokens per row (doubling keeps appends amortised O(1))."""
        if capacity <= self.capacity:
            return
        new = max(capacity, 2 * self.capacity)
        pad = (0, 0, 0, new - self.capacity)
        self.k = [F.pad(t, pad) for t in self.k]
        self.v = [F.pad(t, pad) for t in self.v]

    def grow_source(self, length: int) -> None:
        if length <= self.source_capacity:
            return
        new = max(length, 2 * self.source_capacity)
        widen = lambda kv: [(F.pad(k, (0, 0, 0, new - k.shape[2])), F.pad(v, (0, 0, 0, new - v.shape[2]))) for k, v in kv]
        self.cross = widen(self.cross)
        if self.enc is not None:
            self.enc = widen(self.enc)
        self.src_mask = F.pad(self.src_mask, (0, new - self.source_capacity))

    def add_slots(self, n: int) -> None:
        """n more (free) rows at the end."""
        def more(t: Tensor) -> Tensor:
            return torch.cat([t, t.new_zeros((n, *t.shape[1:]))])
        self.k, self.v = [more(t) for t in self.k], [more(t) for t in self.v]
        self.cross = [(more(k), more(v)) for k, v in self.cross]
        if self.enc is not None:
            self.enc = [(more(k), more(v)) for k, v in self.enc]
        self.lengths, self.src_mask = more(self.lengths), more(self.src_mask)
        self.prompts = self.prompts + [None] * n
        self._groups = None

    def insert(self, slots: list[int], other: DecoderState) -> None:
        """Copy `other`'s first len(slots) rows (new sessions, just prefilled; any rows after them are padding)
        into free slots; nothing else moves."""
        self.grow(other.capacity)
        self.grow_source(other.source_capacity)
        n = len(slots)
        idx = to_device(torch.tensor(slots), self.lengths.device)
        C, S = other.capacity, other.source_capacity
        for i in range(len(self.k)):
            self.k[i][idx, :, :C] = other.k[i][:n]
            self.v[i][idx, :, :C] = other.v[i][:n]
            self.cross[i][0][idx, :, :S] = other.cross[i][0][:n]
            self.cross[i][1][idx, :, :S] = other.cross[i][1][:n]
        for (k, v), (ok, ov) in zip(self.enc or [], other.enc or []):
            k[idx, :, :S], v[idx, :, :S] = ok[:n], ov[:n]
        self.src_mask[idx] = False
        self.src_mask[idx, :S] = other.src_mask[:n]
        self.lengths[idx] = other.lengths[:n]
        for j, s in enumerate(slots):
            self.prompts[s] = other.prompts[j]
        self._groups = None

    def release(self, slots: list[int]) -> None:
        """Free slots (their contents become unreachable: no source, no prompt, length 0)."""
        idx = to_device(torch.tensor(slots), self.lengths.device)
        self.src_mask[idx] = False
        self.lengths[idx] = 0
        for s in slots:
            self.prompts[s] = None
        self._groups = None

    def select(self, rows: Tensor | list[int]) -> DecoderState:
        """The state of a subset of rows (e.g. to drop finished sessions)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        return DecoderState(
            k=[t[rows] for t in self.k],
            v=[t[rows] for t in self.v],
            lengths=self.lengths[rows],
            cross=[(k[rows], v[rows]) for k, v in self.cross],
            src_mask=self.src_mask[rows],
            prompts=[self.prompts[r] for r in rows.tolist()],
            enc=None if self.enc is None else [(k[rows], v[rows]) for k, v in self.enc],
        )

    @staticmethod
    def cat(states: list[DecoderState]) -> DecoderState:
        """Join sessions into one batch (padding caches and sources); they may have different prompts."""
        C = max(s.capacity for s in states)
        S = max(s.src_mask.shape[1] for s in states)

        def pad_to(t: Tensor, n: int, dim: int) -> Tensor:
            return F.pad(t, (0, 0) * (t.dim() - 1 - dim) + (0, n - t.shape[dim]))

        n_layers = len(states[0].k)
        padded = lambda kvs: (torch.cat([pad_to(k, S, 2) for k, _ in kvs]), torch.cat([pad_to(v, S, 2) for _, v in kvs]))
        streams = all(s.enc is not None for s in states)
        return DecoderState(
            k=[torch.cat([pad_to(s.k[i], C, 2) for s in states]) for i in range(n_layers)],
            v=[torch.cat([pad_to(s.v[i], C, 2) for s in states]) for i in range(n_layers)],
            lengths=torch.cat([s.lengths for s in states]),
            cross=[
                (torch.cat([pad_to(s.cross[i][0], S, 2) for s in states]), torch.cat([pad_to(s.cross[i][1], S, 2) for s in states]))
                for i in range(n_layers)
            ],
            src_mask=torch.cat([pad_to(s.src_mask, S, 1) for s in states]),
            prompts=[p for s in states for p in s.prompts],
            enc=[padded([s.enc[i] for s in states]) for i in range(len(states[0].enc))] if streams else None,
        )


def _init_bert(m: nn.Module) -> None:
    """fairseq's init_bert_params: N(0, 0.02) for linear and embedding weights, zero biases."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear):
        nn.init.zeros_(m.bias)
    if isinstance(m, nn.Embedding) and m.padding_idx is not None:
        nn.init.zeros_(m.weight[m.padding_idx])


class UnitMBart(nn.Module):
    def __init__(self, cfg: UnitMBartConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=PAD)
        self.encoder = Stack(cfg, cfg.encoder_layers, cross=False)
        self.decoder = Stack(cfg, cfg.decoder_layers, cross=True)
        self.embed_scale = math.sqrt(cfg.dim) if cfg.scale_embedding else 1.0
        self.apply(_init_bert)

    def set_dropout(self, p: float) -> None:
        """Residual dropout for training (a regulariser for fine-tuning on few pairs); the config
        records it, inference never uses it."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.cfg = replace(self.cfg, dropout=p)
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p

    def token_embedding(self, tokens: Tensor) -> Tensor:
        return self.embed_tokens(tokens) * self.embed_scale

    def output(self, x: Tensor) -> Tensor:
        """Final decoder hidden states -> logits over the vocabulary (tied to the embedding)."""
        return linear(self.decoder.finish(x), self.embed_tokens.weight)

    # --- encoder -------------------------------------------------------------------------------

    def encode(self, src_tokens: Tensor, prompt: PromptKV | list[PromptKV | None] | None = None,
               kv: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """src_tokens [B, S] (right-padded with <pad>) -> encoder output [B, S, d]. `prompt`: one for
        every row, or one per row (a batch of several tasks). `kv`: a list that receives each layer's
        self-attention keys and values (a streaming encoder's cache)."""
        src_mask = src_tokens.ne(PAD)
        emb = self.token_embedding(src_tokens).to(self.encoder.dtype)  # the encoder stack may run in another dtype
        x = self.encoder.embed(emb, make_positions(src_tokens))
        key_mask = src_mask[:, None, None, :]  # [B,1,1,S]
        if self.cfg.streams:  # causal: token i sees tokens 0..i
            S = src_tokens.shape[1]
            key_mask = key_mask & torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        prompts = prompt if isinstance(prompt, list) else [prompt] * src_tokens.shape[0]
        groups = group_prompts(prompts, src_tokens.device)
        for i, layer in enumerate(self.encoder.layers):

            def keys(h: Tensor, layer: Layer = layer) -> tuple[Tensor, Tensor]:
                k, v = layer.self_attn.kv(h)
                if kv is not None:
                    kv.append((k, v))
                return k, v

            x = layer(x, keys, key_mask, prefix=layer_prefix(groups, "encoder", i))
        return self.encoder.finish(x).to(self.embed_tokens.weight.dtype)

    def cross_mask(self, src_mask: Tensor, q: Tensor) -> Tensor:
        """Which source tokens decoder positions q ([T] or [B, T]) attend to: [B, 1, T, S], the real
        ones, and for a streaming model only the schedule's first `visible_source(q)`."""
        mask = src_mask[:, None, None, :]
        if not self.cfg.streams:
            return mask
        seen = self.cfg.visible_source(q)
        seen = seen[None] if seen.dim() == 1 else seen
        return mask & (torch.arange(src_mask.shape[1], device=src_mask.device) < seen[:, None, :, None])

    # --- decoder, all positions at once --------------------------------------------------------

    def decode(self, prev_tokens: Tensor, enc: Tensor, src_mask: Tensor, prompt: PromptKV | None = None) -> Tensor:
        """prev_tokens [B, T] (starting with </s>, right-padded) -> logits [B, T, V]."""
        T = prev_tokens.shape[1]
        x = self.decoder.embed(self.token_embedding(prev_tokens), make_positions(prev_tokens))
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        self_mask = causal[None, None] & prev_tokens.ne(PAD)[:, None, None, :]  # [B,1,T,T]
        cross_mask = self.cross_mask(src_mask, torch.arange(T, device=x.device))
        for i, layer in enumerate(self.decoder.layers):
            x = layer(
                x, layer.self_attn.kv, self_mask, prefix=prompt.decoder[i] if prompt else None,
                cross_kv=layer.encoder_attn.kv(enc), cross_mask=cross_mask,
            )
        return self.output(x)

    def forward(self, src_tokens: Tensor, prev_tokens: Tensor, prompt: PromptKV | None = None) -> Tensor:
        """Teacher-forced logits [B, T, V] (full recompute; the reference for incremental decoding)."""
        enc = self.encode(src_tokens, prompt)
        return self.decode(prev_tokens, enc, src_tokens.ne(PAD), prompt)

    # --- decoder, incremental ------------------------------------------------------------------

    def start(self, src_tokens: Tensor, prompt: PromptKV | list[PromptKV | None] | None = None, capacity: int = 64) -> DecoderState:
        """Encode sources [B, S] and return a state ready for the first `step` (no tokens yet);
        `prompt` for every row or per row."""
        kv: list[tuple[Tensor, Tensor]] | None = [] if self.cfg.streams else None  # a stream keeps its encoder cache
        enc = self.encode(src_tokens, prompt, kv=kv)
        B, H = src_tokens.shape[0], self.cfg.heads
        D = self.cfg.dim // H
        empty = enc.new_zeros(B, H, capacity, D)
        n = len(self.decoder.layers)
        return DecoderState(
            k=[empty.clone() for _ in range(n)],
            v=[empty.clone() for _ in range(n)],
            lengths=torch.zeros(B, dtype=torch.long, device=enc.device),
            cross=[layer.encoder_attn.kv(enc) for layer in self.decoder.layers],
            src_mask=src_tokens.ne(PAD),
            prompts=list(prompt) if isinstance(prompt, list) else [prompt] * B,
            enc=kv,
        )

    def extend_source(self, state: DecoderState, rows: Tensor, tokens: Tensor, counts: Tensor) -> None:
        """A streaming model's sources grow: rows' next source tokens (tokens [R, T], row r takes its
        first counts[r]) run through the causal encoder against those rows' encoder caches, and their
        cross-attention keys and values join the rows'. Nothing encoded before changes (the encoder is
        causal), so this equals encoding the whole grown source, and no decoder cache is recomputed."""
        if state.enc is None:
            raise ValueError("extend_source needs a streaming Unit mBART (wait_k set) and its encoder cache")
        dev = tokens.device
        held = state.src_mask[rows].sum(1)  # a stream's source is contiguous: tokens it holds so far
        T = tokens.shape[1]
        S = on_grid(int(held.max()) + T, dev)  # the keys this pass reads (on a GPU rounded up to the grid; past a row's own, masked)
        state.grow_source(S)
        pos = held[:, None] + torch.arange(T, device=dev)  # [R, T] source positions
        x = self.encoder.embed(self.token_embedding(tokens).to(self.encoder.dtype), pos + PAD + 1)
        mask = (torch.arange(S, device=dev)[None, None, :] <= pos[:, :, None])[:, None]  # [R,1,T,S]
        listed = rows.tolist()
        groups = group_prompts([state.prompts[r] for r in listed], dev)
        at = rows[:, None]
        for i, (layer, (ek, ev)) in enumerate(zip(self.encoder.layers, state.enc)):

            def self_attend(q: Tensor, k: Tensor, v: Tensor, ek: Tensor = ek, ev: Tensor = ev, i: int = i) -> Tensor:
                ek[at, :, pos], ev[at, :, pos] = k.transpose(1, 2), v.transpose(1, 2)
                return Attention.attend_heads(q, rows_of(ek, listed, S), rows_of(ev, listed, S), mask, layer_prefix(groups, "encoder", i))

            x = layer.step(x, self_attend)
        enc = self.encoder.finish(x).to(self.embed_tokens.weight.dtype)
        for (ck, cv), layer in zip(state.cross, self.decoder.layers):
            k, v = layer.encoder_attn.kv(enc)
            ck[at, :, pos], cv[at, :, pos] = k.transpose(1, 2), v.transpose(1, 2)
        state.src_mask[at, pos] = torch.arange(T, device=dev)[None] < counts[:, None]

    def step(self, state: DecoderState, tokens: Tensor, active: Tensor | None = None, counts: Tensor | None = None,
             grow: bool = True) -> Tensor:
        """Feed tokens to rows and append them to their caches; return next-token logits.

        tokens [B] -> logits [B, V]; or tokens [B, T] (a prefill of T tokens per row, equal to T
        single steps) -> logits [B, T, V].
        active [B] bool: only these rows advance (the others' lengths stay; whatever is written past
        their length is never visible and is overwritten by their next real step).
        counts [B]: a ragged prefill, row b takes its first counts[b] tokens (the rest is padding).
        grow=False: the caller has already made room (no host synchronisation here)."""
        single = tokens.dim() == 1
        tokens = tokens[:, None] if single else tokens
        B, T = tokens.shape
        if grow:
            state.grow(int(state.lengths.max()) + T)
        rows = torch.arange(B, device=tokens.device)[:, None]
        pos = state.lengths[:, None] + torch.arange(T, device=tokens.device)  # [B, T] cache slots
        x = self.decoder.embed(self.token_embedding(tokens), pos + PAD + 1)
        visible = torch.arange(state.capacity, device=tokens.device)[None, None, :] <= pos[:, :, None]
        # [B,1,T,C]: causal within the new tokens, all earlier entries; both masks as the scores' bias, made once
        self_mask = additive(visible[:, None], x.dtype)
        cross_mask = additive(self.cross_mask(state.src_mask, pos), x.dtype)
        for i, (layer, k_cache, v_cache) in enumerate(zip(self.decoder.layers, state.k, state.v)):

            def self_attend(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor = k_cache, v_cache: Tensor = v_cache, i: int = i) -> Tensor:
                k_cache[rows, :, pos] = k.transpose(1, 2)  # indexed [B,T] -> [B,T,H,D]
                v_cache[rows, :, pos] = v.transpose(1, 2)
                return Attention.attend_heads(q, k_cache, v_cache, self_mask, state.prefix(i))

            x = layer.step(x, self_attend, lambda q, i=i: Attention.attend_heads(q, *state.cross[i], cross_mask))
        n = T if counts is None else counts
        state.lengths = state.lengths + (n if active is None else n * active)
        logits = self.output(x)
        if single:
            return logits[:, 0]
        return logits

    def step_rows(self, state: DecoderState, rows: list[int], tokens: Tensor) -> Tensor:
        """One token for each of `rows` of the state (slots of a pool), tokens [R] -> logits [R, V].
        The projections and the feed-forward take the R rows together (one read of the weights); the
        attention takes each row alone, over exactly its own cached tokens and the source its schedule
        lets it see (views up to those lengths: no padding, no mask, nothing of the other rows read),
        so a row's attention is the same computation in any batch. Equal to `step` on those rows; the
        caches must have room for one more token (`DecoderState.grow`)."""
        if len(rows) == 1 and state.prompts[rows[0]] is None:
            return self._step_row(state, rows[0], tokens)
        dev = tokens.device
        idx = torch.tensor(rows, device=dev)
        pos = state.lengths[idx]  # [R] where each row's token goes
        seen = state.src_mask[idx].sum(1)  # a row's source is contiguous from its start
        if self.cfg.streams:
            seen = torch.minimum(seen, self.cfg.visible_source(pos))
        n_self, n_src = (pos + 1).tolist(), seen.tolist()
        x = self.decoder.embed(self.token_embedding(tokens[:, None]), (pos + PAD + 1)[:, None])
        groups = group_prompts([state.prompts[r] for r in rows], dev)
        own = lambda k, v, n: [(k[r : r + 1, :, :m], v[r : r + 1, :, :m]) for r, m in zip(rows, n)]
        for i, (layer, k_cache, v_cache, (ck, cv)) in enumerate(zip(self.decoder.layers, state.k, state.v, state.cross)):

            def self_attend(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor = k_cache, v_cache: Tensor = v_cache, i: int = i) -> Tensor:
                k_cache[idx, :, pos], v_cache[idx, :, pos] = k[:, :, 0], v[:, :, 0]  # [R,H,D] at each row's position
                return attend_rows(q, own(k_cache, v_cache, n_self), layer_prefix(groups, "decoder", i))

            x = layer.step(x, self_attend, lambda q, ck=ck, cv=cv: attend_rows(q, own(ck, cv, n_src), None))
        state.lengths[idx] = pos + 1
        return self.output(x)[:, 0]

    def _step_row(self, state: DecoderState, r: int, token: Tensor) -> Tensor:
        """`step_rows` of one row without a prompt, the same computation with its position and the source it
        sees as numbers (no index tensors, no lists of views): most of a CPU engine's steps advance one row,
        and there the bookkeeping cost a tenth of the step."""
        p = int(state.lengths[r])  # where its token goes
        n_src = int(state.src_mask[r].sum())
        if self.cfg.streams:
            n_src = min(n_src, int(self.cfg.visible_source(state.lengths[r : r + 1])[0]))  # (the general path's op, on its device)
        x = self.decoder.embed(self.token_embedding(token[:, None]), torch.tensor([[p + PAD + 1]], device=token.device))
        for layer, k_cache, v_cache, (ck, cv) in zip(self.decoder.layers, state.k, state.v, state.cross):

            def self_attend(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor = k_cache, v_cache: Tensor = v_cache) -> Tensor:
                k_cache[r, :, p], v_cache[r, :, p] = k[0, :, 0], v[0, :, 0]
                return F.scaled_dot_product_attention(q, k_cache[r : r + 1, :, : p + 1], v_cache[r : r + 1, :, : p + 1])

            x = layer.step(x, self_attend, lambda q, ck=ck, cv=cv: F.scaled_dot_product_attention(q, ck[r : r + 1, :, :n_src], cv[r : r + 1, :, :n_src]))
        state.lengths[r] = p + 1
        return self.output(x)[:, 0]
