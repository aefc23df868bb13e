#!/usr/bin/env bash
# Install difflab and what it needs on a fresh machine.
#  - Fashion-MNIST from Debian's dataset-fashion-mnist (when run as root on Debian/Ubuntu and missing).
#  - PyTorch only when none is importable (users with their own CUDA build keep it): the CPU build 2.13.0.
#  - difflab itself, editable, with the test extra; k-diffusion for the adapter's cross-check, without its
#    dependencies (its training stack would pull torchvision and a CUDA torch; the samplers need none of it).
set -euo pipefail
PYTHON=${PYTHON:-python3}

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null \
   && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q "torch==2.13.0"
fi

"$PYTHON" -m pip install -q -e ".[test]"
"$PYTHON" -m pip install -q --no-deps "k-diffusion==0.1.1.post1"
