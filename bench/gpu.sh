#!/usr/bin/env bash
# Everything the serving work measures on a GPU (figures go to $OUT or ./gpu-results), in two parts that
# each fit one device call (at most 10 minutes; every command has its own timeout):
#   1: the decode step at the public Unit mBART size against the plain-PyTorch ceiling, the shared prompt at
#      256 and 1024 sessions, the engine's decode loop with CUDA graphs (and its agreement with eager steps),
#      the streaming vocoder's step by streams, and live sessions held per GPU with the one-at-a-time
#      baseline beside them (at most 9.5 minutes);
#   2: where a tick's time goes (the engine's worker under torch's profiler), the CodeHiFiGAN in exact
#      windows against streaming convolutions, continuation, and the decoder's CUDA graphs against eager
#      steps (at most 5.5 minutes).
#   short: what the issue's aims need, for a lease with little time left (at most 9.6 minutes): the GPU tests,
#      the streaming vocoder's step (replayed as a CUDA graph), the decode step, live sessions (two runs a level,
#      the second warm) with the baseline at 16, 1,024 of them over eight engine processes sharing the GPU,
#      translation on a backbone that streams, resynthesis with the vocoder's exact windows, the engine's ticks
#      unpaced (bench/engine_overhead.py, one run profiled). (Profiling the engine's worker thread failed on the
#      H200 of 2026-11-29: CUPTI wants the thread that registered it; part 2 still tries.)
#   bash bench/gpu.sh [1|2|short]   (parts 1 and 2 without an argument; CUDA and PyTorch; wheels in .whl/ if given)
# The lent H200's image (Python 3.12, torch 2.11) lacks soundfile and soxr, which the sessions bench imports; before
# the device call: pip download soundfile soxr cffi pycparser --python-version 3.12 --only-binary=:all: --no-deps
#   --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl; echo .whl/ >> .git/info/exclude
# and name .whl in the call's carry.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . ./plugins/* 2>&1 | tail -2
  export PYTHONPATH=/tmp/site:$PWD
fi
PART=${1:-all}
{ date -u +%Y-%m-%dT%H:%MZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  python3 -c "import torch; print('torch', torch.__version__)"; } | tee -a "$OUT/device.txt"
# the issue's GPU aim is sessions held at p99 <= 100 ms (the CPU bench's default bound is 250 ms)
S="python3 bench/sessions.py --device cuda --dtype bfloat16 --public-random --seconds 6 --max-lag-ms 100 --tasks resynthesis,translation"
if [ "$PART" = short ]; then
  timeout 30 python3 -m pytest -q -rf -p no:cacheprovider --noconftest tests/test_vocoder.py tests/test_captured.py tests/test_attention.py -k on_a_gpu 2>&1 \
    | tail -40 | tee -a "$OUT/device.txt"
  # the streaming vocoder's step replayed as a CUDA graph (2026-11-29, eager, float32: 1,848 launches, 46-204 ms a
  # step), in the engine's bfloat16 first: at 1,024 streams its arithmetic may be what bounds a tick
  timeout 30 python3 bench/streaming_vocoder.py --device cuda --sizes public --levels 1024,256 --repeats 3 \
    --dtypes bfloat16,float32 2>&1 \
    | tee "$OUT/streaming_vocoder.md"
  # the decode step against the plain-PyTorch ceiling, the shared prompt at 256 sessions, graphs against eager steps
  timeout 70 python3 bench/decode.py --device cuda --dtype bfloat16 --sizes full --sessions 256 --cuda-graphs \
    --engine-sessions 1,256 --repeats 10 2>&1 | tee "$OUT/decode.md"
  # two runs a level: cuDNN plans each new shape once per process, so the second run is a warm service's (bench/shapes.py)
  timeout 190 $S --levels 16,256,1024 --runs 2 --modes engine --json "$OUT/sessions.json" 2>&1 | tee "$OUT/sessions.txt"
  timeout 35 $S --levels 16 --modes one-at-a-time 2>&1 | tee "$OUT/sessions_baseline.txt"
  # one engine's tick is bound by its host work (2026-11-29): eight engine processes share the GPU, each with its own
  # models and an eighth of the talkers (as eight `serve --mqtt` workers on one GPU would), spreading that work over cores
  timeout 80 $S --tasks resynthesis --levels 1024 --runs 2 --modes engine --processes 8 --json "$OUT/sessions_processes.json" \
    2>&1 | tee "$OUT/sessions_processes.txt"
  # translation on a public-size backbone that streams (the shipped bundle's design: a decision encodes only its new
  # source), where the public Unit mBART above re-encodes the whole source at every decision
  timeout 40 $S --tasks translation --levels 256 --runs 2 --modes engine --streaming-translation \
    --json "$OUT/sessions_streaming_translation.json" 2>&1 | tee "$OUT/sessions_streaming_translation.txt"
  # the CodeHiFiGAN in exact windows, replayed as CUDA graphs with the encoder's windows (few large calls, context
  # recomputed) against the streaming convolutions above (every sample once; their steps replayed as graphs too)
  timeout 40 $S --tasks resynthesis --levels 1024 --runs 2 --modes engine --vocoder-windows --json "$OUT/sessions_windows.json" \
    2>&1 | tee "$OUT/sessions_windows.txt"
  # a tick's time against its chunk's without live pacing (how many sessions one engine keeps up with), and the
  # per-session host work at those sizes; the second run under torch's profiler (in the main thread: CUPTI allows it)
  O="python3 bench/engine_overhead.py --device cuda --dtype bfloat16 --public-random --seconds 10 --warm 12"
  timeout 30 $O --sessions 256,1024 2>&1 | tee "$OUT/engine_overhead.txt"
  timeout 30 $O --sessions 1024 --vocoder-windows --profile "$OUT/engine_profile" 2>&1 | tee -a "$OUT/engine_overhead.txt"
  exit 0
fi
if [ "$PART" != 2 ]; then
  timeout 150 python3 bench/decode.py --device cuda --dtype bfloat16 --sizes full --sessions 256 --cuda-graphs \
    --engine-sessions 1,64,256,1024 --repeats 20 2>&1 | tee "$OUT/decode.md"
  timeout 40 python3 bench/decode.py --device cuda --dtype bfloat16 --sizes full --sessions 1024 \
    --engine-sessions 1 --repeats 10 2>&1 | grep -A3 "Shared" | tee -a "$OUT/decode.md"
  # the streaming vocoder's step at the public CodeHiFiGAN size: time, operators and host reads per step by streams
  timeout 60 python3 bench/streaming_vocoder.py --device cuda --sizes public --levels 16,64,256,1024 --repeats 5 2>&1 \
    | tee "$OUT/streaming_vocoder.md"
  timeout 240 $S --levels 16,64,256,1024 --modes engine --json "$OUT/sessions.json" 2>&1 | tee "$OUT/sessions.txt"
  timeout 60 $S --levels 16,64 --modes one-at-a-time --json "$OUT/sessions_baseline.json" 2>&1 \
    | tee "$OUT/sessions_baseline.txt"
fi
if [ "$PART" != 1 ]; then
  # where a tick's time goes: the operators of one level's engine worker, by device time and by host time
  timeout 60 $S --levels 64 --modes engine --profile "$OUT/profile" 2>&1 | tee "$OUT/sessions_profiled.txt"
  # the CodeHiFiGAN in exact windows vs streaming convolutions, continuation, the decoder's CUDA graphs against eager steps
  timeout 100 $S --tasks resynthesis --levels 16,64,256 --modes engine --vocoder-windows --json "$OUT/sessions_windows.json" 2>&1 \
    | tee "$OUT/sessions_windows.txt"
  timeout 100 $S --tasks continuation --levels 16,64 --modes engine --json "$OUT/sessions_continuation.json" 2>&1 | tee "$OUT/sessions_continuation.txt"
  timeout 60 $S --tasks translation --levels 64 --modes engine --no-cuda-graphs 2>&1 | tee "$OUT/sessions_eager.txt"
fi
