"""Decode-step benchmark for Unit mBART (random weights), printed as ratios measured in one run.

1. One new unit with the K/V cache (`step`) vs recomputing the decoder over everything generated
   (`decode`), after 50 / 150 / 300 generated units; tiny and full (mbart_large) sizes; batch 1.
2. One step for many sessions with a shared 200-vector deep prompt vs no prompt (aim <= 1.1x), and
   the naive alternative that expands the prefix and concatenates it to every session's cache; the
   operators each step dispatches (a kernel each on a GPU, where a step is bound by their launches), and
   which attention a prompted step took (a fused kernel, or ten operators where that is unavailable).
3. The serving engine's decode loop (`models.generation.Decoder`: K/V slots, masked steps, per-row
   sampling, reading the tick's tokens back) for N running sessions, against the bare model step
   of section 2 (the plain-PyTorch ceiling, with --cuda-graphs its graph-captured form); with
   --cuda-graphs the Decoder runs its own captured static steps too.
4. With --cuda-graphs: the same decodes (greedy, 150-unit sources, requests joining over time) through
   the Decoder with and without graphs; how many of the unit sequences are identical.

    python bench/decode.py                        # CPU, both sizes
    python bench/decode.py --device cuda --cuda-graphs
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from streamgen.models import attention
from streamgen.models.generation import Decoder, Request, Sampling, decoder_prefix
from streamgen.models.prompt import DeepPrompt, PromptConfig
from streamgen.models.unit_mbart import UNIT_OFFSET, DecoderState, UnitMBart, UnitMBartConfig, units_to_source
from streamgen.testing import TINY_MBART
from streaming_vocoder import Counts  # (bench/ is on the path when a bench script runs)

FULL = UnitMBartConfig()  # 12 + 12 layers, d=1024, 16 heads, FFN 4096


def timeit(fn, device, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def state_at(model: UnitMBart, sessions: int, src_len: int, generated: int, prompt) -> DecoderState:
    """A decoder state as after `generated` steps over a `src_len` source. Caches hold random K/V
    (timing only), so no encoder pass is needed to build it."""
    dev, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    H = model.cfg.heads
    D = model.cfg.dim // H
    n = len(model.decoder.layers)
    rand = lambda length: torch.randn(sessions, H, length, D, device=dev, dtype=dtype)
    return DecoderState(
        k=[rand(generated + 8) for _ in range(n)],
        v=[rand(generated + 8) for _ in range(n)],
        lengths=torch.full((sessions,), generated, dtype=torch.long, device=dev),
        cross=[(rand(src_len), rand(src_len)) for _ in range(n)],
        src_mask=torch.ones(sessions, src_len, dtype=torch.bool, device=dev),
        prompts=[prompt] * sessions,
    )


def step_fn(model, st, cuda_graphs: bool):
    """One decode step that leaves the state as it found it (lengths restored), so it can repeat."""
    tokens = torch.full((st.batch_size,), UNIT_OFFSET + 1, device=st.lengths.device)
    n0 = st.lengths.clone()

    def run():
        model.step(st, tokens, grow=False)
        st.lengths.copy_(n0)  # keep the cache length fixed across repeats

    if not cuda_graphs:
        return run
    st.grow(int(n0.max()) + 1)  # no reallocation inside the graph
    run()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    return g.replay


def naive_step_fn(model, st, prompt_kv):
    """The step as if the prefix were expanded to every session and concatenated to its cache."""
    H, L = model.cfg.heads, prompt_kv.decoder[0][0].shape[1]
    B = st.batch_size
    tokens = torch.full((B,), UNIT_OFFSET + 1, device=st.lengths.device)
    saved = [(layer.self_attn.forward) for layer in model.decoder.layers]

    def concat_forward(attn, prefix):
        def fwd(x, k, v, mask, _prefix=None):
            q = attn.split(attn.q_proj(x))
            kk = torch.cat([prefix[0].expand(B, H, L, -1), k], dim=2)  # copies the prefix per session
            vv = torch.cat([prefix[1].expand(B, H, L, -1), v], dim=2)
            m = torch.cat([mask.new_ones(B, 1, 1, L), mask], dim=-1)
            out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=m)
            return attn.out_proj(out.transpose(1, 2).reshape(B, x.shape[1], -1))
        return fwd

    n0 = st.lengths.clone()

    def run():
        for layer, prefix in zip(model.decoder.layers, prompt_kv.decoder):
            layer.self_attn.forward = concat_forward(layer.self_attn, prefix)
        try:
            model.step(st, tokens)
        finally:
            for layer, f in zip(model.decoder.layers, saved):
                layer.self_attn.forward = f
            st.lengths.copy_(n0)

    return run


def bench_cache(cfg, name, device, dtype, repeats, src_len=150):
    torch.manual_seed(0)
    model = UnitMBart(cfg).to(device, dtype).eval()
    rows = []
    with torch.no_grad():
        src = torch.randint(UNIT_OFFSET, UNIT_OFFSET + cfg.num_units, (1, src_len), device=device)
        enc = model.encode(src)
        mask = torch.ones(1, src_len, dtype=torch.bool, device=device)
        for n in (50, 150, 300):
            st = state_at(model, 1, src_len, n, None)
            t_step = timeit(step_fn(model, st, False), device, repeats)
            prev = torch.randint(UNIT_OFFSET, UNIT_OFFSET + cfg.num_units, (1, n + 1), device=device)
            t_full = timeit(lambda: model.decode(prev, enc, mask), device, max(3, repeats // 4))
            rows.append((name, n, t_step * 1e3, t_full * 1e3, t_full / t_step))
    return rows


def bench_prompt(cfg, name, device, dtype, repeats, sessions, cuda_graphs, generated=150, src_len=150, length=200):
    torch.manual_seed(0)
    model = UnitMBart(cfg).to(device, dtype).eval().requires_grad_(False)
    prompt = DeepPrompt(cfg, PromptConfig(length=length)).to(device)
    with torch.no_grad():
        for p in prompt.parameters():
            p.normal_()
        kv = prompt.shared_kv(model)
        ops = [operators(step_fn(model, state_at(model, sessions, src_len, generated, p), False)) for p in (None, kv)]
        t_plain = timeit(step_fn(model, state_at(model, sessions, src_len, generated, None), cuda_graphs), device, repeats)
        t_prompt = timeit(step_fn(model, state_at(model, sessions, src_len, generated, kv), cuda_graphs), device, repeats)
        t_naive = timeit(naive_step_fn(model, state_at(model, sessions, src_len, generated, kv), kv), device, repeats)
    return name, sessions, t_plain * 1e3, t_prompt * 1e3, t_naive * 1e3, *ops


def operators(run) -> int:
    """The operators one eager step dispatches (each a kernel on a GPU, what a replayed step is made of), after a
    first step (which makes what is kept between steps)."""
    run()
    with Counts() as counts:
        run()
    return counts.ops


def bench_engine(cfg, name, device, dtype, sessions, cuda_graphs, repeats=20, generated=150, src_len=150):
    """ms per Decoder.step with `sessions` running requests (each holding `generated` cached units)
    vs the bare model step over the same batch."""
    torch.manual_seed(0)
    model = UnitMBart(cfg).to(device, dtype).eval().requires_grad_(False)
    dec = Decoder(model, slots=sessions, graphs=cuda_graphs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(sessions):
            src = units_to_source(torch.randint(0, cfg.num_units, (src_len,), generator=g))
            prefix = decoder_prefix(committed=torch.randint(0, cfg.num_units, (generated,), generator=g))
            dec.submit(i, Request(src, prefix, max_new=10_000, min_new=10_000, sampling=Sampling()))
        dec.step()  # admit everyone (batched encode + prefill)
        dec.step()
        dec.step()  # (captures the graph when there is one)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            dec.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        bare = timeit(step_fn(model, state_at(model, sessions, src_len, generated, None), cuda_graphs), device, repeats)
    return name, sessions, statistics.median(times) * 1e3, bare * 1e3


def graph_agreement(cfg, device, dtype, requests=24, max_new=60, src_len=150) -> tuple[int, int, float]:
    """Greedy decodes through the Decoder with and without CUDA graphs (requests joining two per
    step): (identical sequences, requests, fraction of identical units)."""
    torch.manual_seed(0)
    model = UnitMBart(cfg).to(device, dtype).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    srcs = [units_to_source(torch.randint(0, cfg.num_units, (src_len - i,), generator=g)) for i in range(requests)]
    outs = []
    with torch.no_grad():
        for graphs in (False, True):
            dec, out = Decoder(model, slots=requests, graphs=graphs), {i: [] for i in range(requests)}
            step = 0
            while step < 2 * requests or dec.busy:
                for i in (2 * step, 2 * step + 1):
                    if i < requests:
                        dec.submit(i, Request(srcs[i], decoder_prefix(), max_new=max_new, min_new=max_new))
                for key, units, _ in dec.step():
                    out[key] += units
                step += 1
            outs.append(out)
    same = sum(outs[0][i] == outs[1][i] for i in range(requests))
    units = sum(sum(a == b for a, b in zip(outs[0][i], outs[1][i])) for i in range(requests))
    return same, requests, units / (requests * max_new)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--sizes", default="tiny,full")
    ap.add_argument("--sessions", type=int, default=256)
    ap.add_argument("--engine-sessions", default="1,16,256", help="session counts for the engine's decode loop (section 3)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--cuda-graphs", action="store_true", help="capture the prompt/no-prompt steps in CUDA graphs")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sizes = {"tiny": TINY_MBART, "full": FULL}
    chosen = [(n, sizes[n]) for n in args.sizes.split(",")]
    what = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# decode benchmark: {what}, {args.dtype}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("\n## K/V cache vs full recompute (batch 1, 150-unit source): time for one new unit")
    print("| size | generated | step, cache (ms) | full recompute (ms) | recompute / cache |\n|---|---|---|---|---|")
    for name, cfg in chosen:
        for row in bench_cache(cfg, name, device, dtype, args.repeats):
            print("| %s | %d | %.2f | %.2f | %.1fx |" % row)
    print(f"\n## Shared 200-vector prompt vs none ({args.sessions} sessions, 150 cached units, 150-unit source)")
    print("| size | sessions | no prompt (ms) | shared prefix (ms) | prefix / none | naive concat (ms) | naive / none | operators a step (none / prefix) |\n|---|---|---|---|---|---|---|---|")
    for name, cfg in chosen:
        n, s, plain, shared, naive, ops_plain, ops_prompt = bench_prompt(cfg, name, device, dtype, args.repeats, args.sessions, args.cuda_graphs)
        print(f"| {n} | {s} | {plain:.2f} | {shared:.2f} | {shared / plain:.3f}x | {naive:.2f} | {naive / plain:.2f}x | {ops_plain} / {ops_prompt} |")
    how = {True: "one fused kernel with its log-sum-exp", False: "ten operators (the fused kernel unavailable or differing here)"}
    print("\nA prompted step's attention to its own keys and to the prefix: "
          + "; ".join(f"{d} {str(t).removeprefix('torch.')} {'with' if m else 'without'} a mask: {how[ok]}"
                      for (d, t, m), ok in attention._fused_ok.items()))
    print(f"\n## The engine's decode loop vs the bare model step ({'CUDA graph' if args.cuda_graphs else 'eager'}), 150 cached units, 150-unit source")
    print("| size | sessions | Decoder.step (ms) | bare step (ms) | engine / bare |\n|---|---|---|---|---|")
    for name, cfg in chosen:
        for n in (int(x) for x in args.engine_sessions.split(",")):
            _, s, eng, bare = bench_engine(cfg, name, device, dtype, n, args.cuda_graphs)
            print(f"| {name} | {s} | {eng:.2f} | {bare:.2f} | {eng / bare:.2f}x |", flush=True)
    if args.cuda_graphs:
        print("\n## Decoder with CUDA graphs vs eager: greedy units (24 requests joining two per step, 60 units each)")
        print("| size | dtype | identical sequences | identical units |\n|---|---|---|---|")
        for name, cfg in chosen:
            for dt in dict.fromkeys([torch.float32, dtype]):
                same, n, frac = graph_agreement(cfg, device, dt)
                print(f"| {name} | {str(dt).split('.')[-1]} | {same}/{n} | {100 * frac:.1f} % |", flush=True)


if __name__ == "__main__":
    main()
