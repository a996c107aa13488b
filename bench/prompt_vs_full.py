"""The paper's comparison in miniature, measured without the vocoder or the ASR: held-out
teacher-forced cross-entropy per unit (and greedy next-unit accuracy) of the frozen backbone with no
prompt, with the trained prompt, and after full fine-tuning on the same data for the same steps.

    python bench/prompt_vs_full.py --bundle B --runs runs/default --pairs runs/default/corpus
      (expects B's prompts, RUNS/full_<task>/best_mbart.safetensors and PAIRS/<task>_test.tsv)
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from streamgen.bundle import load_bundle
from streamgen.models.unit_mbart import PAD
from streamgen.train.data import collate, read_pairs

TASKS = ("continuation", "inpainting", "translation")


@torch.no_grad()
def score(model, prompt, pairs, batch_size: int = 16) -> tuple[float, float]:
    """(cross-entropy per target unit, accuracy of the most likely next unit), teacher-forced."""
    kv = prompt.kv(model) if prompt is not None else None
    loss, correct, n = 0.0, 0, 0
    for i in range(0, len(pairs), batch_size):
        b = collate(pairs[i : i + batch_size], model.cfg.mask_token)  # as train-prompt collates (no forced prefix)
        logits = model(b.src, b.prev, kv).float()
        keep = b.target != PAD
        loss += float(F.cross_entropy(logits[keep], b.target[keep], reduction="sum"))
        correct += int((logits.argmax(-1)[keep] == b.target[keep]).sum())
        n += int(keep.sum())
    return loss / n, correct / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--runs", required=True, type=Path)
    ap.add_argument("--pairs", required=True, type=Path)
    args = ap.parse_args()
    b = load_bundle(args.bundle)
    model = b.need("mbart").eval()
    trainable = {t: sum(p.numel() for p in b.prompts[t].parameters()) for t in TASKS if t in b.prompts}
    total = sum(p.numel() for p in model.parameters())
    print("| task | test pairs | no prompt: loss / acc | prompt tuning: loss / acc (trainable) | full fine-tuning: loss / acc (trainable) |")
    print("|---|---|---|---|---|")
    for task in TASKS:
        pairs = read_pairs(args.pairs / f"{task}_test.tsv")
        none = score(model, None, pairs)
        tuned = score(model, b.prompts[task], pairs)
        full_model = copy.deepcopy(model)
        full_model.load_state_dict(load_file(str(args.runs / f"full_{task}" / "best_mbart.safetensors")))
        full = score(full_model.eval(), None, pairs)
        print(f"| {task} | {len(pairs)} | {none[0]:.3f} / {none[1]:.3f} | {tuned[0]:.3f} / {tuned[1]:.3f} "
              f"({trainable[task]:,}, {100 * trainable[task] / (total + trainable[task]):.2f} %) | {full[0]:.3f} / {full[1]:.3f} ({total:,}, 100 %) |")


if __name__ == "__main__":
    main()
