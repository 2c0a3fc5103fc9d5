#!/usr/bin/env bash
# Set up a virtualenv in .venv with everything the stages and the tests need.
# torch comes first and pinned for CPU machines (a CPU build); a GPU machine that
# already has a CUDA torch in its environment can skip this script and run
# `pip install -e '.[dev]'` itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e '.[dev]'
.venv/bin/python -c "import torch, ray, triton; print('torch', torch.__version__, '| ray', ray.__version__, '| triton', triton.__version__)"
