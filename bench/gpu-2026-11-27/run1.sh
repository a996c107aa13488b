#!/usr/bin/env bash
# issue 12 on a lent GPU: continue the d 256 en+es backbone's denoising pretraining from its epoch 18
# (fresh Adam, the original schedule's remaining lr), then three full fine-tunes on the travel pairs in
# parallel (dropout / lr variants); the best weights come back in fp16.
#   DEVICE=cuda PRE_S=270 FT_S=170 bash .gpucarry/run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
C=.gpucarry; OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"; W=${WORK:-/tmp/w}; rm -rf $W; mkdir -p $W
DEV=${DEVICE:-cuda}; PRE_S=${PRE_S:-270}; FT_S=${FT_S:-170}; PROBE=${PROBE:-200}
export PYTHONUNBUFFERED=1
if [ "$DEV" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . 2>&1 | tail -1
  export PYTHONPATH=/tmp/site:$PWD
  SG="python3 -c 'from streamgen.cli import app; app()'"
  { date -u +%FT%H:%MZ; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python3 -c "import torch; print('torch', torch.__version__)"; } | tee $OUT/device.txt
else
  SG=".venv/bin/streamgen"
fi
sg() { eval "$SG" '"$@"'; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# 1. probe: steps per second at batch 32
t0=$(date +%s.%N)
sg train-backbone --bundle $C/b18 --train $C/lm_train.units.tsv --out $W/probe --device $DEV \
  --lr 1e-4 --epochs 1 --max-steps $PROBE --batch-size 32 --save-minutes 0 > $W/probe.log 2>&1
t1=$(date +%s.%N)
N=$(wc -l < $C/lm_train.units.tsv)
E=$(python3 -c "
import math; rate = $PROBE / ($t1 - $t0); per = math.ceil(($N - 1) / 32)
print(max(1, min(22, int(rate * $PRE_S / per))))")
echo "probe: $PROBE steps in $(python3 -c "print(round($t1 - $t0, 1))") s -> pretraining $E epochs at batch 32" | tee $OUT/summary.txt
tail -2 $W/probe.log
# 2. pretraining continued (epoch 18's lr on the 40-epoch schedule was 2.75e-4 at batch 16; x sqrt 2 for 32)
timeout $((PRE_S + 40)) bash -c "$SG"' train-backbone --bundle '$C/b18' --train '$C/lm_train.units.tsv' --dev '$C/lm_dev.units.tsv' \
  --out '$W/pre' --device '$DEV' --lr 3.9e-4 --warmup 100 --epochs '$E' --batch-size 32 --patience 6 --save-minutes 0' \
  > $W/pre.log 2>&1
grep -E "^epoch|done|early" $W/pre.log | tee -a $OUT/summary.txt
cp $W/pre.log $OUT/pre.log
START=$W/pre/best_mbart.safetensors; [ -f $START ] || START=$C/b18/mbart.safetensors
# 3. three full fine-tunes in parallel
for v in "a 0.1 5e-4" "b 0.3 5e-4" "c 0.2 3e-4"; do
  set -- $v
  mkdir -p $W/b_$1; cp $C/b18/logmel_units.safetensors $W/b_$1/; cp $START $W/b_$1/mbart.safetensors
  python3 -c "
import json; c = json.load(open('$C/b18/bundle.json')); c['parts']['mbart']['dropout'] = $2
json.dump(c, open('$W/b_$1/bundle.json', 'w'), indent=2)"
  (timeout $FT_S bash -c "$SG"' train-prompt --full --bundle '$W/b_$1' --task translation --train '$C/tr_train.tsv' \
     --dev '$C/tr_dev.tsv' --out '$W/ft_$1' --device '$DEV' --lr '$3' --epochs 16 --batch-size 16 --patience 4 --save-minutes 0' \
     > $W/ft_$1.log 2>&1; echo "ft $1 (dropout $2, lr $3) rc $?" >> $W/ft_rc) &
done
wait
cat $W/ft_rc | tee -a $OUT/summary.txt
for v in a b c; do echo "== ft $v"; grep -E "^epoch|done|early" $W/ft_$v.log; done | tee -a $OUT/summary.txt
# 4. fp16 weights back: the continued backbone and the two fine-tunes with the lowest dev loss
${PY:-python3} - "$W" "$OUT" <<'EOF' | tee -a $OUT/summary.txt
import json, os, sys
import torch
from safetensors.torch import load_file, save_file
w, out = sys.argv[1:]
def half(src, dst):
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(src).items()}, dst)
if os.path.exists(f"{w}/pre/best_mbart.safetensors"):
    half(f"{w}/pre/best_mbart.safetensors", f"{out}/pre_best_fp16.safetensors")
    print("pretrained:", json.load(open(f"{w}/pre/task.json"))["dev_loss"])
runs = []
for v in "abc":
    if os.path.exists(f"{w}/ft_{v}/task.json") and os.path.exists(f"{w}/ft_{v}/best_mbart.safetensors"):
        runs.append((json.load(open(f"{w}/ft_{v}/task.json"))["dev_loss"], v))
for loss, v in sorted(runs)[:2]:
    half(f"{w}/ft_{v}/best_mbart.safetensors", f"{out}/ft_{v}_fp16.safetensors")
    print(f"fine-tune {v}: best dev {loss:.4f} -> ft_{v}_fp16.safetensors")
EOF
ls -la $OUT
