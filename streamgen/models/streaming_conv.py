"""Convolutional networks on streams: every sample of every layer computed once, for a batch of
streams of different lengths, exactly equal to the network over the whole signal. Two graphs: the
CodeHiFiGAN generator (`StreamingGenerator`) and the source-filter vocoder's parameter network
(`StreamingParams`).

Every convolution of the generator is a "valid" convolution over its input with `a` zeros before
it and `b` after it: a "same" conv of kernel k and dilation d has a = b = d(k-1)/2, and a
transposed conv (rate u, kernel k, padding P) is a conv with the flipped kernel over its input
zero-stuffed (each sample followed by u-1 zeros), with a = k-1-P and b = P. On a stream, such a
conv keeps the last K-1 inputs it has seen (K = d(k-1)+1, starting as `a` zeros), and each new
piece of input gives as many outputs as the kept and new inputs allow; at the end, `b` zeros
flush it. A residual `x + f(x)` keeps the x that f has not yet caught up with, and the mean of a
stage's resblocks keeps each branch's outputs until all have them: nothing is computed twice.

A batch is ragged: x [B, C, T] with n [B] valid samples per row (the rest zeros). Each stream's
state lives in its own `GeneratorStream`; a batched step stacks the rows' states per layer, so
sessions of any lengths share every call.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

from .source_filter_vocoder import layer_norm
from .vocoder import LRELU_SLOPE, CodeHiFiGAN


def take(x: Tensor, start: Tensor, n: Tensor, width: int) -> Tensor:
    """Row b's x[b, :, start_b : start_b + n_b], left-aligned in [B, C, width], zeros after n_b."""
    B, C, T = x.shape
    if B == 1:  # one stream: a slice (the same numbers, without the gather)
        s, k = int(start[0]), int(n[0])
        return F.pad(x[:, :, s : s + k], (0, width - k)) if k < width else x[:, :, s : s + width]
    j = torch.arange(width, device=x.device)[None]
    idx = (start[:, None] + j).clamp(0, max(T - 1, 0))
    out = x.gather(2, idx[:, None, :].expand(B, C, width)) if T else x.new_zeros(B, C, width)
    return out * (j < n[:, None])[:, None, :].to(x.dtype)


def join(a: Tensor, na: Tensor, b: Tensor, nb: Tensor) -> tuple[Tensor, Tensor]:
    """Ragged concatenation along time: row b is a[b, :, :na_b] then b[b, :, :nb_b]."""
    n = na + nb
    if a.shape[0] == 1:  # one stream
        return torch.cat([a[:, :, : int(na[0])], b[:, :, : int(nb[0])]], dim=2), n
    width = int(n.max()) if len(n) else 0
    both = torch.cat([a, b], dim=2)
    j = torch.arange(width, device=a.device)[None]
    idx = torch.where(j < na[:, None], j, a.shape[2] + j - na[:, None])
    return take_idx(both, idx, n), n


def take_idx(x: Tensor, idx: Tensor, n: Tensor) -> Tensor:
    B, C, T = x.shape
    width = idx.shape[1]
    if T == 0 or width == 0:
        return x.new_zeros(B, C, width)
    out = x.gather(2, idx.clamp(0, T - 1)[:, None, :].expand(B, C, width))
    return out * (torch.arange(width, device=x.device)[None] < n[:, None])[:, None, :].to(x.dtype)


class Queue:
    """Samples of one stream waiting at one point of the graph: [C, n]."""

    def __init__(self, channels: int, dtype, device):
        self.x = torch.zeros(channels, 0, dtype=dtype, device=device)


def stack(parts: list[Tensor]) -> tuple[Tensor, Tensor]:
    """[C, n_b] tensors -> ragged [B, C, max n], n."""
    widths = [p.shape[1] for p in parts]
    n = torch.tensor(widths, device=parts[0].device)
    if min(widths) == max(widths):
        return torch.stack(parts), n
    out = parts[0].new_zeros(len(parts), parts[0].shape[0], max(widths))
    for i, p in enumerate(parts):
        out[i, :, : p.shape[1]] = p
    return out, n


def unstack(x: Tensor, n: Tensor) -> list[Tensor]:
    """Row views (no copy): each row's valid part."""
    return [x[i, :, :k] for i, k in enumerate(n.tolist())]


class ConvOp:
    """One conv of the graph: weight [Co, Ci, k], dilation, zeros before (a) and after (b), and for
    a transposed conv the zero-stuffing rate."""

    def __init__(self, weight: Tensor, bias: Tensor | None, dilation: int, a: int, b: int, stuff: int = 1,
                 matmul: bool = False):
        self.weight, self.bias, self.dilation, self.a, self.b, self.stuff = weight, bias, dilation, a, b, stuff
        self.k = self.dilation * (weight.shape[2] - 1) + 1  # reach of one output, in inputs
        # matmul: the conv as one matrix product over the unfolded taps, y[t] = W [x[t]; ...; x[t+k-1]] + b
        # (weight flattened to [Co, Ci * k]); for few frames of a narrow network in float64 (the
        # source-filter parameters) it is 1.1-1.9x faster than conv1d on a CPU
        self.flat = weight.detach().reshape(weight.shape[0], -1) if matmul and dilation == 1 else None

    @classmethod
    def same(cls, conv: torch.nn.Conv1d, matmul: bool = False) -> ConvOp:
        p = conv.padding[0]
        return cls(conv.weight, conv.bias, conv.dilation[0], p, p, matmul=matmul)

    @classmethod
    def transposed(cls, up: torch.nn.ConvTranspose1d) -> ConvOp:
        k, u, P = up.kernel_size[0], up.stride[0], up.padding[0]
        return cls(up.weight.transpose(0, 1).flip(-1), up.bias, 1, k - 1 - P, P, stuff=u)

    def conv(self, x: Tensor) -> Tensor:
        """The valid convolution of x [B, Ci, L] -> [B, Co, L - k + 1] (empty when L < k)."""
        B, C, L = x.shape
        if L < self.k:
            return x.new_zeros(B, self.weight.shape[0], 0)
        if self.flat is None:
            return F.conv1d(x, self.weight, self.bias, dilation=self.dilation)
        taps = x.unfold(2, self.k, 1).permute(0, 2, 1, 3).reshape(B, L - self.k + 1, C * self.k)  # [B, L', (Ci, k)]
        return F.linear(taps, self.flat, self.bias).transpose(1, 2)

    def init_tail(self, ref: Tensor) -> Tensor:
        return ref.new_zeros(self.weight.shape[1], self.a)  # the zeros before the signal

    def __call__(self, tails: list[Tensor], x: Tensor, n: Tensor, ended: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """New input x [B, Ci, T] (n valid per row) after each row's tail -> (new tails, output, counts).
        `ended` [B] bool: the stream ends with this input (the `b` trailing zeros are added)."""
        if self.stuff > 1:  # each sample followed by stuff-1 zeros
            B, C, T = x.shape
            x = torch.stack([x] + [torch.zeros_like(x)] * (self.stuff - 1), dim=3).reshape(B, C, T * self.stuff)
            n = n * self.stuff
        keep = self.k - 1
        if self.b and bool(ended.any()):
            zeros = x.new_zeros(x.shape[0], x.shape[1], self.b)
            x, n = join(x, n, zeros, ended.long() * self.b)
        t, tn = stack(tails)
        if t.shape[2] == keep and bool((tn == keep).all()):  # steady state: every row's tail is full
            cat, total = torch.cat([t, x], dim=2), tn + n
            out_n = n
            y = self.conv(cat)
            new_tails = unstack(take(cat, n, torch.full_like(n, keep), keep), torch.full_like(n, keep))
            return new_tails, y, out_n
        cat, total = join(t, tn, x, n)
        out_n = (total - keep).clamp_min(0)
        y = self.conv(cat)
        width = int(out_n.max()) if len(out_n) else 0
        y = take(y, torch.zeros_like(out_n), out_n, width)
        start = (total - keep).clamp_min(0)
        new_tails = unstack(take(cat, start, total - start, keep), total - start)
        return new_tails, y, out_n


def lrelu(x: Tensor, slope: float = LRELU_SLOPE) -> Tensor:
    return F.leaky_relu(x, slope)


class GeneratorStream:
    """One stream's state in every layer of a CodeHiFiGAN generator."""

    def __init__(self, graph: StreamingGenerator):
        ref = graph.model.dict.weight
        self.tails = [op.init_tail(ref) for op in graph.ops]
        self.queues = [ref.new_zeros(c, 0) for c in graph.queue_channels]
        self.ended = False


class StreamingGenerator:
    """The generator of a CodeHiFiGAN as a graph of streaming convs (see the module doc)."""

    def __init__(self, model: CodeHiFiGAN):
        self.model = model
        self.ops: list[ConvOp] = []
        self.queue_channels: list[int] = []
        cfg = model.cfg
        self.nk = len(cfg.resblock_kernel_sizes)
        self.pre = self._op(ConvOp.same(model.conv_pre))
        self.ups, self.blocks = [], []
        for i, up in enumerate(model.ups):
            self.ups.append(self._op(ConvOp.transposed(up)))
            stage = []
            for j in range(self.nk):
                rb = model.resblocks[i * self.nk + j]
                pairs = [(self._op(ConvOp.same(c1)), self._op(ConvOp.same(c2)), self._queue(c1.in_channels))
                         for c1, c2 in zip(rb.convs1, rb.convs2)]
                stage.append((pairs, self._queue(rb.convs1[0].in_channels)))  # branch output waiting for the others
            self.blocks.append(stage)
        self.post = self._op(ConvOp.same(model.conv_post))

    def _op(self, op: ConvOp) -> int:
        self.ops.append(op)
        return len(self.ops) - 1

    def _queue(self, channels: int) -> int:
        self.queue_channels.append(channels)
        return len(self.queue_channels) - 1

    def new_stream(self) -> GeneratorStream:
        return GeneratorStream(self)

    # one op / queue over the rows of a batch
    def _conv(self, streams, i, x, n, ended):
        tails, y, m = self.ops[i]([s.tails[i] for s in streams], x, n, ended)
        for s, t in zip(streams, tails):
            s.tails[i] = t
        return y, m

    def _push(self, streams, q, x, n):
        """Append to queue q; return the queue as a ragged batch."""
        qx, qn = stack([s.queues[q] for s in streams])
        return join(qx, qn, x, n)

    def _keep(self, streams, q, x, n, used):
        """Put back what is left of a ragged batch after its first `used` samples."""
        rest = n - used
        width = int(rest.max()) if len(rest) else 0
        for s, r in zip(streams, unstack(take(x, used, rest, width), rest)):
            s.queues[q] = r

    @torch.no_grad()
    def step(self, streams: list[GeneratorStream], frames: list[Tensor], ended: list[bool]) -> list[Tensor]:
        """New unit ids per frame for each stream (and whether its frames end here) -> the new audio
        of each stream: all the samples that those frames make final."""
        dev = self.model.dict.weight.device
        end = torch.tensor(ended, device=dev)
        ids, n = stack([f.to(dev)[None] for f in frames])
        x = self.model.dict(ids[:, 0].clamp_min(0)).transpose(1, 2) * (torch.arange(ids.shape[2], device=dev)[None] < n[:, None])[:, None]
        x, n = self._conv(streams, self.pre, x, n, end)
        for i, up in enumerate(self.ups):
            x, n = self._conv(streams, up, lrelu(x), n, end)
            outs = []
            for pairs, q_out in self.blocks[i]:
                y, m = x, n
                for c1, c2, q_res in pairs:
                    r, rn = self._push(streams, q_res, y, m)  # y waits for f(y) to catch up
                    h, hm = self._conv(streams, c1, lrelu(y), m, end)
                    h, hm = self._conv(streams, c2, lrelu(h), hm, end)
                    y = take(r, torch.zeros_like(hm), hm, h.shape[2]) + h
                    m = hm
                    self._keep(streams, q_res, r, rn, hm)
                outs.append(self._push(streams, q_out, y, m))
            common = torch.stack([o[1] for o in outs]).min(0).values
            width = int(common.max()) if len(common) else 0
            x = sum(take(o[0], torch.zeros_like(common), common, width) for o in outs) / self.nk
            for (pairs, q_out), (o, on) in zip(self.blocks[i], outs):
                self._keep(streams, q_out, o, on, common)
            n = common
        x, n = self._conv(streams, self.post, lrelu(x, 0.01), n, end)
        wave = torch.tanh(x)[:, 0]
        for s, e in zip(streams, ended):
            s.ended = s.ended or e
        return [wave[i, :k].float().cpu() for i, k in enumerate(n.tolist())]


class ParamsStream:
    """One stream's state in every block of a source-filter vocoder's parameter network."""

    def __init__(self, graph: StreamingParams):
        ref = graph.model.dict.weight
        self.tails = [op.init_tail(ref) for op in graph.ops]
        self.res = [ref.new_zeros(ref.shape[1], 0) for _ in graph.ops]  # block inputs its output has not caught up with
        self.ended = False


class StreamingParams:
    """`SourceFilterVocoder.params` on streams: each block x + mix(GELU(conv(LayerNorm(x)))) keeps its
    conv's last kernel-1 normalised inputs and the inputs x its output still lags behind; LayerNorm,
    GELU, the 1x1 mix and the head work frame by frame. Every frame of every block is computed once,
    and the parameters equal the whole sequence's (the convs' zero padding at both ends included)."""

    def __init__(self, model):
        self.model = model
        # in float64, rounded to float32 at the end, as `SourceFilterVocoder.params(exact=True)`
        self.ops = [ConvOp.same(copy.deepcopy(b.conv).double(), matmul=True) for b in model.blocks]
        self.mix = [(b.mix.weight[:, :, 0].double(), b.mix.bias.double()) for b in model.blocks]  # 1x1 convs as matrices
        self.head = (model.head.weight.double(), model.head.bias.double())

    def new_stream(self) -> ParamsStream:
        return ParamsStream(self)

    @torch.no_grad()
    def step(self, streams: list[ParamsStream], frames: list[Tensor], ended: list[bool]) -> list[Tensor]:
        """New unit ids per frame for each stream (and whether its frames end here) -> each stream's
        parameter frames that are now final [k * sub, n_params]."""
        m = self.model
        dev = m.dict.weight.device
        end = torch.tensor(ended, device=dev)
        ids, n = stack([f.to(dev)[None] for f in frames])
        x = m.dict(ids[:, 0].clamp_min(0)).transpose(1, 2).double()
        for i, (block, op) in enumerate(zip(m.blocks, self.ops)):
            h = layer_norm(block.norm, x.transpose(1, 2)).transpose(1, 2)
            tails, y, out_n = op([s.tails[i] for s in streams], h, n, end)
            for s, t in zip(streams, tails):
                s.tails[i] = t
            r, rn = join(*stack([s.res[i] for s in streams]), x, n)
            mixed = F.linear(F.gelu(y).transpose(1, 2), *self.mix[i]).transpose(1, 2) if y.shape[2] else y
            x = take(r, torch.zeros_like(out_n), out_n, y.shape[2]) + mixed
            width = int((rn - out_n).max()) if len(rn) else 0
            for s, rest in zip(streams, unstack(take(r, out_n, rn - out_n, width), rn - out_n)):
                s.res[i] = rest
            n = out_n
        p = F.linear(layer_norm(m.norm, x.transpose(1, 2)), *self.head).to(m.head.weight.dtype)  # [B, T, sub * n_params]
        for s, e in zip(streams, ended):
            s.ended = s.ended or e
        cfg = m.cfg
        return [p[i, :k].reshape(k * cfg.sub, cfg.n_params) for i, k in enumerate(n.tolist())]
