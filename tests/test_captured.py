"""The model calls the engine replays as CUDA graphs on a GPU (`models.captured`): their work follows their
arguments' shapes only (checked on any machine), and a replay equals the call run eagerly (on a GPU)."""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from streamgen.models.captured import CapturedCall
from streamgen.pipeline.streams import window_units
from streamgen.testing import random_bundle


class ValueDependent(TorchDispatchMode):
    """Records operators a CUDA graph cannot hold: a value read back to the host, or an output whose shape
    depends on values (the graph would replay the shapes of its capture)."""

    NAMES = {"aten::_local_scalar_dense", "aten::equal", "aten::nonzero", "aten::masked_select", "aten::unique_consecutive",
             "aten::_unique2", "aten::unique_dim", "aten::bincount"}

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        masks = name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])  # x[mask]: its nonzero on a GPU
        if name in self.NAMES or masks or (name == "aten::repeat_interleave" and func._overloadname == "Tensor"):
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def full_float32():
    """Convolutions and products in float32 on a GPU (TF32's, the default for cuDNN, agree to about 1e-3)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def engine_calls(b, g: torch.Generator) -> dict:
    """The calls the engine captures, each with a padded batch of 3 ragged rows."""
    wave, frames = torch.randn(3, 9600, generator=g), torch.randint(0, 100, (3, 48), generator=g)
    return {
        "unit encoder": (window_units(b.hubert, b.quantizer), wave, torch.tensor([9600, 7000, 4000])),
        "duration predictor": (b.vocoder.durations, frames, torch.tensor([48, 30, 9])),
        "vocoder": (b.vocoder.generate, frames, torch.tensor([48, 30, 9])),
    }


@pytest.mark.parametrize("call", ["unit encoder", "duration predictor", "vocoder"])
def test_the_calls_a_gpu_captures_read_nothing_back_and_take_their_shapes_from_their_arguments(call):
    b = random_bundle()
    fn, *args = engine_calls(b, torch.Generator().manual_seed(0))[call]
    with torch.no_grad():
        fn(*args)  # (a first call may look at its weights once: the capture's warm-up makes it)
        with ValueDependent() as seen:
            fn(*args)
    assert seen.found == []


def test_the_streaming_vocoders_static_step_reads_nothing_back_and_takes_its_shapes_from_its_arguments():
    """The step a GPU captures for streams none of which ends (`StreamingGenerator`, on the GPU's shapes)."""
    from streamgen.models.streaming_conv import StreamingGenerator

    g = StreamingGenerator(random_bundle().vocoder, shapes=True)
    streams = [g.new_stream() for _ in range(3)]
    pieces = lambda: [torch.randint(0, 100, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 0, 9)]
    g.step(streams, pieces(), [False] * 3)  # (the slots are made: the next step is the static one on them)
    fn, found, calls = g.static.fn, [], []

    def watched(*args):
        with ValueDependent() as seen:
            out = fn(*args)
        found.extend(seen.found)
        calls.append(args)
        return out

    g.static.fn = watched
    g.step(streams, pieces(), [False] * 3)
    assert len(calls) == 1 and found == []


def test_the_decoders_static_step_reads_nothing_back_and_takes_its_shapes_from_its_arguments():
    """The decoder step a GPU captures (`generation._Captured`: a prompted step of a block of slots, the greedy
    rows' tokens chosen and recorded in it), with a greedy and a sampled request running."""
    from streamgen.models.generation import Decoder, Request, Sampling, decoder_prefix
    from streamgen.models.prompt import DeepPrompt, PromptConfig
    from streamgen.models.unit_mbart import units_to_source

    m = random_bundle().mbart
    prompt = DeepPrompt(m.cfg, PromptConfig(3)).shared_kv(m)
    dec = Decoder(m, slots=4, graphs=True)
    g = torch.Generator().manual_seed(3)
    for key, sampling in enumerate((Sampling(), Sampling(greedy=False, top_k=5))):
        dec.submit(key, Request(units_to_source(torch.randint(0, 50, (9,), generator=g)), decoder_prefix(), 30, 30,
                                sampling=sampling, prompt=prompt, seed=key))
    with torch.no_grad():
        dec.step(), dec.step()  # admitted, then a static step (captured: its function kept)
        (captured,) = dec.captured.values()
        fn, found = captured.run, []

        def watched():
            with ValueDependent() as seen:
                out = fn()
            found.extend(seen.found)
            return out

        captured.run = watched
        moved = dec.step()
    assert len(moved) == 2 and found == []


def test_a_value_read_back_is_seen():
    """The check above can fail: a call that sizes its output by a value is caught."""
    with ValueDependent() as seen:
        x = torch.arange(5)
        x[: int(x.max())]
        x[x > 2]
        x[x > 3] = 0
    assert len(seen.found) == 3, seen.found


def test_off_cuda_a_captured_call_is_the_call():
    b = random_bundle()
    fn, *args = engine_calls(b, torch.Generator().manual_seed(1))["vocoder"]
    call = CapturedCall(fn, "vocoder", after=0)
    with torch.no_grad():
        assert torch.equal(call(*args), fn(*args))
    assert call.graphs == {} and call.replays == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_replays_equal_eager_calls_whatever_was_replayed_between():
    """Each call captured for two shapes (after one eager call each), replayed with new values, the two shapes
    interleaved (their graphs share one memory pool): every result equals the call run eagerly."""
    b = random_bundle().to("cuda", torch.float32)
    g = torch.Generator().manual_seed(2)
    for name in ("unit encoder", "duration predictor", "vocoder"):
        fn = engine_calls(b, g)[name][0]
        call = CapturedCall(fn, name, after=1)
        shapes = [engine_calls(b, g)[name][1:] for _ in range(2)]
        shapes[1] = [a[:2] if i else a[:2, : a.shape[1] // 2] for i, a in enumerate(shapes[1])]  # a second shape
        shapes[1][1] = shapes[1][1].clamp_max(shapes[1][0].shape[1])
        with torch.no_grad(), full_float32():
            for r in range(4):
                for args in shapes:
                    args = [a.roll(r, 0).cuda() for a in args]  # new values, rows and their lengths together
                    got = call(*args).clone()
                    want = fn(*args)
                    if want.dtype.is_floating_point:
                        assert (got - want).abs().max().item() <= 1e-5, name
                    else:
                        assert torch.equal(got, want), name
        assert len(call.graphs) == 2 and all(gr is not None for gr, _, _ in call.graphs.values()), name
        assert call.replays == 2 * 3, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_decoder_steps_replayed_as_graphs_give_the_units_of_eager_steps():
    """Greedy and sampled requests on one prompt joining and leaving (the pool grows past its first slots): the
    decoder's static steps replayed as CUDA graphs, the greedy rows' tokens chosen inside them, give the units of
    its eager steps, request by request."""
    from streamgen.models.generation import Decoder, Request, Sampling, decoder_prefix
    from streamgen.models.prompt import DeepPrompt, PromptConfig
    from streamgen.models.unit_mbart import units_to_source

    m = random_bundle().to("cuda", torch.float32).mbart
    deep = DeepPrompt(m.cfg, PromptConfig(4)).to("cuda")
    g = torch.Generator().manual_seed(4)
    srcs = [torch.randint(0, 100, (n,), generator=g) for n in (5, 17, 9, 30, 12)]
    sampling = [Sampling(), Sampling(greedy=False, temperature=0.9, top_k=10), Sampling(), Sampling(greedy=False), Sampling()]
    joins = {0: [0], 3: [1], 5: [2, 3], 9: [4]}
    outs, captured = [], []
    with torch.no_grad(), full_float32():
        prompt = deep.shared_kv(m)
        for graphs in (False, True):
            dec, out = Decoder(m, slots=2, graphs=graphs), {i: [] for i in range(len(srcs))}
            for step in range(200):
                for i in joins.get(step, []):
                    dec.submit(i, Request(units_to_source(srcs[i]), decoder_prefix(), 25, 10, sampling[i], prompt, seed=i))
                for key, units, _ in dec.step():
                    out[key] += units
                captured += [c for c in dec.captured.values() if c not in captured]
                if step > 9 and not dec.busy:
                    break
            outs.append(out)
    assert outs[0] == outs[1] and all(len(u) >= 10 for u in outs[0].values())
    assert captured and all(c.graph is not None for c in captured)  # the steps were replayed graphs, not eager runs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_streaming_vocoder_steps_replayed_as_graphs_equal_each_whole():
    """Twelve streams stepped with ragged pieces of one width: their static steps are captured (the warm-up before a
    capture puts the slots back) and replayed; a stream ending between them runs eagerly; eight more streams join
    after the captures (the slots grow: the steps are captured anew on the new tensors). Each stream's audio equals
    its frames synthesised whole."""
    from streamgen.models.streaming_conv import StreamingGenerator

    vocoder = random_bundle().vocoder.cuda()
    g = StreamingGenerator(vocoder)
    gen = torch.Generator().manual_seed(4)
    streams = [g.new_stream() for _ in range(12)]
    frames: list[list[torch.Tensor]] = [[] for _ in range(20)]
    audio: list[list[torch.Tensor]] = [[] for _ in range(20)]
    replays = []
    with torch.no_grad(), full_float32():
        for step in range(12):
            if step == 6:
                replays.append(g.static.replays)
                streams += [g.new_stream() for _ in range(8)]
            pieces = [torch.randint(0, 100, (int(n),), generator=gen) for n in torch.randint(1, 10, (len(streams),), generator=gen)]
            pieces[0] = torch.randint(0, 100, (10,), generator=gen)  # every step 10 frames wide: one shape a size of the slots
            ended = [step == 11 or (i == 5 and step == 4) for i in range(len(streams))]
            live = [i for i in range(len(streams)) if not (i == 5 and step > 4)]
            got = g.step([streams[i] for i in live], [pieces[i] for i in live], [ended[i] for i in live])
            for i, out in zip(live, got):
                frames[i].append(pieces[i])
                audio[i].append(out)
        replays.append(g.static.replays)
        assert g.slots.size == 32 and replays[0] >= 2 and replays[1] >= 2, replays
        assert all(graph is not None for graph, _, _ in g.static.graphs.values())
        for f, a in zip(frames, audio):
            whole, streamed = vocoder.generate(torch.cat(f).cuda()).cpu(), torch.cat(a)
            assert whole.shape == streamed.shape and (whole - streamed).abs().max().item() <= 1e-4
