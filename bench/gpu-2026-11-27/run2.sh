#!/usr/bin/env bash
# issue 12 on a lent GPU, second call: from the first call's continued backbone (dev 0.931), at the same time
#   - the denoising pretraining goes on (its weights come back for fine-tunes on the CPU later);
#   - two full fine-tunes on the travel pairs with schedules that end inside the call.
#   DEVICE=cuda T=330 bash .gpucarry/run2.sh
set -uo pipefail
cd "$(dirname "$0")/.."
C=.gpucarry; OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"; W=${WORK:-/tmp/w}; rm -rf $W; mkdir -p $W
DEV=${DEVICE:-cuda}; T=${T:-330}; PE=${PE:-5}; FE=${FE:-10}; PY=${PY:-python3}
export PYTHONUNBUFFERED=1
if [ "$DEV" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . 2>&1 | tail -1
  export PYTHONPATH=/tmp/site:$PWD
  SG="python3 -c 'from streamgen.cli import app; app()'"
  { date -u +%FT%H:%MZ; nvidia-smi --query-gpu=name --format=csv,noheader; } | tee $OUT/device2.txt
else
  SG=".venv/bin/streamgen"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# the start in fp32, one bundle per run (dropout differs)
for v in "p 0.1" "b 0.3" "c 0.2"; do
  set -- $v; mkdir -p $W/b_$1; cp $C/b1/logmel_units.safetensors $W/b_$1/
  $PY -c "
import json
from safetensors.torch import load_file, save_file
save_file({k: v.float() for k, v in load_file('$C/b1/pre1_fp16.safetensors').items()}, '$W/b_$1/mbart.safetensors')
c = json.load(open('$C/b1/bundle.json')); c['parts']['mbart']['dropout'] = $2
json.dump(c, open('$W/b_$1/bundle.json', 'w'), indent=2)"
done
(timeout $T bash -c "$SG"' train-backbone --bundle '$W/b_p' --train '$C/lm_train.units.tsv' --dev '$C/lm_dev.units.tsv' \
  --out '$W/pre' --device '$DEV' --lr 3e-4 --warmup 50 --epochs '$PE' --batch-size 32 --patience 6 --save-minutes 0' \
  > $W/pre.log 2>&1; echo "pretraining rc $?" >> $W/rc) &
for v in "b 5e-4" "c 3e-4"; do
  set -- $v
  (timeout $T bash -c "$SG"' train-prompt --full --bundle '$W/b_$1' --task translation --train '$C/tr_train.tsv' \
     --dev '$C/tr_dev.tsv' --out '$W/ft_$1' --device '$DEV' --lr '$2' --epochs '$FE' --batch-size 16 --patience 4 --save-minutes 0' \
     > $W/ft_$1.log 2>&1; echo "ft $1 (lr $2) rc $?" >> $W/rc) &
done
wait
cat $W/rc | tee $OUT/summary2.txt
for v in pre ft_b ft_c; do echo "== $v"; grep -E "^epoch|done|early" $W/$v.log; done | tee -a $OUT/summary2.txt
$PY - "$W" "$OUT" <<'EOF' | tee -a $OUT/summary2.txt
import json, os, sys
from safetensors.torch import load_file, save_file
w, out = sys.argv[1:]
for run in ("pre", "ft_b", "ft_c"):
    src = f"{w}/{run}/best_mbart.safetensors"
    if os.path.exists(src):
        save_file({k: v.half() for k, v in load_file(src).items()}, f"{out}/{run}2_fp16.safetensors")
        print(run, "best dev", json.load(open(f"{w}/{run}/task.json"))["dev_loss"])
EOF
