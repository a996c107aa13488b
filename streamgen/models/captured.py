"""A model call captured as CUDA graphs, one per input shapes (as gpt-fast captures its decode step).

On a GPU a batched call of a few hundred small kernels costs the host more than the device: each launch takes
microseconds of Python and driver time, and cuDNN plans each new shape (bench/RESULTS.md, 2026-11-29: ticks
bound by the host). A call whose shapes recur (the engine rounds its batches and lengths to the grid of
`shapes`) is run eagerly the first times a shape is met, then captured once and replayed: one launch, the
inputs copied into the graph's own tensors first.

What may be captured: a function of its tensor arguments whose work depends on their shapes and not on their
values (no value read back to the host, no shape that depends on values: `tests/test_captured.py` checks the
engine's calls for both on a CPU), which writes nothing but its result, or, in place, the tensors `state`
names (the streaming vocoder's slots: put back after the warm-up run that precedes a capture). A
replayed call returns the graph's own output tensors, rewritten by its next replay: read them (to the host,
or into a tensor of your own) before the next call. Elsewhere than on CUDA the function simply runs.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable

import torch
from torch import Tensor

log = logging.getLogger("streamgen")
_side: dict[int, torch.cuda.Stream] = {}  # by device index


@contextmanager
def off_the_main_stream():
    """Work queued inside runs on one side stream per device, after what is queued before it and before what is
    queued after it. Warm-ups and captures run there: the libraries' per-stream workspaces (cuBLAS, cuDNN) then
    exist before a capture would have to allocate them."""
    device = torch.cuda.current_device()
    if device not in _side:
        _side[device] = torch.cuda.Stream()
    side, main = _side[device], torch.cuda.current_stream()
    side.wait_stream(main)
    try:
        with torch.cuda.stream(side):
            yield
    finally:
        main.wait_stream(side)


def capture(fn: Callable[[], object], pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """fn() recorded as a CUDA graph (nothing runs; a replay runs it) into `pool`, and its output. Unlike
    `torch.cuda.graph` it neither waits for the device nor empties the allocator's caches (each capture would
    stall a live tick and make the next ticks allocate anew). RuntimeError where fn cannot be captured (the
    stream is left as it was); an error that is the device's own raises as itself."""
    graph = torch.cuda.CUDAGraph()
    try:
        with off_the_main_stream():
            graph.capture_begin(pool=pool)
            try:
                out = fn()
            finally:
                graph.capture_end()
    except RuntimeError:
        torch.cuda.synchronize()  # a sticky error (a failed kernel, the device lost) raises here, not as "not captured"
        raise
    return graph, out


class CapturedCall:
    """`fn(*tensors)`, on CUDA replayed from a graph captured for its arguments' shapes and dtypes once they
    have been met `after` times (a shape met once, as in a burst of sessions joining, is not worth a capture),
    for at most `limit` shapes (one pool holds the largest shape's intermediates; `clear` gives it back)."""

    def __init__(self, fn: Callable[..., Tensor | tuple[Tensor, ...]], name: str, after: int = 2,
                 state: Callable[..., list[Tensor]] | None = None, limit: int = 64):
        self.fn, self.name, self.after, self.limit = fn, name, after, limit
        self.state = state  # state(*args): the tensors fn(*args) writes in place, if any (put back after the capture's warm-up)
        self.replays = 0
        self.clear()

    def clear(self) -> None:
        """Drop every graph and the memory they hold (the next calls run eagerly, then capture anew)."""
        self.seen: dict[tuple, int] = {}
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph | None, list[Tensor], object]] = {}
        self.pool = None  # one memory pool for all of this call's graphs: they are replayed one at a time

    def __call__(self, *args: Tensor):
        if args[0].device.type != "cuda":
            return self.fn(*args)
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        entry = self.graphs.get(key)
        if entry is None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] <= self.after or len(self.graphs) >= self.limit:
                return self.fn(*args)
            entry = self.graphs[key] = self._capture(args)
            self.seen.pop(key)
        graph, inputs, out = entry
        if graph is None:  # capture failed for this shape: eager, said once
            return self.fn(*args)
        for static, a in zip(inputs, args):
            static.copy_(a)
        graph.replay()
        self.replays += 1
        return out

    def _capture(self, args: tuple[Tensor, ...]):
        inputs = [a.clone() for a in args]
        state = self.state(*inputs) if self.state is not None else []
        saved = [t.clone() for t in state]
        with off_the_main_stream():  # warm up where the capture runs
            try:
                self.fn(*inputs)
            finally:  # (a capture runs nothing: the first replay makes this call's writes)
                for t, before in zip(state, saved):
                    t.copy_(before)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            graph, out = capture(lambda: self.fn(*inputs), self.pool)
        except RuntimeError as e:
            log.warning("%s not captured as a CUDA graph for shapes %s, running it eagerly: %s", self.name,
                        [tuple(a.shape) for a in args], e)
            return None, inputs, None
        return graph, inputs, out
