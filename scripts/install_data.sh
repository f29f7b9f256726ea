#!/usr/bin/env bash
# Install the optional real-data sources used by benchmarks/ (the demo needs none of them).
# Idempotent: every step is skipped when its data is already present. Run inside the project's virtualenv.
#
#   - Fashion-MNIST    Debian package dataset-fashion-mnist   -> /usr/share/datasets/fashion-mnist/
#   - Animal-MNIST     PyPI animal-mnist==0.4 (--no-deps: it declares tensorflow, which is not needed)
#   - CLIP BPE vocab   PyPI open-clip-torch==3.3.0 (--no-deps: only its vocabulary file is read)
#   - digits           PyPI scikit-learn (load_digits ships inside the wheel)
#   - HF datasets      PyPI datasets (hub names, where the HF Hub is reachable)
#
# Never lets pip touch torch: the two packages that declare torch / tensorflow are installed with --no-deps.
set -euo pipefail

PYTHON="${PYTHON:-python}"
PIP=("$PYTHON" -m pip install --disable-pip-version-check --quiet)
FASHION_DIR=/usr/share/datasets/fashion-mnist

log() { printf '[install_data] %s\n' "$*"; }

have_module() { "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
pip_version() { "$PYTHON" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }

if [ -f "$FASHION_DIR/t10k-images-idx3-ubyte.gz" ] && [ -f "$FASHION_DIR/train-images-idx3-ubyte.gz" ]; then
    log "Fashion-MNIST already in $FASHION_DIR"
elif command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    log "installing Debian package dataset-fashion-mnist"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist
else
    log "WARNING: apt-get not found; Fashion-MNIST needs the Debian package dataset-fashion-mnist" \
        "(or set PEFT_LORSU_FASHION_MNIST_DIR to a folder with the four IDX .gz files)"
fi

for pinned in animal-mnist==0.4 open-clip-torch==3.3.0; do
    name="${pinned%%==*}"
    want="${pinned##*==}"
    if [ "$(pip_version "$name")" = "$want" ]; then
        log "$pinned already installed"
    else
        log "installing $pinned (--no-deps)"
        "${PIP[@]}" --no-deps "$pinned"
    fi
done

for pair in sklearn:scikit-learn datasets:datasets; do
    module="${pair%%:*}"
    package="${pair##*:}"
    if have_module "$module"; then
        log "$package already installed"
    else
        log "installing $package"
        "${PIP[@]}" "$package"
    fi
done

if ! have_module peft_lorsu; then
    log "peft_lorsu is not importable from here (pip install -e .); skipping the load check"
    exit 0
fi
"$PYTHON" - <<'PY'
import torch
from peft_lorsu.app import data as D

for name in ("fashion_mnist", "animal_mnist", "digits"):
    data = D.load_image_dataset(name, "test")
    print(f"[install_data] {name}: {len(data.labels)} test images, {len(data.class_names)} classes")
print(f"[install_data] torch {torch.__version__} untouched")
PY
