"""CodeHiFiGAN: chunked synthesis equals whole-utterance synthesis, with bounded work and memory."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from streamgen.testing import TINY_VOCODER
from streamgen.models.vocoder import CodeHiFiGAN
from streamgen.pipeline.streams import VocoderStream


@pytest.fixture
def vocoder():
    torch.manual_seed(0)
    return CodeHiFiGAN(TINY_VOCODER).eval()


def units(n, seed=0):
    return torch.randint(0, TINY_VOCODER.num_embeddings, (n,), generator=torch.Generator().manual_seed(seed))


def stream(vocoder, u, chunk, **kw):
    s = VocoderStream(vocoder, **kw)
    out = [s.push(u[i : i + chunk]) for i in range(0, len(u), chunk)]
    return torch.cat(out + [s.flush()]), s


@pytest.mark.parametrize("chunk", [1, 3, 16, 200])
def test_chunked_equals_whole(vocoder, chunk):
    u = units(120)
    with torch.no_grad():
        whole = vocoder(u)
    chunked, _ = stream(vocoder, u, chunk)
    assert whole.shape == chunked.shape == (int(vocoder.durations(u).sum()) * vocoder.hop,)
    assert (whole - chunked).abs().max() <= 1e-5


def test_too_little_lookahead_is_not_exact(vocoder):
    u = units(60)
    with torch.no_grad():
        whole = vocoder(u)
    approx, _ = stream(vocoder, u, 4, lookahead=1)
    assert approx.shape == whole.shape and (whole - approx).abs().max() > 1e-4


def test_frame_context_bounds_the_receptive_field(vocoder):
    frames = units(100)
    ctx = vocoder.frame_context()
    changed = frames.clone()
    changed[50] = (changed[50] + 1) % TINY_VOCODER.num_embeddings
    with torch.no_grad():
        d = (vocoder.generate(frames) - vocoder.generate(changed)).abs().view(-1, vocoder.hop).amax(-1)
    moved = torch.nonzero(d > 0)[:, 0]
    assert moved.min() >= 50 - ctx and moved.max() <= 50 + ctx
    assert moved.max() - moved.min() >= 4  # the probe did reach some neighbours


def test_work_and_memory_stay_bounded(vocoder):
    seen = []
    original = vocoder.generate
    vocoder.generate = lambda f: (seen.append(len(f)), original(f))[1]
    u = units(600, seed=2)
    out, s = stream(vocoder, u, 10, lookahead=vocoder.frame_context())  # the windowed path
    total = int(vocoder.durations(u).sum())
    ctx = vocoder.frame_context()
    # each window is its new frames plus at most ctx on each side: linear in the input, not quadratic
    assert sum(seen) <= total + len(seen) * 2 * ctx
    assert max(seen) <= 10 * 2 * 60 + 2 * ctx  # no window grows with the utterance (durations <= ~60 frames)
    assert len(s.units) <= 2 * s.unit_radius + 10 and len(s.frames) <= ctx + s.lookahead + 1
    assert out.numel() == total * vocoder.hop


def test_streaming_convolutions_read_each_frame_once_and_hold_bounded_state(vocoder):
    from streamgen.models.streaming_conv import StreamingGenerator

    graph = StreamingGenerator(vocoder)
    fed = []
    step = graph.step
    graph.step = lambda streams, frames, ended: (fed.append(sum(len(f) for f in frames)), step(streams, frames, ended))[1]
    u = units(600, seed=2)
    out, s = stream(vocoder, u, 10, graph=graph)
    total = int(vocoder.durations(u).sum())
    assert sum(fed) == total and len(out) == total * vocoder.hop  # every frame through the generator once
    reach = max(op.k for op in graph.ops)
    slots = graph.slots
    assert all(t.shape[2] < reach for t in slots.tails)  # each layer keeps less than its kernel's reach
    assert all(q.shape[2] <= 4 * reach for q in slots.queues)
    assert s.gen.ended and len(slots.free) == slots.size  # the ended stream's slot is free again
    with torch.no_grad():
        assert (out - vocoder(u)).abs().max() <= 1e-5


def test_streams_of_any_lengths_batched_together_equal_each_whole(vocoder):
    """Ragged batches: several streams, random piece sizes, joining and ending at different steps."""
    import random

    from streamgen.models.streaming_conv import StreamingGenerator

    graph = StreamingGenerator(vocoder)
    frames = [units(n, seed=n) for n in (37, 80, 5, 1)]
    streams, outs, pos = [graph.new_stream() for _ in frames], [[] for _ in frames], [0] * len(frames)
    rng = random.Random(0)
    while not all(s.ended for s in streams):
        idx = [i for i, s in enumerate(streams) if not s.ended and rng.random() < 0.8]
        pieces, ends = [], []
        for i in idx:
            k = rng.randint(0, 12)
            pieces.append(frames[i][pos[i] : pos[i] + k])
            pos[i] += len(pieces[-1])
            ends.append(pos[i] >= len(frames[i]))
        if idx:
            for i, r in zip(idx, graph.step([streams[i] for i in idx], pieces, ends)):
                outs[i].append(r)
    with torch.no_grad():
        for f, o in zip(frames, outs):
            whole = vocoder.generate(f)
            assert len(torch.cat(o)) == len(whole) and (torch.cat(o) - whole).abs().max() <= 1e-5


class Kernels(TorchDispatchMode):
    """Operators that compute (views left out: they launch nothing on a GPU) and values read back to the host."""

    def __init__(self):
        super().__init__()
        self.ops = self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
        self.reads += func._schema.name in ("aten::_local_scalar_dense", "aten::equal")
        return func(*args, **(kwargs or {}))


def step_counts(graph, n_streams: int, num_units: int) -> Kernels:
    """A steady-state step of n streams, each with a ragged piece of new frames."""
    import random

    rng = random.Random(n_streams)
    streams = [graph.new_stream() for _ in range(n_streams)]
    pieces = lambda: [torch.randint(0, num_units, (rng.randint(3, 9),)) for _ in streams]
    for _ in range(3):
        graph.step(streams, pieces(), [False] * n_streams)
    k, new = Kernels(), pieces()
    with k:
        graph.step(streams, new, [False] * n_streams)
    return k


@pytest.mark.parametrize("graph", ["CodeHiFiGAN generator", "source-filter parameters"])
def test_a_step_launches_as_many_operators_for_48_streams_as_for_6_and_reads_nothing_back(vocoder, graph):
    """On a GPU a step of many small operators is bound by launching them and by every count read back:
    the streams' state lives in slot tensors, so a step's operators do not grow with its streams."""
    from streamgen.models.source_filter_vocoder import SourceFilterConfig, SourceFilterVocoder
    from streamgen.models.streaming_conv import StreamingGenerator, StreamingParams

    if graph == "CodeHiFiGAN generator":
        make, num_units = lambda: StreamingGenerator(vocoder), TINY_VOCODER.num_embeddings
    else:
        sf = SourceFilterVocoder(SourceFilterConfig(num_units=50, dim=32, layers=3)).eval()
        make, num_units = lambda: StreamingParams(sf), 50
    few, many = (step_counts(make(), n, num_units) for n in (6, 48))
    assert few.ops == many.ops and many.reads == 0


def test_a_slot_given_back_starts_the_next_stream_clean(vocoder):
    import gc

    from streamgen.models.streaming_conv import StreamingGenerator

    graph = StreamingGenerator(vocoder)
    a, c = graph.new_stream(), graph.new_stream()
    graph.step([a, c], [units(20, seed=1), units(7, seed=2)], [False, False])
    graph.step([a], [units(9, seed=3)], [True])  # a ends: its slot is free
    with pytest.raises(ValueError, match="ended"):
        graph.step([a], [units(3)], [False])
    slot_c = c.slot
    del c  # dropped before its end (a client went away): its slot comes back too
    gc.collect()
    assert len(graph.slots.free) == graph.slots.size
    u = units(40, seed=4)
    b, d = graph.new_stream(), graph.new_stream()
    out_b = graph.step([b, d], [u[:25], units(5)], [False, False])[0]
    out_b = torch.cat([out_b, graph.step([b], [u[25:]], [True])[0]])
    assert {b.slot, d.slot} == {a.slot, slot_c} and graph.slots.size == 16  # reused, not grown
    with torch.no_grad():
        assert (out_b - vocoder.generate(u)).abs().max() <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_a_step_synchronises_only_to_hand_back_its_audio():
    """Every copy to the device is asynchronous and no length is read back: the parameter network's step (its
    result stays on the device) never waits for the GPU, the generator's only to return its audio."""
    import warnings

    from streamgen.models.source_filter_vocoder import SourceFilterConfig, SourceFilterVocoder
    from streamgen.models.streaming_conv import StreamingGenerator, StreamingParams

    torch.manual_seed(0)
    sf = SourceFilterVocoder(SourceFilterConfig(num_units=50, dim=32, layers=3)).cuda().eval()
    generator = CodeHiFiGAN(TINY_VOCODER).cuda().eval()
    ends = [False, False, False, True, False]
    for graph, num_units, allowed in ((StreamingParams(sf), 50, 0), (StreamingGenerator(generator), TINY_VOCODER.num_embeddings, 1)):
        pieces = lambda: [torch.randint(0, num_units, (n,)) for n in (3, 7, 0, 5, 9)]
        warm, measured = ([graph.new_stream() for _ in range(5)] for _ in range(2))
        for _ in range(3):
            graph.step(warm + measured, pieces() + pieces(), [False] * 10)
        graph.step(warm, pieces(), ends)  # (the first copies of each size allocate pinned host memory)
        torch.cuda.synchronize()
        new = pieces()
        with warnings.catch_warnings(record=True) as syncs:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                graph.step(measured, new, ends)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert sum("called a synchronizing CUDA operation" in str(w.message) for w in syncs) == allowed, [str(w.message) for w in syncs]


@pytest.mark.parametrize("shapes", [False, True], ids=["exact shapes", "shapes on the GPU's grid"])
@pytest.mark.parametrize("graph", ["CodeHiFiGAN generator", "source-filter parameters"])
def test_ragged_schedules_with_streams_joining_ending_and_dropped_equal_each_whole(vocoder, graph, shapes):
    """Random schedules: pieces of 0 to all of a stream's frames, a first piece that is its last, streams dropped
    mid-life (their slots reused), more streams than the first slots (the pool grows under live streams); with
    `shapes`, every batch and length rounded up as on a GPU (every slot below a power of two a row, samples past each row's end)."""
    import gc
    import random

    from streamgen.models.source_filter_vocoder import SourceFilterConfig, SourceFilterVocoder
    from streamgen.models.streaming_conv import StreamingGenerator, StreamingParams

    if graph == "CodeHiFiGAN generator":
        model, num_units, Graph = vocoder, TINY_VOCODER.num_embeddings, StreamingGenerator
        whole = lambda f: model.generate(f)
    else:
        model, num_units, Graph = SourceFilterVocoder(SourceFilterConfig(num_units=50, dim=32, layers=3)).eval(), 50, StreamingParams
        whole = lambda f: model.params(f[None], exact=True)[0]
    rng = random.Random(7)
    g = Graph(model, shapes=shapes)
    live, done = {}, []  # id -> [stream, pieces, outputs, frames in all]
    for step in range(14):
        for _ in range(rng.randint(4, 9) if step < 5 else 0):
            live[len(live) + len(done) + 1000 * step] = [g.new_stream(), [], [], rng.choice([1, 2, rng.randint(1, 30), rng.randint(20, 60)])]
        if live and rng.random() < 0.2:  # a session dropped mid-stream
            del live[rng.choice(list(live))]
            gc.collect()
        ids = [k for k in live if rng.random() < 0.8] if step < 13 else list(live)
        if not ids:
            continue
        frames, ended = [], []
        for k in ids:
            _, pieces, _, total = live[k]
            left = total - sum(len(p) for p in pieces)
            n = left if step == 13 or rng.random() < 0.2 else (0 if rng.random() < 0.25 else rng.randint(0, left))
            pieces.append(torch.randint(0, num_units, (n,), generator=torch.Generator().manual_seed(rng.randrange(10**6))))
            frames.append(pieces[-1])
            ended.append(n == left and (step == 13 or rng.random() < 0.7))
        with torch.no_grad():
            got = g.step([live[k][0] for k in ids], frames, ended)
        for k, out, end in zip(ids, got, ended):
            live[k][2].append(out)
            if end:
                done.append(live.pop(k))
    assert len(done) >= 20 and g.slots.size > 16
    with torch.no_grad():
        for _, pieces, outs, total in done:
            w, o = whole(torch.cat(pieces)), torch.cat(outs)
            assert o.shape == w.shape and (o - w).abs().max() <= 1e-5, (total, [len(p) for p in pieces])


def test_batches_padded_to_the_gpus_grid_give_each_window_what_it_gets_alone(vocoder):
    """On a GPU the encoder's and the vocoder's window batches get extra rows and longer widths (so that their
    shapes repeat), and the encoder's call (replayed as a CUDA graph there) gives every frame's unit: each real
    window's units, durations and audio are those of the same batch unpadded."""
    from streamgen.models.captured import CapturedCall
    from streamgen.models.shapes import gpu_shapes, grid
    from streamgen.pipeline import streams
    from streamgen.pipeline.streams import AudioWindow, DurationWindow, EncodeWindow
    from streamgen.testing import random_bundle

    bundle = random_bundle()
    hubert, quantizer = bundle.hubert.eval(), bundle.quantizer
    gen = torch.Generator().manual_seed(3)
    waves = [torch.randn(int(n), generator=gen) * 0.2 for n in torch.randint(2000, 9000, (11,), generator=gen)]
    enc = [EncodeWindow(w, 1, int(hubert.cfg.num_frames(torch.tensor(len(w)))) - 1, 0) for w in waves]
    units = [torch.randint(0, TINY_VOCODER.num_embeddings, (int(n),), generator=gen) for n in torch.randint(3, 40, (11,), generator=gen)]
    dur = [DurationWindow(u, 1, len(u) - 2) for u in units]
    audio = [AudioWindow(u, 2, len(u) - 3) for u in units]
    with torch.no_grad():
        plain = (streams.encode_windows(hubert, quantizer, enc), streams.time_windows(vocoder, dur), streams.synthesise_windows(vocoder, audio))
        with gpu_shapes():
            padded = (streams.encode_windows(hubert, quantizer, enc), streams.time_windows(vocoder, dur), streams.synthesise_windows(vocoder, audio))
            # as the engine calls them on a GPU: every frame's unit in the call (what it captures), the kept ones read after
            units, durations, generate = (CapturedCall(f, "") for f in (streams.window_units(hubert, quantizer), vocoder.durations, vocoder.generate))
            captured = (streams.encode_windows(hubert, quantizer, enc, units), streams.time_windows(vocoder, dur, durations),
                        streams.synthesise_windows(vocoder, audio, generate))
    assert grid(11) == 12
    for got in (padded, captured):
        for a, b in zip(plain[0] + plain[1], got[0] + got[1]):
            assert torch.equal(a, b)
        for a, b in zip(plain[2], got[2]):
            assert a.shape == b.shape and (a - b).abs().max() <= 1e-5


def test_a_gpu_step_over_every_slot_leaves_the_streams_without_frames_as_they_were(vocoder):
    """On the GPU's shapes a step's rows are every slot below a power of two past its streams' (a few batch sizes
    whichever streams have frames): nine live streams, a third of them without frames in each step, give the audio
    of steps made of only the streams with frames; a row with no input leaves its slot's state as it is."""
    from streamgen.models.streaming_conv import Rows, StreamingGenerator

    plain, padded = StreamingGenerator(vocoder), StreamingGenerator(vocoder, shapes=True)
    out = {g: [[] for _ in range(9)] for g in (plain, padded)}
    streams = {g: [g.new_stream() for _ in range(9)] for g in (plain, padded)}
    for step in range(5):
        which = list(range(9)) if step in (0, 4) else [i for i in range(9) if i % 3 != step % 3]
        pieces = [units(4 + i, seed=10 * step + i) for i in which]
        for g in (plain, padded):
            got = g.step([streams[g][i] for i in which], pieces, [step == 4] * len(which))
            for i, r in zip(which, got):
                out[g][i].append(r)
    for a, b in zip(out[plain], out[padded]):
        assert len(torch.cat(a)) > 0 and (torch.cat(a) - torch.cat(b)).abs().max() <= 1e-6
    g = StreamingGenerator(vocoder, shapes=True)
    s = [g.new_stream() for _ in range(6)]
    for x in s:
        x.take_slot()
    rows = Rows([s[2], s[5]], [units(3), units(7)], [False, True], g.slots, "cpu")
    assert [x.slot for x in s] == list(range(6))  # (the lowest free slot first)
    assert rows.slots.tolist() == list(range(8)) and rows.at.tolist() == [2, 5]
    assert rows.n.tolist() == [0, 0, 3, 0, 0, 7, 0, 0] and rows.ended.tolist() == [False] * 5 + [True, False, False]


def test_static_steps_on_the_gpus_shapes_equal_each_whole(vocoder):
    """On the GPU's shapes a step in which no stream ends is static (what a GPU captures as a CUDA graph): slots
    [0, R), widths the input's, counts from the host. Streams in steady state with ragged pieces (none for some),
    streams joining late, one ending (an eager step between static ones), one dropped and its slot reused, the
    slots growing under live streams: each stream's audio equals its frames synthesised whole."""
    import gc
    import random

    from streamgen.models.streaming_conv import StreamingGenerator

    rng = random.Random(5)
    g = StreamingGenerator(vocoder, shapes=True)
    live, done, static = {}, [], 0
    for step in range(16):
        joining = {0: 6, 3: 3, 7: 1, 9: 12}.get(step, 0)  # 22 streams in all: more than the first 16 slots
        for _ in range(joining):
            live[len(live) + len(done) + 100 * step] = [g.new_stream(), [], []]
        if step == 6:  # a session dropped mid-stream: its slot goes to the next stream
            del live[next(iter(live))]
            gc.collect()
        ids = list(live)
        ending = {5: ids[:1], 15: ids}.get(step, [])
        pieces = [torch.randint(0, TINY_VOCODER.num_embeddings, (0 if rng.random() < 0.2 else rng.randint(1, 14),),
                                generator=torch.Generator().manual_seed(rng.randrange(10**6))) for _ in ids]
        with torch.no_grad():
            got = g.step([live[k][0] for k in ids], pieces, [k in ending for k in ids])
        static += not ending
        for k, piece, out in zip(ids, pieces, got):
            live[k][1].append(piece)
            live[k][2].append(out)
            if k in ending:
                done.append(live.pop(k))
    assert static == 14 and len(done) == 21 and g.slots.size == 32
    with torch.no_grad():
        for _, pieces, outs in done:
            whole, streamed = vocoder.generate(torch.cat(pieces)), torch.cat(outs)
            assert whole.shape == streamed.shape and (whole - streamed).abs().max() <= 1e-5


@pytest.mark.parametrize("shapes", [False, True], ids=["exact shapes", "shapes on the GPU's grid"])
def test_slot_tensors_shrink_only_when_no_stream_holds_a_slot(vocoder, shapes):
    """A graph's slot tensors keep the size of the most streams that ran at once; `shrink` drops them only once
    every stream has given its slot back, and a stream after it gets what it gets on a fresh graph."""
    from streamgen.models.streaming_conv import StreamingGenerator

    g = StreamingGenerator(vocoder, shapes=shapes)
    streams = [g.new_stream() for _ in range(20)]
    g.step(streams, [units(6, seed=i) for i in range(20)], [False] * 20)
    assert g.slots.size >= 20 and not g.slots.shrink()  # all held
    g.step(streams[1:], [units(3, seed=i) for i in range(19)], [True] * 19)
    assert not g.slots.shrink()  # one still held
    streams[0].end()
    assert g.slots.shrink() and g.slots.size == 0
    piece = units(9, seed=99)
    fresh = StreamingGenerator(vocoder, shapes=shapes)
    (after,) = g.step([g.new_stream()], [piece], [True])
    (alone,) = fresh.step([fresh.new_stream()], [piece], [True])
    assert len(after) > 0 and torch.equal(after, alone)


def test_a_new_stream_takes_the_lowest_free_slot(vocoder):
    """A GPU's steps run every slot below a power of two past their streams': slots freed below live ones are
    taken first, lowest first, so the streams stay in the lowest slots."""
    from streamgen.models.streaming_conv import StreamingGenerator

    g = StreamingGenerator(vocoder, shapes=True)
    s = [g.new_stream() for _ in range(20)]
    for x in s:
        x.take_slot()
    for i in (12, 3, 7):
        s[i].end()
    new = [g.new_stream() for _ in range(4)]  # (held: a stream dropped gives its slot back)
    assert [x.take_slot() for x in new] == [3, 7, 12, 20]
