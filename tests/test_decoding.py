"""Incremental decoding (K/V cache, shared prompt prefix, ragged batches) equals full recompute."""

import torch
import torch.nn.functional as F
from conftest import TINY, random_units
from torch.utils._python_dispatch import TorchDispatchMode

from streamgen.models.generation import Decoder, Request, allowed_tokens_mask, decoder_prefix, generate
from streamgen.models.prompt import DeepPrompt, PromptConfig
from streamgen.models.unit_mbart import EOS, PAD, UNIT_OFFSET, DecoderState, pad_sequences, units_to_source


def make_prompt(model, length=6, stacks=("encoder", "decoder")):
    return DeepPrompt(model.cfg, PromptConfig(length, stacks)).init_from_model(model, torch.stack([random_units(20, seed=s) for s in range(3)]))


def prev_tokens(n, seed=1):
    return torch.cat([torch.tensor([EOS]), random_units(n, seed=seed) + UNIT_OFFSET])


def incremental_logits(model, src, prev, prompt_kv):
    state = model.start(src, prompt_kv, capacity=4)  # small capacity: exercises cache growth
    return torch.stack([model.step(state, prev[:, t]) for t in range(prev.shape[1])], dim=1)


def test_incremental_equals_full_forward_without_and_with_prompt(mbart):
    src = units_to_source(random_units(30))[None]
    prev = prev_tokens(120)[None]
    for kv in (None, make_prompt(mbart).shared_kv(mbart)):
        full = mbart(src, prev, kv)
        inc = incremental_logits(mbart, src, prev, kv)
        assert (full - inc).abs().max() <= 1e-5, (full - inc).abs().max()


def test_prompt_changes_the_output(mbart):
    src, prev = units_to_source(random_units(30))[None], prev_tokens(10)[None]
    diff = (mbart(src, prev) - mbart(src, prev, make_prompt(mbart).shared_kv(mbart))).abs().max()
    assert diff > 1e-3


def greedy_by_recompute(model, units, kv, n):
    """Greedy decoding that re-runs the whole decoder for every token (no cache)."""
    src = units_to_source(units)[None]
    allowed = allowed_tokens_mask(model, "cpu")
    allowed[EOS] = False
    prev = torch.tensor([[EOS]])
    for _ in range(n):
        nxt = model(src, prev, kv)[0, -1].masked_fill(~allowed, float("-inf")).argmax()
        prev = torch.cat([prev, nxt.view(1, 1)], dim=1)
    return prev[0, 1:] - UNIT_OFFSET


def test_greedy_units_identical_for_120_steps(lively_mbart):
    m, units = lively_mbart, random_units(25)
    for kv in (None, make_prompt(m).shared_kv(m)):
        fast = generate(m, [units], kv, max_units=120, min_units=120)[0]
        slow = greedy_by_recompute(m, units, kv, 120)
        assert len(fast) == 120
        assert torch.equal(fast, slow)
        assert len(set(fast.tolist())) >= 5  # a varied sequence, not one repeated unit


def test_ragged_batch_equals_each_session_alone(mbart):
    kv = make_prompt(mbart).shared_kv(mbart)
    sources = [units_to_source(random_units(n, seed=n)) for n in (5, 17, 11)]
    already = [0, 9, 4]  # tokens each session has consumed before they are batched
    script = [prev_tokens(30, seed=10 + i) for i in range(3)]

    alone, states = [], []
    for src, n0, toks in zip(sources, already, script):
        st = mbart.start(src[None], kv, capacity=8)
        for t in range(n0):
            mbart.step(st, toks[t : t + 1])
        states.append(st)
        solo = DecoderState.cat([st]).select([0])  # an independent copy to run alone
        alone.append(torch.stack([mbart.step(solo, toks[t : t + 1])[0] for t in range(n0, n0 + 15)]))

    batch = DecoderState.cat(states)
    assert all(p is kv for p in batch.prompts)
    steps = [mbart.step(batch, torch.stack([script[i][already[i] + t] for i in range(3)])) for t in range(15)]
    for i in range(3):
        got = torch.stack([s[i] for s in steps])
        assert (got - alone[i]).abs().max() <= 1e-5
    # a session leaves the batch; the others continue unchanged
    rest = batch.select([0, 2])
    assert rest.lengths.tolist() == [already[0] + 15, already[2] + 15]


def test_batched_generation_equals_single(mbart):
    kv = make_prompt(mbart).shared_kv(mbart)
    units = [random_units(n, seed=n) for n in (8, 21, 14)]
    batched = generate(mbart, units, kv, max_units=40)
    for u, b in zip(units, batched):
        assert torch.equal(generate(mbart, [u], kv, max_units=40)[0], b)


# --- the shared prefix ------------------------------------------------------------------------------


def unshared_logits(model, prompt, src, prev):
    """Reference: the prompt's prefix K/V concatenated in front of every layer's keys and values
    (a per-row copy), plain softmax attention. Written independently of the model's attention."""
    def mha(attn, x, k_in, v_in, mask, prefix):
        B, T, d = x.shape
        H = attn.heads
        q = attn.q_proj(x).view(B, T, H, -1).transpose(1, 2)
        k = attn.k_proj(k_in).view(B, -1, H, d // H).transpose(1, 2)
        v = attn.v_proj(v_in).view(B, -1, H, d // H).transpose(1, 2)
        if prefix is not None:
            pk, pv = attn.k_proj(prefix[0]), attn.v_proj(prefix[1])  # [L, d]
            L = pk.shape[0]
            k = torch.cat([pk.view(L, H, -1).transpose(0, 1).expand(B, H, L, -1), k], dim=2)
            v = torch.cat([pv.view(L, H, -1).transpose(0, 1).expand(B, H, L, -1), v], dim=2)
            mask = torch.cat([torch.ones(*mask.shape[:-1], L, dtype=torch.bool), mask], dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return attn.out_proj(out.transpose(1, 2).reshape(B, T, d))

    def run(stack, x, mask, vectors, cross=None):
        for i, layer in enumerate(stack.layers):
            pre = None if vectors is None else (vectors[0][i], vectors[1][i])
            h = layer.self_attn_layer_norm(x)
            x = x + mha(layer.self_attn, h, h, h, mask, pre)
            if cross is not None:
                h = layer.encoder_attn_layer_norm(x)
                x = x + mha(layer.encoder_attn, h, cross[0], cross[0], cross[1], None)
            x = x + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))
        return stack.layer_norm(x)

    pos = lambda t: torch.arange(t.shape[1])[None] + 2
    enc = run(model.encoder, model.encoder.layernorm_embedding(model.token_embedding(src) + model.encoder.embed_positions(pos(src))),
              src.ne(PAD)[:, None, None, :], (prompt.encoder_k, prompt.encoder_v))
    T = prev.shape[1]
    dec = run(model.decoder, model.decoder.layernorm_embedding(model.token_embedding(prev) + model.decoder.embed_positions(pos(prev))),
              torch.ones(T, T, dtype=torch.bool).tril()[None, None], (prompt.decoder_k, prompt.decoder_v),
              cross=(enc, src.ne(PAD)[:, None, None, :]))
    return F.linear(dec, model.embed_tokens.weight)


def test_two_sessions_share_one_prefix_and_match_the_unshared_recompute(mbart):
    prompt = make_prompt(mbart)
    prev = prev_tokens(25)
    results = []
    states = []
    for n in (12, 12):
        src = units_to_source(random_units(n, seed=n))[None]
        st = mbart.start(src, prompt.shared_kv(mbart))
        states.append(st)
        results.append((src, torch.stack([mbart.step(st, prev[t : t + 1])[0] for t in range(len(prev))])))
    a, b = states
    assert a.prompts[0] is b.prompts[0]  # one object held by reference
    for (ka, va), (kb, vb) in zip(a.prompts[0].decoder, b.prompts[0].decoder):
        assert ka.data_ptr() == kb.data_ptr() and va.data_ptr() == vb.data_ptr()
    for src, inc in results:
        ref = unshared_logits(mbart, prompt, src, prev[None])[0]
        assert (inc - ref).abs().max() <= 1e-5


class TensorUses(TorchDispatchMode):
    """Records every aten op that reads memory of the watched tensors."""

    def __init__(self, watched):
        super().__init__()
        self.ptrs = {t.untyped_storage().data_ptr() for t in watched}
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [a for a in args if isinstance(a, torch.Tensor)] + [a for x in args if isinstance(x, (list, tuple)) for a in x if isinstance(a, torch.Tensor)]
        if any(t.untyped_storage().data_ptr() in self.ptrs for t in flat):
            self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# what may touch a shared prefix in a step: views of it, and the attention of every row's queries to it at once (by
# torch's fused kernels, or by matmuls where those are not used)
PREFIX_ATTENDS = {"bmm", "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention"}
PREFIX_READS = {"transpose", "t", "view", "unsqueeze"} | PREFIX_ATTENDS


def test_decode_step_never_copies_the_prefix(mbart):
    kv = make_prompt(mbart).shared_kv(mbart)
    state = mbart.start(pad_sequences([units_to_source(random_units(n)) for n in (9, 4, 13)]), kv)
    mbart.step(state, torch.full((3,), EOS))
    watched = [t for pair in kv.decoder for t in pair]
    with TensorUses(watched) as uses:
        mbart.step(state, torch.tensor([5, 6, 7]))
    # the prefix is only viewed and read by the folded attention: no cat/expand/clone/copy
    assert uses.ops <= PREFIX_READS, uses.ops
    assert uses.ops & PREFIX_ATTENDS


def test_stepping_some_rows_equals_stepping_every_row_and_reads_nothing_of_the_others(mbart):
    """`step_rows` (the engine's step on CPU): the rows stepped get the logits and cache entries a
    step of every row gives them, through each row's own prompt (two tasks and none in one pool),
    while the other rows' caches, sources and lengths are neither read (NaN there changes nothing)
    nor written; the shared prefix is only read."""
    import copy

    p1, p2 = make_prompt(mbart).shared_kv(mbart), make_prompt(mbart, length=3).shared_kv(mbart)
    src = pad_sequences([units_to_source(random_units(n, seed=n)) for n in (9, 4, 13, 6)])
    state = mbart.start(src, [p1, None, p2, p1], capacity=8)
    for t in range(3):  # ragged caches: rows hold 3, 3, 4 and 6 tokens
        mbart.step(state, torch.tensor([EOS, 5, 6, 7]))
    mbart.step(state, torch.full((4,), 8), active=torch.tensor([False, False, True, True]))
    mbart.step(state, torch.full((4,), 9), active=torch.tensor([False, False, False, True]))
    mbart.step(state, torch.full((4,), 9), active=torch.tensor([False, False, False, True]))
    full = copy.deepcopy(state)
    want = mbart.step(full, torch.tensor([10, 11, 12, 13]))
    rows, others = [3, 0, 2], [1]
    poisoned = copy.deepcopy(state)
    poisoned.grow(16)
    for t in poisoned.k + poisoned.v:
        t[others] = float("nan")
        for r in rows:  # past each row's cache: never read either
            t[r, :, int(poisoned.lengths[r]) :] = float("nan")
    for t in [x for kv in poisoned.cross for x in kv]:
        t[others] = float("nan")
        for r in rows:  # past each row's source
            t[r, :, int(src[r].ne(PAD).sum()) :] = float("nan")
    held = {id(p): p for p in poisoned.prompts if p is not None}.values()  # the (deep-copied) prompts the pool holds
    assert len(held) == 2
    watched = [t for p in held for pair in p.decoder for t in pair]
    with TensorUses(watched) as uses:
        got = mbart.step_rows(poisoned, rows, torch.tensor([13, 10, 12]))
    assert uses.ops <= PREFIX_READS and uses.ops & PREFIX_ATTENDS, uses.ops
    assert torch.isfinite(got).all() and (got - want[rows]).abs().max() <= 1e-5
    assert poisoned.lengths.tolist() == [4, 3, 5, 7] and full.lengths.tolist() == [4, 4, 5, 7]
    for a, w in zip(poisoned.k + poisoned.v, full.k + full.v):
        assert a[others].isnan().all()  # not written
        for r in rows:
            n = int(full.lengths[r])
            assert (a[r, :, :n] - w[r, :, :n]).abs().max() <= 1e-5
    # one row without a prompt (a CPU engine's most common step, taken by a shorter path): the same
    alone = copy.deepcopy(state)
    alone.grow(16)
    for t in alone.k + alone.v:
        t[[0, 2, 3]], t[1, :, int(alone.lengths[1]) :] = float("nan"), float("nan")  # (its new entry is written first)
    for t in [x for kv in alone.cross for x in kv]:
        t[[0, 2, 3]], t[1, :, int(src[1].ne(PAD).sum()) :] = float("nan"), float("nan")
    got = mbart.step_rows(alone, [1], torch.tensor([11]))
    assert torch.isfinite(got).all() and (got - want[[1]]).abs().max() <= 1e-5
    assert alone.lengths.tolist() == [3, 4, 4, 6]
    for a, w in zip(alone.k + alone.v, full.k + full.v):
        assert (a[1, :, :4] - w[1, :, :4]).abs().max() <= 1e-5 and a[[0, 2, 3]].isnan().all()


def test_sampling_is_seeded_and_respects_top_k(lively_mbart):
    from streamgen.models.generation import Sampling, choose

    m, units = lively_mbart, [random_units(12)]
    run = lambda seed, s: generate(m, units, None, max_units=40, min_units=40, sampling=s, seed=seed)[0]
    s = Sampling(greedy=False, temperature=1.5, top_k=5)
    assert torch.equal(run(1, s), run(1, s)) and not torch.equal(run(1, s), run(2, s))
    assert torch.equal(run(1, Sampling(greedy=False, top_k=1)), generate(m, units, None, max_units=40, min_units=40)[0])
    logits = torch.randn(64, TINY.vocab_size)
    allowed = allowed_tokens_mask(m, "cpu")
    B = logits.shape[0]
    picks = choose(logits, allowed[None].expand(B, -1), torch.zeros(B, dtype=torch.bool), torch.ones(B), torch.full((B,), 3),
                   torch.arange(B), torch.zeros(B, dtype=torch.long))
    top3 = logits.masked_fill(~allowed, float("-inf")).topk(3, dim=-1).indices
    assert (top3 == picks[:, None]).any(-1).all()
    assert allowed[picks].all()


def test_prefill_equals_single_steps(mbart):
    kv = make_prompt(mbart).shared_kv(mbart)
    src = pad_sequences([units_to_source(random_units(n, seed=n)) for n in (6, 14)])
    toks = torch.stack([prev_tokens(20, seed=5), prev_tokens(20, seed=6)])
    a = mbart.start(src, kv)
    singles = torch.stack([mbart.step(a, toks[:, t]) for t in range(21)], dim=1)
    b = mbart.start(src, kv, capacity=2)
    pre = torch.cat([mbart.step(b, toks[:, :12]), mbart.step(b, toks[:, 12:])], dim=1)
    assert (pre - singles).abs().max() <= 1e-5 and torch.equal(a.lengths, b.lengths)


def test_an_encoder_stack_in_bfloat16_feeds_the_float32_decoder(mbart):
    """--lm-dtype bfloat16 on a CPU: the encoder stack alone in bfloat16. The decoder, its cache and
    the logits stay float32; incremental decoding still equals the full forward (both read the same
    encoder output), and the prompt's encoder prefix follows the encoder's dtype."""
    import copy

    src, prev = units_to_source(random_units(30))[None], prev_tokens(40)[None]
    prompt = make_prompt(mbart)
    ref = [mbart(src, prev, kv) for kv in (None, prompt.shared_kv(mbart))]
    half = copy.deepcopy(mbart)
    half.encoder.to(torch.bfloat16)
    for kv, want in zip((None, prompt.shared_kv(half)), ref):
        full = half(src, prev, kv)
        assert full.dtype == torch.float32 and half.start(src, kv).k[0].dtype == torch.float32
        assert (full - incremental_logits(half, src, prev, kv)).abs().max() <= 1e-5
        assert 0 < (full - want).abs().max() < 0.05 * want.abs().max()  # bfloat16's rounding, no more
    assert prompt.shared_kv(half).encoder[0][0].dtype == torch.bfloat16 and prompt.shared_kv(mbart).encoder[0][0].dtype == torch.float32


def test_the_decoder_counts_its_steps_and_the_rows_they_advance(mbart):
    """What bench/sessions.py reports as "decoder steps (rows each)": two decodes of 5 and 9 units
    admitted together (their first units come from the prefill) share 4 steps, then the longer one
    steps alone 4 more times."""
    dec = Decoder(mbart)
    for key, n in (("a", 5), ("b", 9)):
        dec.submit(key, Request(units_to_source(random_units(12, seed=n)), decoder_prefix(), max_new=n, min_new=n))
    got, left = {"a": [], "b": []}, [dec.left]
    while dec.busy:
        for key, units, _ in dec.step():
            got[key] += units
        left.append(dec.left)
    assert [len(got["a"]), len(got["b"])] == [5, 9]
    assert (dec.steps, dec.rows_stepped) == (8, 4 * 2 + 4)
    assert left == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]  # the most tokens a decode in flight may still produce


def test_admissions_padded_to_the_gpus_grid_decode_what_they_decode_unpadded(lively_mbart):
    """On a GPU a batch of admissions is rounded up to the grid in rows and in source and prefix lengths (extra
    rows hold </s> alone): eleven requests with ragged sources and prefixes, some prompted, joining at three
    steps, decode the same units as without the padding, and the padded shapes are the grid's."""
    from streamgen.models.shapes import gpu_shapes, grid

    m = lively_mbart
    kv = make_prompt(m).shared_kv(m)
    lengths = [5, 14, 8, 30, 11, 3, 20, 26, 9, 17, 36]
    requests = [Request(units_to_source(random_units(n, seed=n)), decoder_prefix((), random_units(i % 4, seed=i)), 12, 12,
                        prompt=kv if i % 3 else None, seed=i) for i, n in enumerate(lengths)]
    joins = {0: range(0, 2), 2: range(2, 11), 3: range(11, 11)}

    def decode() -> tuple[dict, list]:
        dec, out, shapes = Decoder(m, slots=2), {i: [] for i in range(11)}, []
        start = m.start
        m.start = lambda src, *a, **kw: shapes.append(tuple(src.shape)) or start(src, *a, **kw)
        try:
            for step in range(40):
                for i in joins.get(step, []):
                    dec.submit(i, requests[i])
                for key, units, _ in dec.step():
                    out[key] += units
        finally:
            m.start = start
        return out, shapes

    plain, plain_shapes = decode()
    with gpu_shapes():
        padded, padded_shapes = decode()
    assert all(len(u) == 12 for u in plain.values()) and len({tuple(u) for u in plain.values()}) > 1
    assert padded == plain
    assert plain_shapes == [(2, 15), (9, 37)]  # sources end with </s>
    assert padded_shapes == [(2, 16), (10, 40)] == [(grid(2), grid(15)), (grid(9), grid(37))]
