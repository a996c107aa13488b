"""Unit generation: the one decode loop, batched across requests (continuous batching).

A `Request` is one decode: encoder tokens, the decoder tokens to prefill (</s>, forced tokens,
units already committed), how many new units at most / at least, and its sampling settings.
`Decoder` holds a pool of slots (a `DecoderState` whose rows are slots). Each `step()`:

1. advances every running request by one token with one batched decoder step (nobody's cache
   moves; on a CPU each row attends over its own keys only, elsewhere rows with nothing to do are
   masked out);
2. admits waiting requests: one padded encoder call and one ragged prefill for all of them, each
   copied into a free slot, and chooses their first token.

Sampling settings live in per-slot tensors; the randomness of a sampled token is a hash of
(request seed, token index, vocabulary entry), so a request draws the same tokens whatever else
shares its batch (batched = alone, greedy or sampled).

Streams (a Unit mBART trained to stream, `UnitMBartConfig.wait_k`): a finished decode's slot is
kept (parked) under its key with everything in it: the encoder cache, the source's cross-attention
K/V, the decoder cache. The key's next request, when its source extends the parked one and its
prefix is the parked decode's tokens, resumes there: only the new source tokens are encoded
(`UnitMBart.extend_source`, batched over the tick's resumed streams) and the decoder goes on from its
last token, with no prefill. The model's schedule makes that exact (a unit never sees source beyond
the schedule's, so nothing decoded depends on what came later): a stream decoded decision by
decision gives the units one decode of the whole source gives. A partial source (`complete=False`,
no </s>) is decoded only as far as the schedule has read; a decode that ends at </s> ends its
stream (later requests under the key get no units until its source starts anew).

Static steps (`graphs=True`, the GPU path): the running rows are stepped as one block of the pool,
rows [0, b) with b the next power of two (unused rows masked out), so a step has one of a few
shapes; on CUDA each (b, cache size, prompt) is captured once as a CUDA graph and replayed (as in
gpt-fast), the greedy rows' next tokens chosen and recorded inside it (the host reads the tokens once a
step; only sampled rows are chosen outside). Batches that mix prompts take the eager step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .captured import capture, off_the_main_stream
from .shapes import on_grid, padded_rows, to_device
from .unit_mbart import EOS, PAD, UNIT_OFFSET, DecoderState, PromptKV, UnitMBart, units_to_source

log = logging.getLogger("streamgen")


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


_M32 = 0xFFFFFFFF


def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors, overflow-free."""
    x = x & _M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x446C9A8B) & _M32
    return x ^ (x >> 16)


def uniform(seed: Tensor, step: Tensor, vocab: int) -> Tensor:
    """[B, V] uniforms in (0, 1), a pure function of (seed[b], step[b], v)."""
    v = torch.arange(vocab, device=seed.device)[None]
    x = _mix(_mix(_mix(seed[:, None]) ^ step[:, None]) ^ v)
    return ((x >> 8).double() + 0.5) / float(1 << 24)


def choose(logits: Tensor, allowed: Tensor, greedy: Tensor, temperature: Tensor, top_k: Tensor,
           seed: Tensor, step: Tensor) -> Tensor:
    """Next token per row from logits [B, V]; every setting is per row ([B] tensors): greedy or
    sampled at a temperature among the top_k (0: all) allowed tokens, by Gumbel-max with the
    counter-based noise of `uniform`."""
    logits = logits.float().masked_fill(~allowed, float("-inf"))
    best = logits.argmax(-1)
    if bool(greedy.all()):
        return best
    scaled = logits / temperature[:, None]
    ranked = scaled.sort(-1, descending=True).values
    kth = ranked.gather(1, (top_k - 1).clamp(0, logits.shape[-1] - 1)[:, None])
    scaled = scaled.masked_fill((top_k[:, None] > 0) & (scaled < kth), float("-inf"))
    gumbel = -torch.log(-torch.log(uniform(seed, step, logits.shape[-1]))).float()
    return torch.where(greedy, best, (scaled + gumbel).argmax(-1))


def greedy_choice(logits: Tensor, disallowed: Tensor, may_end: Tensor) -> Tensor:
    """`choose`'s greedy tokens, without gathering settings: the best allowed token of each row of logits
    [B, V] (disallowed: [V]), </s> only where may_end [B]."""
    best = logits.float().masked_fill(disallowed, float("-inf"))
    best[:, EOS].masked_fill_(~may_end, float("-inf"))
    return best.argmax(-1)


def token_rows(seqs: list[Tensor], device, pad_rows: bool = True) -> tuple[Tensor, Tensor]:
    """Token sequences right-padded with <pad> into one [B, T] tensor on `device`, and their lengths [B]: built
    on the host and copied without waiting for the device. On a GPU, T and (with `pad_rows`) B are rounded up to
    the grid (`shapes.on_grid`), so that admissions, whose batch and lengths change step by step, repeat a few
    shapes; an extra row holds </s> alone (a source or prefix of one real token) and its results are dropped."""
    rows = on_grid(len(seqs), device) if pad_rows else len(seqs)
    seqs = [s.cpu() for s in seqs] + [torch.tensor([EOS])] * (rows - len(seqs))
    return padded_rows(seqs, on_grid(max(len(s) for s in seqs), device), PAD, device)


@dataclass
class Request:
    source: Tensor  # encoder tokens [S] (units + 4, </s>; or with a <mask>)
    prefix: Tensor  # decoder tokens to prefill [P >= 1]: </s>, forced tokens, committed units + 4
    max_new: int
    min_new: int = 0
    sampling: Sampling = field(default_factory=Sampling)
    prompt: PromptKV | None = None
    seed: int = 0
    complete: bool = True  # the source is all there is (ends with </s>); False: it will grow (a stream)


@dataclass
class _Running:
    key: object
    request: Request
    slot: int
    budget: int  # the most tokens it may produce (`Decoder._budget`, once per request)
    produced: int = 0
    chosen: list[int] = field(default_factory=list)  # a stream's tokens (all but the last are fed to its cache)


@dataclass
class _Parked:
    """A stream's slot between its decodes: the source tokens encoded into it, the decoder tokens in
    its cache, and the token chosen last (not yet fed; </s>: the stream has ended)."""

    slot: int
    source: Tensor
    fed: Tensor
    last: int


class Decoder:
    """Continuous batching of decode requests over a pool of K/V slots (see the module doc)."""

    def __init__(self, model: UnitMBart, slots: int = 8, max_batch: int = 0, graphs: bool = False):
        self.model = model
        self.max_batch = max_batch  # 0: every request in one call; n: calls of at most n rows (1: one at a time)
        self.graphs = graphs and not max_batch  # static bucketed steps, CUDA graphs on CUDA
        self.captured: dict[tuple, _Captured] = {}
        self.device = model.embed_tokens.weight.device
        # eager steps: on a CPU each row attends over its own keys (`step_rows`), elsewhere one masked step of a
        # block of rows (see `_advance_rows`; tests set it to run a GPU's path on a CPU)
        self.masked_steps = self.device.type != "cpu"
        self.allowed = allowed_tokens_mask(model, self.device)
        self.disallowed = ~self.allowed
        self.waiting: list[tuple[object, Request]] = []
        self.running: dict[int, _Running] = {}  # by slot
        self.prompt_rows: dict[int, int] = {}  # running rows by id of the prompt their slot holds (static steps need one)
        self.longest = 0  # at least the longest cache of a running row (exact when the pool may have to grow)
        self.parked: dict[object, _Parked] = {}  # streams between decodes, by key
        self.resuming: list[tuple[object, Request, _Parked]] = []
        self.streams = model.cfg.streams
        self.admit_s = 0.0  # seconds spent bringing decodes in (source encoding, prefill), of all `step` time
        self.steps = 0  # batched decoder steps that advanced running decodes
        self.rows_stepped = 0  # the rows they advanced (rows_stepped / steps: how well decodes share steps)
        self.initial_slots = slots
        self._no_pool()

    def _no_pool(self) -> None:
        """No K/V pool yet (the first admission makes it) and the per-slot settings of `initial_slots` slots."""
        self.pool: DecoderState | None = None
        self.free: list[int] = []
        self.captured.clear()
        self.sampled: set[int] = set()  # slots whose request samples (the rest decode greedily)
        n = self.initial_slots
        self.tokens = torch.full((n,), EOS, dtype=torch.long, device=self.device)  # last token per slot
        self.greedy = torch.ones(n, dtype=torch.bool, device=self.device)
        self.temperature = torch.ones(n, device=self.device)
        self.top_k = torch.zeros(n, dtype=torch.long, device=self.device)
        self.seed = torch.zeros(n, dtype=torch.long, device=self.device)
        self.produced = torch.zeros(n, dtype=torch.long, device=self.device)
        self.min_new = torch.zeros(n, dtype=torch.long, device=self.device)
        self.active = torch.zeros(n, dtype=torch.bool, device=self.device)  # rows a static step advances

    def release_pool(self) -> bool:
        """With no decode waiting, running or parked, give the K/V pool back (it keeps the size of the largest
        load it served: after a burst of sessions, hundreds of megabytes on a CPU); the next admission makes a
        new one. Whether it did."""
        if self.pool is None or self.busy or self.parked:
            return False
        self._no_pool()
        return True

    @property
    def max_positions(self) -> int:
        return self.model.cfg.max_positions

    def submit(self, key, request: Request) -> None:
        """Queue a decode; its units come out of `step()` under `key`. Requests that cannot fit the
        model's positions are refused here, before any work."""
        if len(request.source) > self.max_positions:
            raise ValueError(f"source of {len(request.source) - 1} units exceeds the model's {self.max_positions - 1}-unit context")
        if len(request.prefix) < 1:
            raise ValueError("a decode request needs at least the start token in its prefix")
        parked = self.parked.pop(key, None)
        if parked is not None:
            if self._continues(parked, request):
                self.resuming.append((key, request, parked))
                return
            self._release(parked.slot)  # a new source (the next segment): start afresh
        self.waiting.append((key, request))

    def cancel(self, key) -> None:
        """Forget a key's waiting, running or parked request (its session ended or failed)."""
        self.waiting = [(k, r) for k, r in self.waiting if k != key]
        for _, _, parked in [x for x in self.resuming if x[0] == key]:
            self._release(parked.slot)
        self.resuming = [x for x in self.resuming if x[0] != key]
        if key in self.parked:
            self._release(self.parked.pop(key).slot)
        for slot in [s for s, run in self.running.items() if run.key == key]:
            self._finish(slot)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.resuming)

    @property
    def left(self) -> int:
        """The most tokens a decode in flight may still produce (its budget; a waiting one's max_new)."""
        return max([run.budget - run.produced for run in self.running.values()]
                   + [r.max_new for _, r in self.waiting] + [r.max_new for _, r, _ in self.resuming], default=0)

    @property
    def live(self) -> int:
        return len(self.running) + len(self.waiting) + len(self.resuming)

    @torch.no_grad()
    def step(self) -> list[tuple[object, list[int], bool]]:
        """One token for every running request, then admit the waiting ones (their first token).
        Returns (key, new units, done) per request that moved."""
        out: list[tuple[object, list[int], bool]] = []
        if self.resuming:
            t = time.perf_counter()
            out += self._resume()
            self.admit_s += time.perf_counter() - t
        if self.running:
            self.rows_stepped += len(self.running)
            out += self._advance()
        if self.waiting:
            t = time.perf_counter()
            out += self._admit()
            self.admit_s += time.perf_counter() - t
        return out

    # --- internals --------------------------------------------------------------------------

    def _budget(self, r: Request) -> int:
        n = min(r.max_new, self.max_positions - len(r.prefix))
        if self.streams and not r.complete:  # only as far as the schedule has read
            n = min(n, self.model.cfg.decodable(len(r.source)) - (len(r.prefix) - 1))
        return max(0, n)

    @staticmethod
    def _continues(parked: _Parked, r: Request) -> bool:
        """Whether a request goes on from a parked stream: its source extends the one encoded (a
        complete one may add </s>) and its prefix is the decoded tokens (and the one chosen last)."""
        n = len(parked.source)
        if len(r.source) < n or not torch.equal(r.source[:n], parked.source):
            return False
        head = parked.fed if parked.last == EOS else torch.cat([parked.fed, torch.tensor([parked.last])])
        return torch.equal(r.prefix, head)

    def _resume(self) -> list[tuple[object, list[int], bool]]:
        """Resumed streams: their new source tokens encoded in one batched call, then they run. If that
        fails, the streams are parked again (where `cancel` frees their slots) before the error goes on."""
        batch, self.resuming = self.resuming, []
        try:
            return self._resume_batch(batch)
        except BaseException:
            running = {run.key for run in self.running.values()}
            for key, _, p in batch:
                if key not in running:
                    self.parked[key] = p
            raise

    def _resume_batch(self, batch: list) -> list[tuple[object, list[int], bool]]:
        out: list[tuple[object, list[int], bool]] = []
        # a stream that ended at </s> decodes nothing more: its new source is not worth encoding
        grown = [(r, p) for _, r, p in batch if len(r.source) > len(p.source) and p.last != EOS]
        if grown:
            rows = to_device(torch.tensor([p.slot for _, p in grown]), self.device)
            new, counts = token_rows([r.source[len(p.source):] for r, p in grown], self.device, pad_rows=False)
            self.model.extend_source(self.pool, rows, new, counts)
        run = []
        for key, r, p in batch:
            p.source = r.source
            budget = self._budget(r)
            if p.last == EOS or budget == 0:  # ended at </s>, or the schedule has not read enough yet
                self.parked[key] = p
                out.append((key, [], True))
            else:  # its prefix ends with the token chosen last, which the next step feeds
                self._start(_Running(key, r, p.slot, budget))
                run.append((r, p))
        if run:
            slots = [p.slot for _, p in run]
            self.tokens[to_device(torch.tensor(slots), self.device)] = to_device(torch.tensor([p.last for _, p in run]), self.device)
            self._configure(slots, [r for r, _ in run])
        return out

    def _configure(self, slots: list[int], requests: list[Request]) -> None:
        """The per-slot sampling settings of requests starting in these slots."""
        idx = to_device(torch.tensor(slots), self.device)
        settings = to_device(torch.tensor([[r.sampling.greedy, r.sampling.top_k, r.seed & _M32, r.min_new] for r in requests]), self.device)
        self.greedy[idx], self.top_k[idx], self.seed[idx], self.min_new[idx] = settings[:, 0].bool(), settings[:, 1], settings[:, 2], settings[:, 3]
        self.temperature[idx] = to_device(torch.tensor([float(r.sampling.temperature) for r in requests]), self.device)
        self.produced[idx] = 0
        for slot, r in zip(slots, requests):
            (self.sampled.discard if r.sampling.greedy else self.sampled.add)(slot)

    def _slots(self, n: int) -> list[int]:
        """n free slots, lowest first (the pool grows by doubling when full)."""
        while len(self.free) < n:
            size = 0 if self.pool is None else self.pool.batch_size
            more = max(n - len(self.free), size, self.initial_slots)
            if self.pool is not None:
                self.pool.add_slots(more)
            self.free += range(size, size + more)
            for name in ("tokens", "greedy", "temperature", "top_k", "seed", "produced", "min_new", "active"):
                t = getattr(self, name)
                if t.shape[0] < size + more:
                    setattr(self, name, torch.cat([t, t.new_zeros(size + more - t.shape[0])]))
        self.free.sort()
        got, self.free = self.free[:n], self.free[n:]
        return got

    def _choose(self, logits: Tensor, slots: list[int], idx: Tensor) -> Tensor:
        """The next token of each of `slots` (idx: the same as a tensor) from its logits [len(slots), V]."""
        may_end = self.produced[idx] >= self.min_new[idx]
        if self.sampled.isdisjoint(slots):  # all greedy, as `choose` decides them, without gathering settings
            return greedy_choice(logits, self.disallowed, may_end)
        allowed = self.allowed[None].repeat(len(slots), 1)
        allowed[:, EOS] &= may_end
        return choose(logits, allowed, self.greedy[idx], self.temperature[idx], self.top_k[idx],
                      self.seed[idx], self.produced[idx])

    def _advance(self) -> list[tuple[object, list[int], bool]]:
        running = sorted(self.running)
        if self.longest + 1 > self.pool.capacity:  # (the step writes each row's token at its length)
            self.longest = max(len(run.request.prefix) + run.produced for run in self.running.values())
            self.pool.grow(self.longest + 1)
        if self.graphs and len(self.prompt_rows) == 1:
            return self._advance_static(running)
        n = self.max_batch or len(running)
        out = []
        for i in range(0, len(running), n):
            group = running[i : i + n]
            out += self._advance_rows(group)
        return out

    def _advance_rows(self, slots: list[int]) -> list[tuple[object, list[int], bool]]:
        """One step of the pool's `slots`. On a CPU `UnitMBart.step_rows`: the rows' projections
        together, each row's attention over its own keys (nothing of the other slots read: a step there
        is bound by reading memory). Elsewhere one masked step of the rows [lo, hi) that hold them
        (views, no copy; one kernel per operation whatever the rows), the views ending at the rows'
        longest cache (+ the token this step writes) and source, rounded up to the grid on a GPU (a new shape
        each step would be planned anew each step)."""
        self.steps += 1
        idx = to_device(torch.tensor(slots), self.device)
        if not self.masked_steps:
            return self._emit(slots, idx, self._choose(self.model.step_rows(self.pool, slots, self.tokens[idx]), slots, idx))
        pool, lo, hi = self.pool, slots[0], slots[-1] + 1
        C = min(pool.capacity, on_grid(int(pool.lengths[lo:hi].max()) + 1, self.device))
        S = min(pool.source_capacity, on_grid(int(pool.src_mask[lo:hi].any(0).nonzero()[-1]) + 1, self.device))
        view = DecoderState([t[lo:hi, :, :C] for t in pool.k], [t[lo:hi, :, :C] for t in pool.v], pool.lengths[lo:hi],
                            [(k[lo:hi, :, :S], v[lo:hi, :, :S]) for k, v in pool.cross], pool.src_mask[lo:hi, :S], pool.prompts[lo:hi])
        active = torch.zeros(hi - lo, dtype=torch.bool, device=self.device)
        active[idx - lo] = True
        logits = self.model.step(view, self.tokens[lo:hi], active=active, grow=False)
        pool.lengths[lo:hi] = view.lengths
        return self._emit(slots, idx, self._choose(logits[idx - lo], slots, idx))

    def _advance_static(self, slots: list[int]) -> list[tuple[object, list[int], bool]]:
        """One step of the pool's first b rows (b a power of two), captured once per shape."""
        self.steps += 1
        pool = self.pool
        rows = min(pool.batch_size, 1 << (slots[-1]).bit_length())
        prompt = pool.prompts[slots[0]]
        where = (pool.capacity, pool.source_capacity,
                 *(t.data_ptr() for t in (pool.k[0], pool.cross[0][0], pool.lengths, pool.src_mask, *self._settings())))
        if any(key[2:] != where for key in self.captured):  # the pool was reallocated (it grew)
            self.captured.clear()
        key = (rows, id(prompt), *where)
        if key not in self.captured:
            self.captured[key] = _Captured(self, rows, prompt)
        idx = to_device(torch.tensor(slots), self.device)
        self.active.zero_()
        self.active[idx] = True
        logits = self.captured[key].replay()  # greedy rows' tokens chosen and recorded in it
        sampled = sorted(self.sampled.intersection(slots))
        if sampled:  # their tokens from the logits
            sidx = to_device(torch.tensor(sampled), self.device)
            self._record(sidx, self._choose(logits[sidx], sampled, sidx))
        tokens = self.tokens[:rows].tolist()  # the step's one read of results
        return self._results(slots, [tokens[s] for s in slots])

    def _settings(self) -> tuple[Tensor, ...]:
        """The per-slot tensors a static step reads and writes."""
        return self.tokens, self.active, self.greedy, self.produced, self.min_new

    def _admit(self) -> list[tuple[object, list[int], bool]]:
        """The first waiting requests (up to max_batch): encoded and prefilled in one batched call each,
        then they run. If that fails, those not yet running wait again (where `cancel` finds them)
        before the error goes on."""
        n = self.max_batch or len(self.waiting)
        batch, self.waiting = self.waiting[:n], self.waiting[n:]
        try:
            return self._admit_batch(batch)
        except BaseException:
            running = {run.key for run in self.running.values()}
            self.waiting = [(k, r) for k, r in batch if k not in running] + self.waiting
            raise

    def _admit_batch(self, batch: list) -> list[tuple[object, list[int], bool]]:
        out: list[tuple[object, list[int], bool]] = []
        todo = []
        for key, r in batch:
            budget = self._budget(r)
            if budget == 0:
                out.append((key, [], True))
            else:
                todo.append((key, r, budget))
        if not todo:
            return out
        n = len(todo)
        src, _ = token_rows([r.source for _, r, _ in todo], self.device)
        prefix, counts = token_rows([r.prefix for _, r, _ in todo], self.device)
        prompts = [r.prompt for _, r, _ in todo]
        prompts += prompts[:1] * (src.shape[0] - n)  # extra rows (a GPU's shapes) join the first row's prompt group
        fresh = self.model.start(src, prompts, capacity=prefix.shape[1] + 1)
        logits = self.model.step(fresh, prefix, counts=counts)
        logits = logits[torch.arange(n, device=self.device), counts[:n] - 1]
        slots = self._slots(len(todo))
        try:
            if self.pool is None:
                self.pool = fresh.select(torch.zeros(0, dtype=torch.long))
                self.pool.add_slots(len(self.tokens))
                self.pool.grow(fresh.capacity)
                self.pool.grow_source(fresh.source_capacity)
            self.pool.insert(slots, fresh)
        except BaseException:
            self.free += slots  # nothing of them runs yet
            raise
        for (key, r, budget), s in zip(todo, slots):
            self._start(_Running(key, r, s, budget))
        self._configure(slots, [r for _, r, _ in todo])
        idx = to_device(torch.tensor(slots), self.device)
        return out + self._emit(slots, idx, self._choose(logits, slots, idx))

    def _emit(self, slots: list[int], idx: Tensor, nxt: Tensor) -> list[tuple[object, list[int], bool]]:
        """Record the tokens chosen for `slots` (idx: the same as a tensor) and return what moved."""
        self._record(idx, nxt)
        return self._results(slots, nxt.tolist())  # the step's one read of results

    def _record(self, idx: Tensor, nxt: Tensor) -> None:
        """The slots' next tokens (fed by the next step) and their count of tokens produced."""
        self.tokens[idx] = nxt
        self.produced[idx] += 1

    def _results(self, slots: list[int], chosen: list[int]) -> list[tuple[object, list[int], bool]]:
        """(key, new units, done) of each of `slots` given its token chosen (already recorded on the device)."""
        out, running, streams = [], self.running, self.streams
        self.longest += 1  # (every row given a token has one more in its cache for the next step)
        for s, tok in zip(slots, chosen):
            run = running[s]
            run.produced += 1
            if streams:
                run.chosen.append(tok)
            if tok != EOS and run.produced < run.budget:
                out.append((run.key, [tok - UNIT_OFFSET], False))
                continue
            out.append((run.key, [] if tok == EOS else [tok - UNIT_OFFSET], True))
            if streams:
                self._park(s)
            else:
                self._finish(s)
        return out

    def _park(self, slot: int) -> None:
        """A stream's decode is done: keep its slot for the key's next request."""
        run = self._stop(slot)
        fed = torch.cat([run.request.prefix, torch.tensor(run.chosen[:-1], dtype=torch.long)])
        self.parked[run.key] = _Parked(slot, run.request.source, fed, run.chosen[-1])

    def _finish(self, slot: int) -> None:
        self._stop(slot)
        self._release(slot)

    def _start(self, run: _Running) -> None:
        self.running[run.slot] = run
        self.longest = max(self.longest, len(run.request.prefix) + run.produced)
        p = id(self.pool.prompts[run.slot])
        self.prompt_rows[p] = self.prompt_rows.get(p, 0) + 1

    def _stop(self, slot: int) -> _Running:
        run = self.running.pop(slot)
        p = id(self.pool.prompts[slot])
        if self.prompt_rows[p] == 1:
            del self.prompt_rows[p]
        else:
            self.prompt_rows[p] -= 1
        return run

    def _release(self, slot: int) -> None:
        self.pool.release([slot])
        self.free.append(slot)


class _Captured:
    """A static decoder step over pool rows [0, rows): fixed views of the pool's tensors, every
    row attending to `prompt` (unused rows are masked out by `active`). The greedy rows' next tokens are
    chosen in it too and recorded in the decoder's per-slot `tokens` and `produced` (a sampled row's are
    left to the host: `Decoder._advance_static`). On CUDA it is captured as a CUDA graph once and replayed;
    elsewhere the same function runs eagerly."""

    def __init__(self, decoder: Decoder, rows: int, prompt: PromptKV | None):
        self.prompt = prompt  # held, so the prefix tensors the graph reads stay alive
        model, pool = decoder.model, decoder.pool
        tokens, active, greedy, produced, min_new = (t[:rows] for t in decoder._settings())
        disallowed, lengths = decoder.disallowed, pool.lengths[:rows]
        view = DecoderState([t[:rows] for t in pool.k], [t[:rows] for t in pool.v], lengths,
                            [(k[:rows], v[:rows]) for k, v in pool.cross], pool.src_mask[:rows], [prompt] * rows)

        def run() -> Tensor:
            view.lengths = lengths
            logits = model.step(view, tokens, active=active, grow=False)
            lengths.copy_(view.lengths)
            chosen = active & greedy
            tokens.copy_(torch.where(chosen, greedy_choice(logits, disallowed, produced >= min_new), tokens))
            produced.add_(chosen)
            return logits

        self.run, self.graph, self.logits = run, None, None
        if lengths.device.type != "cuda":
            return
        # warm up on a side stream (allocator, kernels, the prompt grouping), then capture. A step
        # writes the K/V of the tokens already in `tokens` at each row's length, advances it and
        # chooses the next tokens; the lengths, tokens and counts are put back, so the first replay
        # repeats exactly that step.
        state = (lengths, tokens, produced)
        saved = [t.clone() for t in state]

        def put_back() -> None:
            for t, was in zip(state, saved):
                t.copy_(was)

        with off_the_main_stream():
            try:
                for _ in range(2):
                    run()
                    put_back()
            finally:
                put_back()
        try:
            self.graph, self.logits = capture(run)
        except RuntimeError as e:  # the eager static step still serves; say why once per shape
            log.warning("decoder step not captured as a CUDA graph (%d rows), running it eagerly: %s", rows, e)
        put_back()

    def replay(self) -> Tensor:
        if self.graph is None:
            return self.run()
        self.graph.replay()
        return self.logits


def decoder_prefix(prefix_tokens: tuple[int, ...] = (), committed: Tensor | None = None) -> Tensor:
    """The decoder tokens a request prefills: </s>, forced tokens, then committed units."""
    head = torch.tensor((EOS, *prefix_tokens), dtype=torch.long)
    return head if committed is None else torch.cat([head, committed.cpu().long() + UNIT_OFFSET])


@torch.no_grad()
def generate(
    model: UnitMBart,
    sources: list[Tensor],
    prompt: PromptKV | None = None,
    max_units: int = 200,
    min_units: int = 0,
    sampling: Sampling = Sampling(),
    prefix_tokens: tuple[int, ...] = (),
    seed: int = 0,
) -> list[Tensor]:
    """Generate units for a batch of unit sequences (each [N_i], values 0..K-1), through `Decoder`.

    The decoder starts from </s>, then `prefix_tokens` (e.g. a target-language token) are forced;
    each row stops at </s> (never before `min_units` units) or after `max_units` units.
    Returns one LongTensor of units per source (0..K-1, </s> excluded)."""
    dec = Decoder(model, slots=len(sources))
    out: list[list[int]] = [[] for _ in sources]
    for i, u in enumerate(sources):
        dec.submit(i, Request(units_to_source(u.cpu()), decoder_prefix(prefix_tokens), max_units, min_units, sampling, prompt, seed + i))
    while dec.busy:
        for i, units, _ in dec.step():
            out[i] += units
    return [torch.tensor(u, dtype=torch.long) for u in out]


__all__ = ["Decoder", "Request", "Sampling", "allowed_tokens_mask", "choose", "decoder_prefix", "generate", "PAD"]
