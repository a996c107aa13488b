#!/usr/bin/env bash
# Issue 12's chain, as far as it has been run: natural-sentence corpora and test sets -> log-mel k-means
# units (several voices) -> source-filter vocoder -> resynthesis measured beside the originals -> a bundle
# -> units for the Unit mBART -> denoising pretraining. Every long step is resumable by rerunning it.
#
#   R=/work/runs/natural bash recipes/natural.sh          # CPU, one thread per job (about 1.5 h)
#   DEVICE=cuda ...                                       # the vocoder on a GPU (6 minutes on an H200 gave the figures in QUALITY.md)
#
# Needs Debian flite (apt-get install flite) and espeak-ng for the voices. Run directories stay outside the work tree. bench/QUALITY.md ("Natural sentences") holds what each step measured.
set -euo pipefail
cd "$(dirname "$0")/.."
R=${R:-/work/runs/natural}
C=$R/corpus
DEVICE=${DEVICE:-cpu}
export OMP_NUM_THREADS=1
PY=.venv/bin/python

# 1. corpora: 800 piper-joe training sentences, 450 in flite awb/kal16/slt (units only), 40 test sentences in
#    piper joe, flite rms and espeak-ng en-us (rms and espeak are in no training set)
[ -f "$C/nat_test_espeak.tsv" ] || $PY -m streamgen.train.natural --out "$C"
# 2. log-mel k-means units, K = 500, fitted on every training voice (and, for comparison, on piper joe alone)
[ -f "$R/units_multi/config.json" ] || $PY -m streamgen.train.source_filter units --manifest "$C/nat_train.tsv" "$C/nat_voices.tsv" --out "$R/units_multi"
[ -f "$R/units_joe/config.json" ] || $PY -m streamgen.train.source_filter units --manifest "$C/nat_train.tsv" --out "$R/units_joe"
# 3. the source-filter vocoder on piper joe: frame units, analysed F0 and voicing, audio; then training
[ -f "$R/voc_data_multi.pt" ] || $PY -m streamgen.train.source_filter prepare --manifest "$C/nat_train.tsv" --encoder "$R/units_multi" --out "$R/voc_data_multi.pt"
if [ "$DEVICE" = cpu ]; then
  $PY -m streamgen.train.source_filter train --data "$R/voc_data_multi.pt" --out "$R/sf_cpu" --steps 4000 --batch-size 8 --segment 32
  VOC=$R/sf_cpu
else
  $PY -m streamgen.train.source_filter train --data "$R/voc_data_multi.pt" --out "$R/sf_gpu" --device "$DEVICE" --batch-size 32 --segment 64 \
    --steps 100000 --minutes 6.3 --lr 1.5e-3 --keep-every 3000
  VOC=$R/sf_gpu
fi
# 4. resynthesis of the natural test sentences, beside Whisper on the originals and today's default bundle
$PY bench/natural_resynthesis.py --encoder "$R/units_multi" --vocoder "$VOC" --bundle streamgen/assets/default \
  --test "$C/nat_test_joe.tsv" "$C/nat_test_rms.tsv" "$C/nat_test_espeak.tsv" --json "$R/eval.json" --save "$R/samples"
$PY bench/natural_resynthesis.py --encoder "$R/units_joe" --test "$C/nat_test_joe.tsv" "$C/nat_test_rms.tsv" "$C/nat_test_espeak.tsv" \
  --json "$R/eval_units_joe.json"
# 5. a bundle of the two parts; units of the training speech; Unit mBART denoising pretraining on them
$PY -m streamgen.train.source_filter bundle --encoder "$R/units_multi" --vocoder "$VOC" --out "$R/bundle"
mkdir -p "$R/lm"
.venv/bin/streamgen units --manifest "$C/nat_train.tsv" --out "$R/lm/nat_train.units.tsv" --bundle "$R/bundle"
{ head -1 "$R/lm/nat_train.units.tsv"; sed -n 2,761p "$R/lm/nat_train.units.tsv"; } > "$R/lm/lm_train.units.tsv"
{ head -1 "$R/lm/nat_train.units.tsv"; sed -n 762,801p "$R/lm/nat_train.units.tsv"; } > "$R/lm/lm_dev.units.tsv"
RESUME=; [ -d "$R/lm/backbone" ] && RESUME=--resume
.venv/bin/streamgen train-backbone --bundle "$R/bundle" --train "$R/lm/lm_train.units.tsv" --dev "$R/lm/lm_dev.units.tsv" \
  --out "$R/lm/backbone" --device "$DEVICE" --into-bundle --dim 128 --layers 3 --heads 4 --ffn 512 --epochs 60 --batch-size 16 --patience 6 $RESUME
