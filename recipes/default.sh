#!/usr/bin/env bash
# The default bundle, from nothing: corpus -> unit encoder -> units -> Unit mBART (denoising)
# -> task prompts -> vocoder -> evaluation. Every step is a streamgen command; a rerun resumes the training
# runs it finds in OUT (--resume). Sizes come from the environment:
#
#   DEVICE=cuda bash recipes/default.sh                       # full size (a GPU, hours)
#   DEVICE=cpu SCALE=cpu bash recipes/default.sh              # the shipped default bundle: ~2 h on a 2-core CPU
#   DEVICE=cpu SCALE=smoke bash recipes/default.sh            # minutes on a CPU: proves the chain, not quality
#   SHIP=1 ...                                                # also pack the result (fp16) into streamgen/assets/default
#
# The vocoder only needs the units, so it trains beside the Unit mBART and the prompts (on a CPU each
# job gets one thread: two cores, two jobs).
set -euo pipefail
cd "$(dirname "$0")/.."
resume() { if [ -f "$1/${2:-state.pt}" ]; then echo --resume; fi; }  # a run found in its --out is continued, never overwritten
OUT=${OUT:-runs/default}
DEVICE=${DEVICE:-cuda}
THREADS=
SCALE=${SCALE:-full}
if [ "$SCALE" = smoke ]; then
  N_TRAIN=${N_TRAIN:-40}; N_DEV=${N_DEV:-8}; N_TEST=${N_TEST:-8}; UNITS=${UNITS:-50}
  UNIT_ARGS="--dim 64 --layers 2 --heads 4 --ffn 128 --conv-dim 64 --output-layer 2 --steps ${UNIT_STEPS:-200} --batch-size 4"
  MBART_ARGS="--dim 64 --layers 2 --heads 4 --ffn 128 --epochs ${BB_EPOCHS:-3} --batch-size 8"
  PROMPT_ARGS="--prompt-length 8 --epochs ${PROMPT_EPOCHS:-3} --batch-size 8"
  VOC_ARGS="--width 32 --steps ${VOC_STEPS:-200} --batch-size 4 --segment-frames 16 --disc-width 4"
elif [ "$SCALE" = cpu ]; then
  N_TRAIN=${N_TRAIN:-800}; N_DEV=${N_DEV:-30}; N_TEST=${N_TEST:-30}; UNITS=${UNITS:-200}; THREADS=1
  UNIT_ARGS="--dim 128 --layers 3 --heads 4 --ffn 256 --conv-dim 64 --output-layer 3 --steps ${UNIT_STEPS:-2500} --batch-size 8"
  MBART_ARGS="--dim 128 --layers 3 --heads 4 --ffn 512 --epochs ${BB_EPOCHS:-40} --batch-size 16 --patience 4"
  PROMPT_ARGS="--prompt-length 32 --epochs ${PROMPT_EPOCHS:-10} --batch-size 16"
  VOC_ARGS="--width 64 --steps ${VOC_STEPS:-9000} --mel-warmup ${VOC_WARMUP:-9000} --lr 4e-4 --batch-size 16 --segment-frames 32"
else
  N_TRAIN=${N_TRAIN:-3000}; N_DEV=${N_DEV:-100}; N_TEST=${N_TEST:-50}; UNITS=${UNITS:-500}
  UNIT_ARGS="--dim 384 --layers 6 --heads 6 --ffn 1536 --conv-dim 256 --output-layer 5 --steps ${UNIT_STEPS:-20000} --batch-size 16"
  MBART_ARGS="--dim 256 --layers 4 --heads 4 --ffn 1024 --epochs ${BB_EPOCHS:-30} --batch-size 32"
  PROMPT_ARGS="--prompt-length 32 --epochs ${PROMPT_EPOCHS:-20} --batch-size 32"
  VOC_ARGS="--width 128 --steps ${VOC_STEPS:-40000} --batch-size 16 --segment-frames 32"
fi
C=$OUT/corpus
B=$OUT/bundle

streamgen data synth --out "$C" --train "$N_TRAIN" --dev "$N_DEV" --test "$N_TEST"
streamgen train-units --manifest "$C/en_train.tsv" --bundle "$B" --units "$UNITS" --device "$DEVICE" $UNIT_ARGS
for m in en_train en_dev en_test es2en_train_src es2en_train_tgt es2en_dev_src es2en_dev_tgt es2en_test_src es2en_test_tgt; do
  streamgen units --manifest "$C/$m.tsv" --out "$C/$m.units.tsv" --bundle "$B" --device "$DEVICE"
done
# the vocoder speaks the piper voice: all of its English speech (the continuation corpus and the translation targets)
{ cat "$C/en_train.units.tsv"; tail -n +2 "$C/es2en_train_tgt.units.tsv"; } > "$C/voc_train.units.tsv"
if [ -n "$THREADS" ]; then export OMP_NUM_THREADS=$THREADS; fi
streamgen train-vocoder --manifest "$C/voc_train.units.tsv" --out "$OUT/vocoder" --bundle "$B" --device "$DEVICE" \
  --into-bundle $VOC_ARGS $(resume "$OUT/vocoder" vocoder_state.pt) > "$OUT/vocoder.log" 2>&1 &
VOC_PID=$!
# the backbone learns both languages' units by denoising
{ cat "$C/en_train.units.tsv"; tail -n +2 "$C/es2en_train_src.units.tsv"; } > "$C/all_train.units.tsv"
streamgen train-backbone --bundle "$B" --train "$C/all_train.units.tsv" --dev "$C/en_dev.units.tsv" --out "$OUT/backbone" \
  --device "$DEVICE" --into-bundle $MBART_ARGS $(resume "$OUT/backbone")
for split in train dev test; do
  streamgen data pairs --task continuation --manifest "$C/en_$split.units.tsv" --out "$C/continuation_$split.tsv"
  streamgen data pairs --task inpainting --manifest "$C/en_$split.units.tsv" --out "$C/inpainting_$split.tsv"
  streamgen data pairs --task translation --manifest "$C/es2en_${split}_src.units.tsv" --target "$C/es2en_${split}_tgt.units.tsv" \
    --out "$C/translation_$split.tsv"
done
for task in continuation inpainting translation; do
  streamgen train-prompt --bundle "$B" --task "$task" --train "$C/${task}_train.tsv" --dev "$C/${task}_dev.tsv" \
    --out "$OUT/prompt_$task" --device "$DEVICE" --into-bundle $PROMPT_ARGS $(resume "$OUT/prompt_$task")
done
# the baseline of the paper's comparison: the same data and steps, every backbone weight trains
for task in continuation inpainting translation; do
  streamgen train-prompt --bundle "$B" --task "$task" --train "$C/${task}_train.tsv" --dev "$C/${task}_dev.tsv" \
    --out "$OUT/full_$task" --device "$DEVICE" --full --lr 5e-4 $PROMPT_ARGS $(resume "$OUT/full_$task")
done
wait "$VOC_PID" || { cat "$OUT/vocoder.log"; exit 1; }
tail -n 2 "$OUT/vocoder.log"
unset OMP_NUM_THREADS
streamgen info "$B"
# what ships, and what is evaluated: the weights in fp16
streamgen pack "$B" "$OUT/ship" --dtype float16
B=$OUT/ship

streamgen eval --task resynthesis --manifest "$C/en_test.tsv" --bundle "$B" --chunk-ms 320 --out "$OUT/eval_resynthesis"
streamgen eval --task resynthesis --manifest "$C/en_test_espeak.tsv" --bundle "$B" --chunk-ms 320 --out "$OUT/eval_resynthesis_espeak"
python bench/units_ceiling.py --bundle "$OUT/bundle" --train "$C/en_train.units.tsv" --test "$C/en_test.tsv" --mel-kmeans "$UNITS" \
  | tee "$OUT/units_ceiling.txt"
python bench/prompt_vs_full.py --bundle "$B" --runs "$OUT" --pairs "$C" | tee "$OUT/prompt_vs_full.md"
streamgen eval --task translation --manifest "$C/es2en_test_src.tsv" --references "$C/es2en_test_tgt.tsv" --bundle "$B" \
  --chunk-ms 160,320,640 --out "$OUT/eval_translation"
streamgen eval --task continuation --manifest "$C/en_test.tsv" --bundle "$B" --chunk-ms 320 --out "$OUT/eval_continuation"
streamgen eval --task inpainting --manifest "$C/en_test.tsv" --bundle "$B" --chunk-ms 320 --out "$OUT/eval_inpainting"
# prompt tuning vs full fine-tuning vs no prompt, same data, same steps (quality only: unpaced input)
for task in translation inpainting continuation; do
  src=$C/en_test.tsv; refs=()
  if [ "$task" = translation ]; then src=$C/es2en_test_src.tsv; refs=(--references "$C/es2en_test_tgt.tsv"); fi
  streamgen eval --task "$task" --manifest "$src" "${refs[@]}" --bundle "$B" --no-realtime --out "$OUT/cmp_${task}_prompt"
  streamgen eval --task "$task" --manifest "$src" "${refs[@]}" --bundle "$B" --no-realtime --no-prompt --out "$OUT/cmp_${task}_none"
  streamgen eval --task "$task" --manifest "$src" "${refs[@]}" --bundle "$B" --no-realtime --no-prompt \
    --mbart "$OUT/full_$task/best_mbart.safetensors" --out "$OUT/cmp_${task}_full"
done
if [ "${SHIP:-0}" = 1 ]; then
  rm -rf streamgen/assets/default && cp -r "$OUT/ship" streamgen/assets/default
fi
