#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what bench/gpu_smoke.sh needs on a lent GPU machine, whose image
# has torch, transformers, lightning, peft, accelerate and safetensors but no network: the
# wheels it lacks (Python 3.12, manylinux), the offline tokenizer and a review file.
# Run here, in the repository root, in the project's virtual environment: bash bench/gpu_smoke_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu/wheels \
  deap==1.4.4 moocore jsonargparse docstring-parser typeshed-client 'datasets==4.4.1' \
  dill multiprocess gguf 'huggingface-hub<2'
python3 - <<'EOF'
import json
from sieve_pl.api import DEFAULT_MODEL, load_source, load_tokenizer
load_tokenizer(DEFAULT_MODEL).save_pretrained(".gpu/tokenizer")
rows = load_source("rotten_tomatoes", None, "train").shuffle(seed=0).select(range(600))
with open(".gpu/reviews.jsonl", "w") as f:
    for row in rows:
        f.write(json.dumps({"text": row["text"], "label": row["label"]}) + "\n")
EOF
du -sh .gpu
