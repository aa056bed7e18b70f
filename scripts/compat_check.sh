#!/usr/bin/env bash
# Run the test suite against another transformers release: ./scripts/compat_check.sh 5.6.2
# It installs into a venv of its own (.venv-transformers-VERSION, through scripts/install.sh) and uses a fresh
# GGUF cache, so the project's .venv is untouched and no conversion made by another version is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:?usage: scripts/compat_check.sh TRANSFORMERS_VERSION [pytest args]}"
shift
venv=".venv-transformers-$version"
VENV="$venv" EXTRA_SPEC="transformers==$version" ./scripts/install.sh
MRPRUNE_CACHE_DIR="$(mktemp -d)" "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
