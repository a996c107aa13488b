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

A batch is ragged: x [B, C, T] with n [B] valid samples per row (what lies past them is never read
for an output). Every stream's state lives in fixed slot tensors (`Slots`, one per graph, as a
decoder's K/V pool): a batched step reads its rows' state with one index per tensor and writes it back
with one, so streams of any lengths share every call, a step's operators do not grow with the number
of streams, and every length is known on the host: nothing is read back from the device but the
step's result (on a GPU, no synchronisation per layer). On a GPU a step's rows are every slot below a
power of two past its streams' and its lengths are rounded up to a grid, so that it repeats a few shapes
(cuDNN plans each new one on the host): a row with no input leaves its slot's state as it is.
"""

from __future__ import annotations

import copy
import heapq
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .captured import CapturedCall
from .shapes import grid, rounds, to_device
from .source_filter_vocoder import layer_norm
from .vocoder import LRELU_SLOPE, CodeHiFiGAN


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


def counts(n: np.ndarray, device) -> Tensor:
    return to_device(torch.from_numpy(np.ascontiguousarray(n, dtype=np.int64)), device)


def shift(x: Tensor, start: np.ndarray, width: int) -> Tensor:
    """Row b's x[b, :, start_b : start_b + width], left-aligned in [B, C, width]. The starts are known on the
    host, so nothing is read back from the device; positions past a row's end hold whatever is there (zeros
    past x's end): callers keep each row's valid length beside it."""
    B, C, T = x.shape
    s0 = int(start[0]) if len(start) else 0
    if (start == s0).all():  # one start for every row: a slice
        out = x[:, :, s0 : s0 + width]
        return F.pad(out, (0, width - out.shape[2])) if out.shape[2] < width else out
    if T == 0:
        return x.new_zeros(B, C, width)
    return gathered(x, counts(start, x.device), width)


def gathered(x: Tensor, start: Tensor, width: int) -> Tensor:
    """`shift` with the starts on the device (a static step's): every row gathered, whatever its start."""
    B, C, T = x.shape
    idx = (start[:, None] + torch.arange(width, device=x.device)).clamp(0, max(T - 1, 0))
    return x.gather(2, idx[:, None, :].expand(B, C, width))


def zero_after(x: Tensor, n: np.ndarray) -> Tensor:
    """x with each row's samples from n_b on set to zero."""
    return x * (torch.arange(x.shape[2], device=x.device) < counts(n, x.device)[:, None])[:, None, :].to(x.dtype)


def join(a: Tensor, na: np.ndarray, b: Tensor, nb: np.ndarray, size=lambda w: w) -> tuple[Tensor, np.ndarray]:
    """Ragged concatenation along time: row b is a[b, :, :na_b] then b[b, :, :nb_b] (left-aligned), in a
    tensor `size(longest row)` wide."""
    n = na + nb
    width = size(int(n.max()) if len(n) else 0)
    both = torch.cat([a, b], dim=2)
    if both.shape[2] < width:
        both = F.pad(both, (0, width - both.shape[2]))
    if (na == a.shape[2]).all():  # every row fills a: a plain concatenation
        return both[:, :, :width], n
    if both.shape[2] == 0 or width == 0:
        return both.new_zeros(both.shape[0], both.shape[1], width), n
    return spliced(both, a.shape[2], counts(na, a.device), width), n


def spliced(both: Tensor, split: int, na: Tensor, width: int) -> Tensor:
    """Row b's first na_b samples of `both` (of its first `split`), then those from `split` on, in [B, C, width]
    (na on the device): `join`'s gather, whatever the rows."""
    j = torch.arange(width, device=both.device)[None]
    idx = torch.where(j < na[:, None], j, split + j - na[:, None]).clamp_max(both.shape[2] - 1)
    return both.gather(2, idx[:, None, :].expand(-1, both.shape[1], -1))


class Slots:
    """The state of many streams in fixed slot tensors, as a decoder's K/V pool: per conv its last inputs
    (`tails[i]` [S, Ci, k-1], right-aligned, `tail_n[i]` of them valid) and per queue the samples waiting at
    one point of the graph (`queues[q]` [S, C, width], left-aligned, `queue_n[q]` valid). A stream holds a
    slot; a batched step reads its rows' state with one index per tensor and writes it back with one, so
    a step's operators do not grow with the number of streams, and every length lives on the host."""

    def __init__(self, ops: list[ConvOp], queue_channels: list[int], ref: Tensor, shapes: bool | None = None,
                 queue_capacity: list[int] | None = None):
        self.ops = ops
        # shapes: a GPU's (by default where the device rounds, `shapes.rounds`): a step's rows are every slot below a
        # power of two (`Rows`) and every length is rounded up to the `grid`, the extra samples past each row's end
        self.shapes = rounds(ref.device) if shapes is None else shapes
        # queue_capacity: the most samples each queue ever keeps between steps, where the graph knows it; on the
        # GPU's shapes each queue is that wide (on the grid) from the start, so a step's shapes follow its input's
        self.queue_width = [self.width(c) if self.shapes else 0 for c in queue_capacity or [0] * len(queue_channels)]
        self.tails = [ref.new_zeros(0, op.weight.shape[1], op.k - 1) for op in ops]
        self.tail_n = [np.zeros(0, dtype=np.int64) for _ in ops]
        self.queues = [ref.new_zeros(0, c, w) for c, w in zip(queue_channels, self.queue_width)]
        self.queue_n = [np.zeros(0, dtype=np.int64) for _ in queue_channels]
        self.on_replace = None  # called whenever the slot tensors are made anew (a captured step reads them in place)
        # free slots, a heap: the lowest is taken first (a GPU's steps run every slot below a power of two past their
        # streams', so the streams are kept in the lowest slots)
        self.free: list[int] = []

    def width(self, n: int) -> int:
        return grid(n) if self.shapes else n

    @property
    def size(self) -> int:
        return len(self.tail_n[0]) if self.tail_n else 0

    def acquire(self) -> int:
        """A free slot, its state that of a stream before its first sample (each conv's `a` zeros)."""
        if not self.free:
            self._grow(max(16, 2 * self.size))
        slot = heapq.heappop(self.free)
        for i, op in enumerate(self.ops):
            self.tails[i][slot] = 0
            self.tail_n[i][slot] = op.a
        for q in range(len(self.queues)):
            self.queue_n[q][slot] = 0
        return slot

    def release(self, slot: int) -> None:
        heapq.heappush(self.free, slot)

    def shrink(self) -> bool:
        """With no stream holding a slot, drop the slot tensors (they keep the size of the most streams that ran
        at once); the next stream's `acquire` makes them anew. Only from the thread that runs the steps (as
        `acquire`). Whether it did."""
        if len(self.free) < self.size:
            return False
        self.tails = [t[:0].clone() for t in self.tails]
        self.queues = [q.new_zeros(0, q.shape[1], w) for q, w in zip(self.queues, self.queue_width)]
        self.tail_n = [n[:0].copy() for n in self.tail_n]
        self.queue_n = [n[:0].copy() for n in self.queue_n]
        self.free = []
        self._replaced()
        return True

    def _grow(self, size: int) -> None:
        old = self.size
        grow = lambda t: torch.cat([t, t.new_zeros(size - old, *t.shape[1:])])
        self.tails = [grow(t) for t in self.tails]
        self.queues = [grow(q) for q in self.queues]
        self.tail_n = [np.concatenate([n, np.zeros(size - old, dtype=np.int64)]) for n in self.tail_n]
        self.queue_n = [np.concatenate([n, np.zeros(size - old, dtype=np.int64)]) for n in self.queue_n]
        for slot in range(old, size):
            heapq.heappush(self.free, slot)
        self._replaced()

    def _replaced(self) -> None:
        if self.on_replace is not None:
            self.on_replace()

    def conv(self, i: int, rows: Rows, x: Tensor, n: np.ndarray) -> tuple[Tensor, np.ndarray]:
        """Conv i over each row's new input x [B, Ci, T] (n_b valid) after its tail -> (output, valid counts)."""
        op, keep = self.ops[i], self.ops[i].k - 1
        if op.stuff > 1:  # each sample followed by stuff-1 zeros
            B, C, T = x.shape
            x = torch.stack([x] + [torch.zeros_like(x)] * (op.stuff - 1), dim=3).reshape(B, C, T * op.stuff)
            n = n * op.stuff
        if op.b and rows.ended.any():  # the stream ends: `b` zeros after its input
            x = zero_after(F.pad(x, (0, self.width(x.shape[2] + op.b) - x.shape[2])), n)
            n = n + rows.ended * op.b
        tn = self.tail_n[i][rows.slots]
        cat = torch.cat([self.tails[i].index_select(0, rows.index), x], dim=2)  # row b valid in [keep - tn_b, keep + n_b)
        out_n = np.maximum(tn + n - keep, 0)
        y = shift(op.conv(cat), keep - tn, self.width(int(out_n.max()) if len(out_n) else 0))
        self.tails[i].index_copy_(0, rows.index, shift(cat, n, keep))  # the last keep inputs, right-aligned
        self.tail_n[i][rows.slots] = np.minimum(tn + n, keep)
        return y, out_n

    def push(self, q: int, rows: Rows, x: Tensor, n: np.ndarray) -> tuple[Tensor, np.ndarray]:
        """Queue q's rows with x appended: a ragged batch."""
        return join(self.queues[q].index_select(0, rows.index), self.queue_n[q][rows.slots], x, n, self.width)

    def keep(self, q: int, rows: Rows, x: Tensor, n: np.ndarray, used: np.ndarray) -> None:
        """Put back what is left of a ragged batch after its first `used` samples."""
        rest = n - used
        width = max(self.width(int(rest.max()) if len(rest) else 0), self.queues[q].shape[2])
        if width > self.queues[q].shape[2]:
            self.queues[q] = F.pad(self.queues[q], (0, width - self.queues[q].shape[2]))
            self._replaced()
        self.queues[q].index_copy_(0, rows.index, shift(x, used, width))
        self.queue_n[q][rows.slots] = rest


class Rows:
    """The rows a batched step advances: their slots (host and device), which end with this step, and their new
    unit ids [rows, width] (padded with 0, built on the host, moved once) with their counts `n`; `at`: each
    stream's row. On the grid (a GPU's shapes) the rows are every slot below a power of two past the streams'
    (a step has one of a few batch sizes whichever streams have frames): a row with no input leaves its slot's
    state as it is (the convs have nothing new to read, and no queue is ever left with output for every
    branch), whether the slot is free or another stream's."""

    def __init__(self, streams: list[Stream], frames: list[Tensor], ended: list[bool], slots: Slots, device):
        if any(s.ended for s in streams):
            raise ValueError("a stream that has ended cannot be stepped again (its slot may be another stream's)")
        self.streams, self.stream_ended = streams, ended
        taken = np.array([s.take_slot() for s in streams], dtype=np.int64)
        if slots.shapes:
            self.slots = np.arange(min(slots.size, 1 << int(taken.max()).bit_length()) if len(taken) else 0, dtype=np.int64)
            self.at = taken
        else:
            self.slots, self.at = taken, np.arange(len(taken))
        self.index = counts(self.slots, device)
        self.ended = np.zeros(len(self.slots), dtype=bool)
        self.ended[self.at] = ended
        self.n = np.zeros(len(self.slots), dtype=np.int64)
        self.n[self.at] = [len(f) for f in frames]
        ids = np.zeros((len(self.n), slots.width(int(self.n.max()) if len(self.n) else 0)), dtype=np.int64)
        for b, f in zip(self.at, frames):
            ids[b, : len(f)] = f.cpu().numpy()
        self.ids = to_device(torch.from_numpy(ids), device).clamp_min(0)

    def finish(self, n: np.ndarray) -> list[tuple[int, int]]:
        """After the step: the streams that ended give their slots back; each stream's (row, output count of `n`)."""
        for s, e in zip(self.streams, self.stream_ended):
            if e:
                s.end()
        return list(zip(self.at.tolist(), n[self.at].tolist()))


class Stream:
    """One stream's place in a graph's slots. It takes a slot at its first step (in the thread that runs the
    steps, the only one that changes the slot tensors) and gives it back when it ends or is dropped."""

    def __init__(self, slots: Slots):
        self.slots, self.slot, self.ended = slots, None, False
        self._release = None

    def take_slot(self) -> int:
        if self.slot is None:
            self.slot = self.slots.acquire()
            self._release = weakref.finalize(self, self.slots.release, self.slot)
        return self.slot

    def end(self) -> None:
        self.ended = True
        if self._release is not None:
            self._release()


def lrelu(x: Tensor, slope: float = LRELU_SLOPE) -> Tensor:
    return F.leaky_relu(x, slope)


class StreamingGenerator:
    """The generator of a CodeHiFiGAN as a graph of streaming convs (see the module doc).

    On the GPU's shapes a step in which no stream ends is static: its rows are slots [0, R), every tensor's width
    follows the input's (W frames; each queue is as wide as the most it ever keeps), and every count comes from
    the host in one copy, so on CUDA it is captured as a CUDA graph per (R, W) once met twice and replayed (one
    launch for the hundreds of small kernels of a step). The host walks the same graph with its counts alone
    (`_Counts`), which give each stream's output length; a step in which a stream ends runs eagerly."""

    def __init__(self, model: CodeHiFiGAN, shapes: bool | None = None, graphs: bool = True):
        self.model, self.graphs = model, graphs  # graphs: on CUDA, static steps captured (else eager)
        self.ops: list[ConvOp] = []
        self.queue_channels: list[int] = []
        self.queue_capacity: list[int] = []
        cfg = model.cfg
        self.nk = len(cfg.resblock_kernel_sizes)
        self.pre = self._op(ConvOp.same(model.conv_pre))
        self.ups, self.blocks = [], []
        for i, up in enumerate(model.ups):
            self.ups.append(self._op(ConvOp.transposed(up)))
            stage, lags = [], []
            for j in range(self.nk):
                rb = model.resblocks[i * self.nk + j]
                pairs = []
                for c1, c2 in zip(rb.convs1, rb.convs2):
                    o1, o2 = ConvOp.same(c1), ConvOp.same(c2)
                    # a conv's output lags its input by b samples: the residual waits b1 + b2 at most
                    pairs.append((self._op(o1), self._op(o2), self._queue(c1.in_channels, o1.b + o2.b)))
                lags.append(sum(self.queue_capacity[q] for _, _, q in pairs))
                stage.append((pairs, self._queue(rb.convs1[0].in_channels, 0)))  # branch output waiting for the others
            for (_, q_out), lag in zip(stage, lags):  # a branch waits for the slowest
                self.queue_capacity[q_out] = max(lags) - lag
            self.blocks.append(stage)
        self.post = self._op(ConvOp.same(model.conv_post))
        self.slots = Slots(self.ops, self.queue_channels, model.dict.weight, shapes, self.queue_capacity)
        self._new_static()
        self.slots.on_replace = self._new_static  # (the captured steps read the old tensors, and hold memory)

    def _op(self, op: ConvOp) -> int:
        self.ops.append(op)
        return len(self.ops) - 1

    def _queue(self, channels: int, capacity: int) -> int:
        self.queue_channels.append(channels)
        self.queue_capacity.append(capacity)
        return len(self.queue_channels) - 1

    def new_stream(self) -> Stream:
        return Stream(self.slots)

    def walk(self, G, x, n):
        """The generator over one step's new frames x (n of them per row) through the operations of G: the
        eager step (`_Eager`), the host's counts alone (`_Counts`) or the static step (`_Static`)."""
        x, n = G.conv(self.pre, x, n)
        for i, up in enumerate(self.ups):
            x, n = G.conv(up, x, n, LRELU_SLOPE)
            outs = []
            for pairs, q_out in self.blocks[i]:
                y, m = x, n
                for c1, c2, q_res in pairs:
                    r, rn = G.push(q_res, y, m)  # y waits for f(y) to catch up
                    h, hm = G.conv(c1, y, m, LRELU_SLOPE)
                    h, hm = G.conv(c2, h, hm, LRELU_SLOPE)
                    y, m = G.add(r, h), hm
                    G.keep(q_res, r, rn, hm)
                outs.append((q_out, *G.push(q_out, y, m)))
            common = G.least([on for _, _, on in outs])
            x = G.mean([o for _, o, _ in outs], common, x)
            for q_out, o, on in outs:
                G.keep(q_out, o, on, common)
            n = common
        return G.conv(self.post, x, n, 0.01)

    @torch.no_grad()
    def step(self, streams: list[Stream], frames: list[Tensor], ended: list[bool]) -> list[Tensor]:
        """New unit ids per frame for each stream (and whether its frames end here) -> the new audio
        of each stream: all the samples that those frames make final."""
        S = self.slots
        rows = Rows(streams, frames, ended, S, self.model.dict.weight.device)
        if S.shapes and not rows.ended.any():
            counts = _Counts(S, len(rows.slots))
            _, n = self.walk(counts, None, rows.n)  # every count of the step, before it and after
            wave = self.static(rows.ids, counts.device_counts(rows.n, rows.ids.device)).cpu()  # one read back for the whole step
        else:
            x, n = self.walk(_Eager(S, rows), self.model.dict(rows.ids).transpose(1, 2), rows.n)
            wave = torch.tanh(x)[:, 0].float().cpu()  # one read back for the whole step
        return [wave[b, :k] for b, k in rows.finish(n)]

    def _static_step(self, ids: Tensor, counts: Tensor) -> Tensor:
        """The static step over slots [0, R): (ids [R, W], counts [K, R]) -> audio [R, W * hop], writing the rows'
        state in place."""
        x, _ = self.walk(_Static(self.slots, ids.shape[0], counts), self.model.dict(ids).transpose(1, 2), counts[0])
        return torch.tanh(x)[:, 0].float()

    def _new_static(self) -> None:
        """The static step, captured per (R, W) on CUDA (one memory pool for all): it writes rows [0, R) of the slots.
        Made anew with the slot tensors (and so given back with them when an idle engine shrinks them)."""
        if not self.graphs:
            self.static = self._static_step
            return
        S = self.slots
        self.static = CapturedCall(self._static_step, "the streaming vocoder's step", after=2,
                                   state=lambda ids, counts: [t[: ids.shape[0]] for t in S.tails + S.queues])


class _Eager:
    """A step's operations on its rows, every count on the host (exact widths, or the grid's)."""

    def __init__(self, S: Slots, rows: Rows):
        self.S, self.rows = S, rows

    def conv(self, i, x, n, slope=None):
        return self.S.conv(i, self.rows, x if slope is None else lrelu(x, slope), n)

    def push(self, q, y, m):
        return self.S.push(q, self.rows, y, m)

    def keep(self, q, r, rn, used):
        self.S.keep(q, self.rows, r, rn, used)

    @staticmethod
    def add(r, h):
        return r[:, :, : h.shape[2]] + h

    @staticmethod
    def least(ns):
        return np.min(ns, axis=0)

    def mean(self, outs, common, x):
        width = self.S.width(int(common.max()) if len(common) else 0)
        return sum(o[:, :, :width] for o in outs) / len(outs)


class _Counts:
    """A step's counts alone, on the host, for slots [0, R): each conv's and queue's count before the step (the
    static step's input, in the order it reads them) and after it (kept in the slots, as an eager step would)."""

    def __init__(self, S: Slots, R: int):
        self.S, self.R = S, R
        self.before: list[np.ndarray] = []

    def conv(self, i, x, n, slope=None):
        keep, tn = self.S.ops[i].k - 1, self.S.tail_n[i][: self.R]
        n = n * self.S.ops[i].stuff
        self.before.append(tn.copy())
        out = np.maximum(tn + n - keep, 0)
        self.S.tail_n[i][: self.R] = np.minimum(tn + n, keep)
        return None, out

    def push(self, q, y, m):
        qn = self.S.queue_n[q][: self.R]
        self.before.append(qn.copy())
        return None, qn + m

    def keep(self, q, r, rn, used):
        self.S.queue_n[q][: self.R] = rn - used

    @staticmethod
    def add(r, h):
        return None

    least = staticmethod(_Eager.least)

    @staticmethod
    def mean(outs, common, x):
        return None

    def device_counts(self, n: np.ndarray, device) -> Tensor:
        """The new frames' counts n, then every count before the step: [K, R] on `device`, in one copy."""
        return counts(np.stack([n] + self.before), device)


class _Static:
    """A step's operations on slots [0, R) with every width following the input's and the counts read from
    `counts` [K, R] (a tensor, in `_Counts`'s order): nothing depends on a value, so it can be captured."""

    def __init__(self, S: Slots, R: int, counts: Tensor):
        self.S, self.R, self.counts, self.k = S, R, counts, 1  # counts[0]: the new frames

    def _next(self) -> Tensor:
        self.k += 1
        return self.counts[self.k - 1]

    def conv(self, i, x, n, slope=None):
        op, keep, tn = self.S.ops[i], self.S.ops[i].k - 1, self._next()
        if slope is not None:
            x = lrelu(x, slope)
        if op.stuff > 1:  # each sample followed by stuff-1 zeros
            B, C, T = x.shape
            x = torch.stack([x] + [torch.zeros_like(x)] * (op.stuff - 1), dim=3).reshape(B, C, T * op.stuff)
            n = n * op.stuff
        tail = self.S.tails[i][: self.R]
        cat = torch.cat([tail, x], dim=2)  # row b valid in [keep - tn_b, keep + n_b)
        y = gathered(op.conv(cat), keep - tn, x.shape[2])  # [R, Co, W]: each row's outputs from its first
        tail.copy_(gathered(cat, n, keep))  # the last keep inputs, right-aligned
        return y, (tn + n - keep).clamp_min(0)

    def push(self, q, y, m):
        qn, queue = self._next(), self.S.queues[q][: self.R]
        both = torch.cat([queue, y], dim=2)
        return spliced(both, queue.shape[2], qn, both.shape[2]), qn + m

    def keep(self, q, r, rn, used):
        queue = self.S.queues[q][: self.R]
        queue.copy_(gathered(r, used, queue.shape[2]))

    add = staticmethod(_Eager.add)

    @staticmethod
    def least(ns):
        return torch.stack(ns).amin(0)

    @staticmethod
    def mean(outs, common, x):
        return sum(o[:, :, : x.shape[2]] for o in outs) / len(outs)


class StreamingParams:
    """`SourceFilterVocoder.params` on streams: each block x + mix(GELU(conv(LayerNorm(x)))) keeps its
    conv's last kernel-1 normalised inputs and the inputs x its output still lags behind; LayerNorm,
    GELU, the 1x1 mix and the head work frame by frame. Every frame of every block is computed once,
    and the parameters equal the whole sequence's (the convs' zero padding at both ends included)."""

    def __init__(self, model, shapes: bool | None = None):
        self.model = model
        # in float64, rounded to float32 at the end, as `SourceFilterVocoder.params(exact=True)`
        self.ops = [ConvOp.same(copy.deepcopy(b.conv).double(), matmul=True) for b in model.blocks]
        self.mix = [(b.mix.weight[:, :, 0].double(), b.mix.bias.double()) for b in model.blocks]  # 1x1 convs as matrices
        self.head = (model.head.weight.double(), model.head.bias.double())
        # queue i: block i's inputs its output has not caught up with
        self.slots = Slots(self.ops, [model.dict.weight.shape[1]] * len(self.ops), model.dict.weight.double(), shapes)

    def new_stream(self) -> Stream:
        return Stream(self.slots)

    @torch.no_grad()
    def step(self, streams: list[Stream], frames: list[Tensor], ended: list[bool]) -> list[Tensor]:
        """New unit ids per frame for each stream (and whether its frames end here) -> each stream's
        parameter frames that are now final [k * sub, n_params]."""
        m, S = self.model, self.slots
        rows = Rows(streams, frames, ended, S, m.dict.weight.device)
        x, n = m.dict(rows.ids).transpose(1, 2).double(), rows.n
        for i, block in enumerate(m.blocks):
            h = layer_norm(block.norm, x.transpose(1, 2)).transpose(1, 2)
            y, out_n = S.conv(i, rows, h, n)
            r, rn = S.push(i, rows, x, n)
            mixed = F.linear(F.gelu(y).transpose(1, 2), *self.mix[i]).transpose(1, 2) if y.shape[2] else y
            x = r[:, :, : y.shape[2]] + mixed
            S.keep(i, rows, r, rn, out_n)
            n = out_n
        p = F.linear(layer_norm(m.norm, x.transpose(1, 2)), *self.head).to(m.head.weight.dtype)  # [B, T, sub * n_params]
        cfg = m.cfg
        return [p[b, :k].reshape(k * cfg.sub, cfg.n_params) for b, k in rows.finish(n)]
