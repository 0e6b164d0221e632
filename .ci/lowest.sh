#!/usr/bin/env bash
# The default test suite on the OLDEST versions pyproject.toml allows (its lower bounds must be true: a user with
# an older library gets a resolver message, never an error mid-run). uv's lowest-direct resolution takes the lowest
# allowed version of every direct dependency (the [dev] extra included) and the newest of everything else.
# torch stays the CPU build on disk (2.13.0): uv does not look there, and an older torch is a CUDA download of GBs.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv-lowest
. .venv-lowest/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0 uv   # the CPU build from local disk, before anything asks for torch
echo "torch==2.13.0" > .venv-lowest/torch-pin.txt
uv pip install --quiet --resolution lowest-direct -c .venv-lowest/torch-pin.txt -e ".[dev]"
echo "== lowest allowed versions (uv pip freeze)"
uv pip freeze
timeout --signal=ABRT --kill-after=60 30m python -m pytest -p no:cacheprovider
