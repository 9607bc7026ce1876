#!/usr/bin/env bash
# Install (with test dependencies) and run the test suite: what README.md and CI run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
ruff check src tests
python -m pytest -q
