#!/usr/bin/env bash
# One-step set-up and run, for a fresh machine.
#   bash scripts/dev.sh demo [args]    set up .venv-demo with the package alone, then run `peft-lorsu demo [args]`
#   bash scripts/dev.sh test [args]    set up .venv with the dev extras, then run the test suite
#   bash scripts/dev.sh oldest [args]  set up .venv-oldest with the oldest supported peft / transformers, then run
#                                      the core tests (tests/core) against them
#   bash scripts/dev.sh integrations   add DeepSpeed and OpenCLIP to .venv, then run the tests that need them
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
    integrations)
        # DeepSpeed ships only a source package: built without isolation against the installed torch, no C++ ops.
        # open-clip-torch declares torchvision, which has no CPU build for torch 2.13: installed without it (the test
        # imports open_clip's model classes through a stand-in, see tests/core/test_open_clip.py).
        setup "${VENV:-.venv}" -e ".[dev]"
        echo "torch==2.13.0" > "${VENV:-.venv}/torch-constraint.txt"
        DS_BUILD_OPS=0 "${VENV:-.venv}/bin/python" -m pip install --quiet --disable-pip-version-check \
            -c "${VENV:-.venv}/torch-constraint.txt" --no-build-isolation "deepspeed==0.19.8"
        "${VENV:-.venv}/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
            "open-clip-torch==3.3.0" "timm==1.0.31" "ftfy>=6.1" "wcwidth"
        exec "${VENV:-.venv}/bin/python" -m pytest -q tests/core/test_deepspeed.py tests/core/test_open_clip.py "$@"
        ;;
    oldest)
        setup "${VENV:-.venv-oldest}" -e . "${OLDEST[@]}" "pytest>=8" "hypothesis>=6.100" "pillow>=10"
        exec "${VENV:-.venv-oldest}/bin/python" -m pytest -q tests/core -m "not slow" "$@"
        ;;
    *)
        echo "usage: bash scripts/dev.sh demo|test|oldest|integrations [args]" >&2
        exit 2
        ;;
esac
