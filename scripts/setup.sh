#!/usr/bin/env bash
# Set up a virtualenv in .venv with everything the stages and the tests need.
# Regenerate scripts/constraints.txt with `pip freeze` after upgrading dependencies.
# torch comes first and pinned for CPU machines (a CPU build); a GPU machine that
# already has a CUDA torch in its environment can skip this script and run
# `pip install -e '.[dev]'` itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# constraints.txt is a known-good set of versions for everything else: it keeps the
# resolver from backtracking through hundreds of boto3 releases (moto vs s3fs's botocore pin).
.venv/bin/python -m pip install -q -c scripts/constraints.txt -e '.[dev]'
.venv/bin/python -c "import torch, ray, triton; print('torch', torch.__version__, '| ray', ray.__version__, '| triton', triton.__version__)"
