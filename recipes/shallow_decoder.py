"""Cut a bundle's translation backbone to a shallow decoder (deep encoder, shallow decoder: Kasai et al., 2021,
arXiv 2006.10369): keep the decoder layers named, renumbered; everything else as it is. Fine-tune the result as
the shipped backbone was (recipes/natural.sh step 11e; bench/QUALITY.md and bench/RESULTS.md have the figures):

    python recipes/shallow_decoder.py SHIPPED_FP32_BUNDLE OUT 0,3
    streamgen train-prompt --full --bundle OUT --task translation --train tr_train.tsv --dev tr_dev.tsv --out RUN \
        --lr 2e-4 --warmup 50 --epochs 3 --batch-size 16 --patience 3 --dropout 0.3 --wait-k 30 --wait-ratio 1.0 --into-bundle
"""

import argparse
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path, help="a bundle with a translation backbone (float32, as training needs)")
    ap.add_argument("out", type=Path, help="the new bundle (must not exist)")
    ap.add_argument("keep", help="decoder layers to keep, e.g. 0,3")
    args = ap.parse_args()
    keep = [int(x) for x in args.keep.split(",")]
    meta = json.loads((args.bundle / "bundle.json").read_text())
    cfg = meta.get("backbones", {}).get("translation")
    if cfg is None:
        raise SystemExit(f"{args.bundle}: no translation backbone to cut")
    if not keep or any(not 0 <= i < cfg["decoder_layers"] for i in keep) or sorted(set(keep)) != keep:
        raise SystemExit(f"keep {args.keep}: expected increasing layer numbers of 0..{cfg['decoder_layers'] - 1}")
    layers = cfg["decoder_layers"]
    shutil.copytree(args.bundle, args.out)
    weights = load_file(args.bundle / "backbones" / "translation.safetensors")
    cut = {}
    for k, v in weights.items():
        if k.startswith("decoder.layers."):
            i = int(k.split(".")[2])
            if i in keep:
                cut[k.replace(f"decoder.layers.{i}.", f"decoder.layers.{keep.index(i)}.", 1)] = v
        else:
            cut[k] = v
    save_file(cut, args.out / "backbones" / "translation.safetensors")
    cfg["decoder_layers"] = len(keep)
    (args.out / "bundle.json").write_text(json.dumps(meta, indent=2))
    print(f"{args.out}: the translation decoder keeps layers {keep} of {layers}")


if __name__ == "__main__":
    main()
