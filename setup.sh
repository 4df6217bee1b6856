#!/usr/bin/env bash
# Set up from nothing: .venv/ with the pinned CPU torch, tyrsearch (editable, with dev tools) and the
# offline reference assets. Idempotent: rerunning only checks what is there.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# llama-cpp-python (the `edge` extra: llama.cpp, which verifies GGUF exports) has no Linux wheel on the index:
# pip builds it from its source package once (about 5 minutes on 2 cores, then cached), without its
# multimodal library.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev,bench,edge]"
.venv/bin/python -m pip install --quiet --no-deps -r requirements-assets.txt
# The held-out `literature` text ships in brotli's source package: downloaded (not built) beside the assets.
[ -f .venv/share/tyrsearch-assets/brotli-1.2.1.tar.gz ] || .venv/bin/python -m pip download --quiet --no-deps \
    --no-binary brotli brotli==1.2.1 -d .venv/share/tyrsearch-assets
# Fashion-MNIST for the meta-pruner (Debian package; needs root or passwordless sudo). Without it only the
# meta-pruner's data loader fails, with an error that names the package.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
    { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist \
      || { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
           --no-install-recommends dataset-fashion-mnist; }; } >/dev/null 2>&1 \
      || echo "warning: could not install the Debian package dataset-fashion-mnist (the meta-pruner's data)" >&2
fi
.venv/bin/python -c "import torch, tyrsearch; print('tyrsearch ready: torch', torch.__version__)"
