#!/usr/bin/env bash
# Install everything the tests need, then run them:  bash scripts/test.sh [pytest args]
#   STREAMGEN_ORACLE=0  skip building the fairseq reference venv (the oracle tests then skip)
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use: the MQTT broker, the JACK audio server and PortAudio, offline TTS,
# headless Chromium and its driver (the serve page test), ffmpeg (pydub, which the simuleval command imports).
APT_PACKAGES=(mosquitto openssl jackd2 libportaudio2 espeak-ng flite chromium chromium-driver ffmpeg)
need=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if ((${#need[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first: 2.13.0 is a CPU build on local disk; the project's torch>=2.4 range then installs nothing more
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev,audio,mqtt,serve,vad,eval,data]" ./plugins/*

if [ "${STREAMGEN_ORACLE:-1}" = 1 ]; then
  # fairseq as a reference oracle only, in its own venv: it pins torchaudio 2.11, which does not load
  # beside torch 2.13 and breaks `import fairseq`, so torchaudio is removed again.
  if ! .venv-oracle/bin/python -c "import fairseq.models.bart" >/dev/null 2>&1; then
    echo "building the fairseq oracle venv (.venv-oracle, a few minutes, once)"
    "$PY" -m venv .venv-oracle
    .venv-oracle/bin/pip install -q --disable-pip-version-check torch==2.13.0
    .venv-oracle/bin/pip install -q --disable-pip-version-check fairseq-fixed==0.12.3.1
    .venv-oracle/bin/pip uninstall -y -q torchaudio
  fi
  export STREAMGEN_FAIRSEQ_PYTHON="$PWD/.venv-oracle/bin/python"
fi

exec .venv/bin/python -m pytest "$@"
