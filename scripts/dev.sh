#!/usr/bin/env bash
# One-step set-up and run, for a fresh machine.
#   bash scripts/dev.sh demo [args]    set up .venv-demo with the package alone, then run `peft-lorsu demo [args]`
#   bash scripts/dev.sh test [args]    set up .venv with the dev extras, then run the test suite
#   bash scripts/dev.sh oldest [args]  set up .venv-oldest with the oldest supported peft / transformers, then run
#                                      the core tests (tests/core) against them
# torch is installed first and pinned to the 2.13.0 CPU wheel, so no later step pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
OLDEST=("peft==0.18.1" "transformers==4.57.6")  # keep in step with pyproject.toml and docs/install.md
command="${1:-}"
shift || true

setup() {  # setup VENV PIP_ARGS...
    local venv="$1"
    shift
    if [ ! -x "$venv/bin/python" ]; then
        "$PYTHON" -m venv "$venv"
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"
}

export HF_HUB_OFFLINE=1
case "$command" in
    demo)
        # its own environment: exactly what `pip install peft-lorsu` gives a user, no extras
        setup "${VENV:-.venv-demo}" -e .
        exec "${VENV:-.venv-demo}/bin/peft-lorsu" demo "$@"
        ;;
    test)
        setup "${VENV:-.venv}" -e ".[dev]"
        exec "${VENV:-.venv}/bin/python" -m pytest -q "$@"
        ;;
    oldest)
        setup "${VENV:-.venv-oldest}" -e . "${OLDEST[@]}" "pytest>=8" "hypothesis>=6.100"
        exec "${VENV:-.venv-oldest}/bin/python" -m pytest -q tests/core -m "not slow" "$@"
        ;;
    *)
        echo "usage: bash scripts/dev.sh demo|test|oldest [args]" >&2
        exit 2
        ;;
esac
