#!/usr/bin/env bash
# Set up flatminima in ./.venv.   usage: bash scripts/setup.sh [run|dev|timm]
#   run (default): the library, the experiment extras (MiniLM included) and the data: Fashion-MNIST
#                  and the VADER sentences (main job and the text preset)
#   dev:           the library, the test dependencies and the VADER sentences (the examples the tests
#                  run train on them); no Fashion-MNIST: the tests build tiny idx files themselves
#   timm:          a second environment, ./.venv-timm, for tests/test_timm.py (timm's ViT against
#                  flatminima's): timm with the torch and torchvision it is tested with, pytest,
#                  safetensors, scikit-learn and the library (--no-deps); about 1 minute, 5.5 GB
# All install the exact versions of scripts/constraints.txt (torch: below).
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-run}
case "$target" in run|dev|timm) ;; *) echo "usage: bash scripts/setup.sh [run|dev|timm]" >&2; exit 2 ;; esac

python=${PYTHON:-python3}
constraints=(--constraint scripts/constraints.txt)

if [ "$target" = timm ]; then
  # timm needs torchvision, and PyPI's x86_64 torchvision wheels are CUDA builds that do not load beside
  # .venv's CPU torch ("operator torchvision::nms does not exist"): hence its own environment, with the
  # torch that torchvision was built for.
  [ -x .venv-timm/bin/python ] || "$python" -m venv .venv-timm
  tpip=(.venv-timm/bin/python -m pip install --quiet --disable-pip-version-check)
  "${tpip[@]}" "${constraints[@]}" torch==2.14.1 torchvision==0.29.1 timm==1.0.31 pytest==9.2.0 numpy safetensors \
    scikit-learn
  "${tpip[@]}" --no-deps -e .
  echo "flatminima is set up in .venv-timm (timm)"
  exit 0
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# PyTorch first, so the project's `torch>=2.3` is already satisfied: on machines without an NVIDIA
# GPU a pinned release (a CPU build where one is cached locally); with a GPU, PyPI's CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" torch
  else
    "${pip[@]}" "torch==${FLATMINIMA_TORCH_VERSION:-2.13.0}"
  fi
fi

# The VADER sentences: the vaderSentiment source archive, fetched once into the user cache
# (python -m pip download --no-deps --no-binary :all: vaderSentiment==3.3.2), so runs work offline.
fetch_vader() { .venv/bin/python -c "from flatminima.data import find_vader_archive; find_vader_archive()"; }

if [ "$target" = dev ]; then
  "${pip[@]}" "${constraints[@]}" -e ".[dev]"
  # INFTY's optimizers, a reference the tests compare with: --no-deps, since the wheel declares torchvision,
  # seaborn and scipy, which infty.optim never imports (a CUDA torchvision would also pull a second torch).
  "${pip[@]}" --no-deps "infty==0.1.2"
  fetch_vader || { echo "error: could not fetch the VADER archive, which the tests need (see above)" >&2; exit 1; }
  # The HTML report's browser test drives Debian's headless Chromium (~120 MB of .debs, about 10-25 s
  # with recommends left out); without it (or without root) that one test is skipped.
  if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 \
           && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1; } \
      || echo "note: could not install chromium chromium-driver; the HTML report's browser test will be skipped" >&2
  fi
else
  "${pip[@]}" "${constraints[@]}" -e ".[experiments]"
  # Fashion-MNIST ships as a Debian package; without root the loader fetches it into its cache.
  if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ "$(id -u)" = 0 ] \
     && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } \
      || echo "note: could not install dataset-fashion-mnist; the loader will try its other sources" >&2
  fi
  fetch_vader || echo "note: could not fetch the VADER archive; the text task will try again when it runs" >&2
fi
echo "flatminima is set up in .venv ($target)"
