#!/usr/bin/env bash
# The wheels bench/device.py needs beyond a GPU image that has JAX, flax,
# optax, orbax, PyTorch and transformers (and lacks ml_collections, simplejpeg
# and OpenCV), downloaded here into bench/wheels/ (about 52 MB) to travel
# with the working tree to a machine without internet. There:
#
#   pip install -q --no-index --no-deps --find-links bench/wheels \
#     ml-collections simplejpeg opencv-python-headless
#   python bench/device.py --out device.json
#
# simplejpeg for CPython 3.10 to 3.13 (pip picks the interpreter's); OpenCV's
# abi3 wheel serves them all.
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PIP:-../.venv/bin/pip}"
mkdir -p wheels
fetch() {  # fetch PYTHON_VERSION PACKAGE...
  "$PIP" download -q --only-binary=:all: --no-deps --python-version "$1" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d wheels "${@:2}"
}
fetch 3.11 "ml-collections>=1.0,<2" "opencv-python-headless==4.10.0.84"
for v in 3.10 3.11 3.12 3.13; do
  fetch "$v" "simplejpeg>=1.8,<2"
done
ls -l wheels
