#!/usr/bin/env bash
# Build llama.cpp (llama-cpp-python) for AVX2 only, into DIR (default /tmp/llamacpp-avx2), for the
# AVX2 comparison in README.md: PYTHONPATH=DIR makes `bench decode --peers llamacpp` use it.
# A source build: minutes on 2 cores.
set -euo pipefail
dir=${1:-/tmp/llamacpp-avx2}
off="AVX512 AVX512_VBMI AVX512_VNNI AVX512_BF16 AVX_VNNI AMX_TILE AMX_INT8 AMX_BF16"
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON $(printf -- '-DGGML_%s=OFF ' $off)" \
  python -m pip install --disable-pip-version-check -q --no-deps --no-binary llama-cpp-python --target "$dir" \
  'llama-cpp-python==0.3.36'
PYTHONPATH="$dir" python -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
