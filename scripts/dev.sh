#!/usr/bin/env bash
# One-step set-up and run, for a fresh machine.
#   bash scripts/dev.sh demo [args]   set up .venv, then run `peft-lorsu demo [args]`
#   bash scripts/dev.sh test [args]   set up .venv with the dev extras, then run the test suite
# torch is installed first and pinned to the 2.13.0 CPU wheel, so no later step pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
command="${1:-}"
shift || true

setup() {
    local extras="$1"
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".${extras}"
}

export HF_HUB_OFFLINE=1
case "$command" in
    demo)
        setup ""
        exec "$VENV/bin/peft-lorsu" demo "$@"
        ;;
    test)
        setup "[dev]"
        exec "$VENV/bin/python" -m pytest -q "$@"
        ;;
    *)
        echo "usage: bash scripts/dev.sh demo|test [args]" >&2
        exit 2
        ;;
esac
