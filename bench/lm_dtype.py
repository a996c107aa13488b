"""float32 against bfloat16 for the shipped translation backbone on this machine, in one run: the
source encode (what `--lm-dtype bfloat16` casts on a CPU) and a one-token decoder step of a batch.
Whether bfloat16 pays depends on the CPU: with AMX or AVX-512 BF16 the encode runs ~3.4x faster;
without them torch emulates bfloat16 and it runs several times slower (bench/RESULTS.md).

    OMP_NUM_THREADS=1 python bench/lm_dtype.py [--bundle DIR] [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from streamgen import load_bundle
from streamgen.models.unit_mbart import pad_sequences, units_to_source
from streamgen.options import cpu_has_bfloat16_arithmetic


def best_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1000


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    b = load_bundle(args.bundle)
    m32 = copy.deepcopy(b.backbone("translation")).eval()
    m16 = b.lm_to(torch.bfloat16).backbone("translation").eval()  # --lm-dtype bfloat16 on a CPU
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, bfloat16 arithmetic: {'yes' if cpu_has_bfloat16_arithmetic() else 'no'}")
    print("| call | float32 (ms) | bfloat16 (ms) | bfloat16 / float32 |\n|---|---|---|---|")
    for rows, length in ((1, 300), (8, 150)):
        src = pad_sequences([units_to_source(torch.randint(0, 500, (length,))) for _ in range(rows)])
        a, c = (best_ms(lambda m=m: m.encode(src), args.repeats) for m in (m32, m16))
        print(f"| encode {rows} x {length} units | {a:.1f} | {c:.1f} | {c / a:.2f} |")
    src = pad_sequences([units_to_source(torch.randint(0, 500, (150,))) for _ in range(8)])
    tokens = torch.randint(4, 504, (8,))
    for name, m in (("float32", m32), ("bfloat16 (whole backbone)", copy.deepcopy(m32).to(torch.bfloat16))):
        state = m.start(src, capacity=64)
        state.lengths += 20  # a decode 20 tokens in
        ms = best_ms(lambda m=m, state=state: m.step(state, tokens, grow=False), args.repeats)
        print(f"one-token decoder step, 8 rows, {name}: {ms:.2f} ms")


if __name__ == "__main__":
    main()
