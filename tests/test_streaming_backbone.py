"""A Unit mBART trained to stream (causal encoder, decoder positions limited to the wait-k schedule):
what it encodes and decodes never depends on source it has not read, so a live session's decisions
resume one decode (only new source tokens encoded, no committed unit re-run) and the units equal
one decode of the whole source, alone or batched with other streams joining and leaving."""

import contextlib
import copy
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import TINY, random_units

from streamgen.models.generation import Decoder, Request, decoder_prefix
from streamgen.models.shapes import gpu_shapes
from streamgen.models.unit_mbart import EOS, UNIT_OFFSET, UnitMBart, units_to_source

K = 5


def streaming(cfg=TINY, k=K, ratio=1.0, seed=0):
    """A lively random streaming model (larger weights: greedy paths vary; </s> never chosen early)."""
    torch.manual_seed(seed)
    m = UnitMBart(replace(cfg, wait_k=k, wait_ratio=ratio)).eval().requires_grad_(False)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
        m.embed_tokens.weight[EOS].zero_()
    return m


def test_nothing_depends_on_source_beyond_the_schedule():
    m = streaming(ratio=0.75)
    src = units_to_source(random_units(30))[None]
    later = src.clone()
    later[0, 12:] = UNIT_OFFSET + 7  # change everything from source token 12 on
    prev = torch.cat([torch.tensor([[EOS]]), random_units(20, seed=2)[None] + UNIT_OFFSET], 1)
    seen = m.cfg.visible_source(torch.arange(prev.shape[1]))
    assert seen.tolist()[:5] == [K + 1, K + 2, K + 3, K + 5, K + 6]  # k + floor(q / 0.75) + 1
    a, b = m(src, prev), m(later, prev)
    for q in range(prev.shape[1]):
        same = bool((a[0, q] - b[0, q]).abs().max() == 0)
        assert same == (int(seen[q]) <= 12), q  # unchanged exactly where the schedule has not read token 12
    ea, eb = m.encode(src), m.encode(later)  # the encoder is causal
    assert torch.equal(ea[0, :12], eb[0, :12]) and not torch.equal(ea[0, 12:], eb[0, 12:])
    assert m.cfg.decodable(K) == 0 and m.cfg.decodable(12) == int(((seen <= 12)).sum())


def test_a_row_step_reads_no_source_beyond_the_schedule():
    """`step_rows` attends to the first visible_source(q) source tokens of each row, the schedule's,
    and reads none after them (NaN there changes nothing); the logits equal the masked step's."""
    m = streaming(ratio=0.75)
    src = torch.stack([units_to_source(random_units(30, seed=s)) for s in (1, 2)])
    state = m.start(src, capacity=32)
    prev = torch.cat([torch.full((2, 1), EOS), torch.stack([random_units(9, seed=s) for s in (3, 4)]) + UNIT_OFFSET], 1)
    for t in range(prev.shape[1] - 1):
        m.step(state, prev[:, t])
    want = m.step(copy.deepcopy(state), prev[:, -1])
    seen = m.cfg.visible_source(state.lengths)
    for k, v in state.cross:
        for r in range(2):
            k[r, :, int(seen[r]) :], v[r, :, int(seen[r]) :] = float("nan"), float("nan")
    for r in (0, 1):  # one row alone (a shorter path): the same
        got = m.step_rows(copy.deepcopy(state), [r], prev[[r], -1])
        assert torch.isfinite(got).all() and (got - want[[r]]).abs().max() <= 1e-5
    got = m.step_rows(state, [1, 0], prev[[1, 0], -1])
    assert torch.isfinite(got).all() and (got - want[[1, 0]]).abs().max() <= 1e-5


def test_extending_the_source_equals_encoding_it_whole():
    m = streaming()
    full = [units_to_source(random_units(n, seed=n)) for n in (23, 9, 31)]
    heads = [5, 9, 12]  # the sources read so far, ragged
    state = m.start(torch.nn.utils.rnn.pad_sequence([f[:h] for f, h in zip(full, heads)], batch_first=True, padding_value=1))
    for step in (4, 7, 100):  # two ragged extensions (one row gets nothing), then the rest
        new = [f[h : h + step] for f, h in zip(full, heads)]
        counts = torch.tensor([len(t) for t in new])
        rows = torch.tensor([r for r in range(3) if counts[r] > 0])
        pad = torch.nn.utils.rnn.pad_sequence([new[r] for r in rows.tolist()], batch_first=True, padding_value=1)
        m.extend_source(state, rows, pad, counts[rows])
        heads = [h + len(t) for h, t in zip(heads, new)]
    for r, f in enumerate(full):
        alone = m.start(f[None])
        S = len(f)
        assert int(state.src_mask[r].sum()) == S and bool(state.src_mask[r, :S].all())
        for (k, v), (ka, va) in zip(state.cross, alone.cross):
            torch.testing.assert_close(k[r, :, :S], ka[0], rtol=1e-5, atol=1e-5)  # float rounding (values up to ~10)
            torch.testing.assert_close(v[r, :, :S], va[0], rtol=1e-5, atol=1e-5)


def live_streams(m, sources, chunks, offsets, budget=60):
    """Sessions that read their source `chunks[i]` tokens per round, starting after `offsets[i]`
    rounds, each deciding as wait-k does (decode what the schedule allows; the rest at the end):
    their units, the source tokens encoded and decoder tokens prefilled."""
    dec = Decoder(m, slots=2)
    out = {i: [] for i in range(len(sources))}
    read = {i: 0 for i in range(len(sources))}
    busy, done = set(), set()
    counts = {"encoded": 0, "prefilled": 0}
    widths: list[int] = []
    start, extend, step = m.start, m.extend_source, m.step

    def counted_start(src, *a, **kw):
        counts["encoded"] += int(src.ne(1).sum())
        return start(src, *a, **kw)

    def counted_extend(state, rows, tokens, n):
        counts["encoded"] += int(n.sum())
        widths.append(tokens.shape[1] - int(n.max()))  # the padding past the longest extension
        return extend(state, rows, tokens, n)

    def counted_step(state, tokens, *a, counts_=None, **kw):
        if tokens.dim() == 2:
            counts["prefilled"] += int(kw["counts"].sum()) if kw.get("counts") is not None else tokens.numel()
        return step(state, tokens, *a, **kw)

    m.start, m.extend_source, m.step = counted_start, counted_extend, counted_step
    try:
        r = 0
        while len(done) < len(sources):
            for i, src in enumerate(sources):
                if i in busy or i in done or r < offsets[i]:
                    continue
                read[i] = min(len(src), read[i] + chunks[i])
                complete = read[i] == len(src)
                committed = torch.tensor(out[i], dtype=torch.long)
                if complete:
                    tokens, n = units_to_source(src), budget - len(out[i])
                else:
                    tokens, n = src[: read[i]] + UNIT_OFFSET, m.cfg.decodable(read[i]) - len(out[i])
                if n > 0:
                    dec.submit(i, Request(tokens, decoder_prefix((), committed), n, min_new=n, complete=complete))
                    busy.add(i)
                elif complete:
                    done.add(i)
            for i, units, finished in dec.step():
                out[i] += units
                if finished:
                    busy.discard(i)
                    if read[i] == len(sources[i]):
                        done.add(i)
                        dec.cancel(i)  # the session ends: its parked slot is freed
            r += 1
    finally:
        m.start, m.extend_source, m.step = start, extend, step
    return out, counts, dec, widths


@pytest.mark.parametrize("shapes", [False, True], ids=["exact shapes", "shapes on the GPU's grid"])
def test_a_stream_decided_chunk_by_chunk_equals_one_decode_of_the_whole_source(shapes):
    """shapes: admissions and source extensions padded to the grid, as on a GPU."""
    m = streaming()
    sources = [random_units(n, seed=10 + n) for n in (30, 41, 17, 26)]
    whole = []
    for src in sources:
        dec = Decoder(m)
        dec.submit(0, Request(units_to_source(src), decoder_prefix(), 60, min_new=60))  # no </s> (tested below)
        units = []
        while dec.busy:
            units += [u for _, us, _ in dec.step() for u in us]
        whole.append(units)
    assert all(len(u) == 60 and len(set(u)) >= 4 for u in whole)  # varied units, not one repeated
    padding = 0
    # alone in step; ragged, joining mid-decode; extensions longer than 8 tokens (the grid pads those)
    for chunks, offsets in (([4] * 4, [0] * 4), ([4, 7, 3, 1], [0, 2, 5, 9]), ([9, 13, 11, 10], [0, 1, 1, 3])):
        with gpu_shapes() if shapes else contextlib.nullcontext():
            out, counts, dec, widths = live_streams(m, sources, chunks, offsets)
        padding += sum(widths)
        assert [out[i] for i in range(4)] == whole
        # every source token (and each </s>) encoded once; only each stream's start token prefilled
        assert counts == {"encoded": sum(len(s) + 1 for s in sources), "prefilled": 4}
        assert not dec.parked and not dec.running and len(dec.free) == dec.pool.batch_size  # every slot is free again
    assert (padding > 0) == shapes


def decode_all(dec, key, request):
    dec.submit(key, request)
    units = []
    while dec.busy:
        units += [u for _, us, _ in dec.step() for u in us]
    return units


def test_a_stream_that_says_eos_has_ended_until_its_source_starts_anew():
    m = streaming()
    with torch.no_grad():
        m.embed_tokens.weight[EOS].normal_(0, 0.5)  # </s> as likely as a unit
    # a source whose whole decode ends at </s> after 8..29 units, before the schedule reads all 40
    for seed in range(100):
        src = random_units(40, seed=seed)
        whole = decode_all(Decoder(m), "s", Request(units_to_source(src), decoder_prefix(), 100))
        if 8 <= len(whole) < 30:
            break
    else:
        pytest.fail("no source ended early")
    dec, got, asked = Decoder(m), [], 0
    ended, encoded_after_eos, extend = [False], [], m.extend_source  # per source encoding: had the stream said </s>?
    m.extend_source = lambda state, rows, tokens, counts: (encoded_after_eos.append(ended[0]), extend(state, rows, tokens, counts))
    try:
        for read in range(K + 1, 41):
            n = m.cfg.decodable(read) - len(got)
            if n > 0:
                asked += 1
                ended[0] = "s" in dec.parked and dec.parked["s"].last == EOS  # between decisions the stream is parked
                got += decode_all(dec, "s", Request(src[:read] + UNIT_OFFSET, decoder_prefix((), torch.tensor(got, dtype=torch.long)), n, complete=False))
        ended[0] = dec.parked["s"].last == EOS
        got += decode_all(dec, "s", Request(units_to_source(src), decoder_prefix((), torch.tensor(got, dtype=torch.long)), 100 - len(got)))
    finally:
        m.extend_source = extend
    assert got == whole and asked > len(whole)  # after </s> the stream's later decisions got nothing
    assert encoded_after_eos and not any(encoded_after_eos)  # ... and cost nothing: no source encoded for them
    fresh = decode_all(dec, "s", Request(units_to_source(src[:10]), decoder_prefix(), 5, min_new=5))  # a new source: a fresh decode
    assert len(fresh) == 5 and len(dec.parked) == 1


def test_the_decoder_counts_apart_the_time_that_brings_decodes_in():
    """`Decoder.admit_s` (what bench/sessions.py reports as "generator admitting"): it grows on the steps that
    admit a decode or resume a stream (its new source encoded) and on no step that only advances."""
    m = streaming()
    src, dec, got = random_units(40, seed=3), Decoder(m), []
    moved = []  # per step: (admitted or resumed, admit_s grew)
    for read in (12, 20, 28):
        n = m.cfg.decodable(read) - len(got)
        dec.submit("s", Request(src[:read] + UNIT_OFFSET, decoder_prefix((), torch.tensor(got, dtype=torch.long)), n, complete=False))
        while dec.busy:
            bringing = bool(dec.waiting or dec.resuming)
            before = dec.admit_s
            got += [u for _, us, _ in dec.step() for u in us]
            moved.append((bringing, dec.admit_s > before))
    assert len(got) == m.cfg.decodable(28) and len(moved) > 6
    assert all(bringing == grew for bringing, grew in moved)
    assert sum(b for b, _ in moved) == 3  # one admission, two resumptions


@pytest.fixture
def streaming_bundle(test_bundle):
    """The test bundle with a streaming translation backbone of its own (wait-k K)."""
    import copy

    b = copy.copy(test_bundle)
    b.backbones = {"translation": streaming(test_bundle.mbart.cfg, k=K)}
    return b


def test_live_translation_on_a_streaming_backbone_equals_the_offline_decode_and_batches_exactly(streaming_bundle):
    from speech import espeak
    from test_engine import interleave, run

    from streamgen.io.memory import chunks_of
    from streamgen.pipeline.items import Control
    from streamgen.pipeline.policies import WaitK

    texts = {"a": "The weather is nice today.", "b": "Where is the train station?", "c": "One two three."}
    opts = {"policy": "wait-k", "k": K, "chunk_ms": 320}
    items = {n: [Control(n, "start", "translation", opts)] + chunks_of(n, espeak(t), 1600) for n, t in texts.items()}
    sources: dict[str, list] = {}
    add = WaitK.add_source

    def record(self, units, frames):
        sources.setdefault(id(self), []).append(units.clone())
        return add(self, units, frames)

    model = streaming_bundle.backbones["translation"]
    extended = []
    model.extend_source = lambda state, rows, tokens, counts, f=model.extend_source: extended.append(int(counts.sum())) or f(state, rows, tokens, counts)
    WaitK.add_source = record
    try:
        alone = {n: run(streaming_bundle, items[n]) for n in texts}
    finally:
        WaitK.add_source = add
    assert len(extended) >= 6  # decisions resumed their stream, reading only new source units
    for (n, (sink, units, engine)), parts in zip(alone.items(), sources.values()):
        assert n not in sink.errors and len(units[n]) > 0
        src = torch.cat(parts)
        offline = Decoder(model)
        offline.submit(0, Request(units_to_source(src), decoder_prefix(), len(src) + 10))
        expect = []
        while offline.busy:
            expect += [u for _, us, _ in offline.step() for u in us]
        assert units[n] == expect, n  # streamed decision by decision = one decode of the whole source
        dec = engine.decoders["translation"]
        assert not dec.parked and not dec.running  # the session's slot was freed when it ended
    together, units, engine = run(streaming_bundle, interleave(list(items.values()), [0, 2, 3]))
    for n in texts:
        assert units[n] == alone[n][1][n], n
        a, b = together.wave(n), alone[n][0].wave(n)
        assert len(a) == len(b) > 0 and (a - b).abs().max() <= 1e-5, n


def test_a_streaming_backbone_refuses_the_policies_it_was_not_trained_for(streaming_bundle):
    from test_engine import run

    from streamgen.io.memory import chunks_of
    from streamgen.pipeline.items import Control

    audio = torch.zeros(3200)
    for opts, why in (({"policy": "local-agreement"}, "local-agreement re-decodes"),
                      ({"policy": "wait-k", "k": K + 1}, f"streams under wait-k with k={K}, ratio=1.0")):
        sink, _, _ = run(streaming_bundle, [Control("a", "start", "translation", opts)] + chunks_of("a", audio, 1600))
        assert why in sink.errors["a"], sink.errors


def test_train_prompt_wait_k_trains_a_streaming_backbone(tmp_path):
    from test_train import cli, cli_setup

    import streamgen

    d = cli_setup.__wrapped__(tmp_path)
    args = ["train-prompt", "--bundle", d / "bundle", "--task", "toy", "--train", d / "train.tsv", "--epochs", "1", "--batch-size", "8"]
    r = subprocess.run([sys.executable, "-m", "streamgen.cli", *map(str, args), "--out", d / "p", "--wait-k", "3"],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode != 0 and "--wait-k trains the backbone to stream: it needs --full" in r.stdout + r.stderr
    cli(*args, "--full", "--lr", "1e-3", "--out", d / "f", "--wait-k", "3", "--wait-ratio", "0.5", "--into-bundle")
    cfg = streamgen.load_bundle(d / "bundle").backbones["toy"].cfg
    assert (cfg.wait_k, cfg.wait_ratio, cfg.streams) == (3, 0.5, True)


def test_the_cli_refuses_another_policy_on_a_streaming_backbone_before_any_audio(streaming_bundle, tmp_path):
    import numpy as np
    import soundfile as sf
    from typer.testing import CliRunner

    import streamgen.cli as cli

    streaming_bundle.save(tmp_path / "b")
    sf.write(tmp_path / "talk.wav", np.zeros(16000, np.float32), 16000)
    for opt, why in (("policy=local-agreement", "local-agreement re-decodes hypotheses it may take back"),
                     ("k=7", f"streams under wait-k with k={K}, ratio=1.0 (as it was trained), not k=7, ratio=1.0: give --opt k={K} --opt ratio=1.0")):
        r = CliRunner().invoke(cli.app, ["run", "--bundle", str(tmp_path / "b"), "--task", "translation", "--opt", opt,
                                         "--in", str(tmp_path / "talk.wav"), "--out", str(tmp_path / "out.wav")])
        assert r.exit_code == 2 and r.output.startswith("error: task 'translation': this backbone") and why in r.output, r.output
        assert r.output.count("\n") == 1 and not (tmp_path / "out.wav").exists()


def test_a_resume_that_fails_leaves_the_stream_where_cancel_frees_its_slot():
    """A stream whose new source fails to encode (out of memory, say) is parked again before the error
    goes on, so the engine's cancel of its session frees the slot: nothing of the pool leaks."""
    m = streaming()
    src, dec, got = random_units(40, seed=3), Decoder(m), []
    dec.submit("s", Request(src[:12] + UNIT_OFFSET, decoder_prefix(), m.cfg.decodable(12), complete=False))
    while dec.busy:
        got += [u for _, us, _ in dec.step() for u in us]
    assert "s" in dec.parked and got
    extend = m.extend_source

    def failing(*a):
        raise RuntimeError("out of memory (injected)")

    m.extend_source = failing
    try:
        dec.submit("s", Request(src[:20] + UNIT_OFFSET, decoder_prefix((), torch.tensor(got, dtype=torch.long)),
                                m.cfg.decodable(20) - len(got), complete=False))
        with pytest.raises(RuntimeError, match="injected"):
            dec.step()
    finally:
        m.extend_source = extend
    assert "s" in dec.parked and not dec.resuming and not dec.busy
    dec.cancel("s")
    assert not dec.parked and sorted(dec.free) == list(range(dec.pool.batch_size))
