#!/usr/bin/env bash
# Install (with test dependencies) and run the test suite: what README.md and CI run.
# The whole suite runs on the best kernels this CPU has; the exactness core (tests marked
# `core`: greedy equality of every preset, the distribution test, prefill split-independence,
# batch equals alone, the kernels themselves) runs again on each other path: the AVX2 kernels
# and PyTorch (TRIFORCE_ISA, see src/triforce/native.py).
# Tests run in one worker per core (at most 4), each on one thread: most tests step tiny models,
# where the time is Python's, and workers sharing cores with threads of their own would contend.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
ruff check src tests
workers=$(( $(nproc) < 4 ? $(nproc) : 4 ))
export OMP_NUM_THREADS=1
python -m pytest -q -n "$workers"
best=$(python -c "from triforce import native; print(native.kernels())")
echo "whole suite ran on the ${best} kernels"
for isa in avx512 avx2 none; do
  [ "$isa" = "$best" ] && continue
  if [ "$isa" != none ] && ! python -c "import sys; from triforce import native; sys.exit('$isa' not in native.cpu_isas())"; then
    echo "exactness core on ${isa}: skipped, this CPU cannot run it"
    continue
  fi
  echo "exactness core on ${isa}"
  TRIFORCE_ISA=$isa python -m pytest -q -n "$workers" -m core -p no:randomly --durations=5
done
