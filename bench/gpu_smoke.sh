#!/usr/bin/env bash
# GPU smoke test: sieve-pl's pipeline on CUDA on a random Llama with Llama-3-8B-shaped layers.
#
# Run on a lent GPU machine through the device tool, from the repository root, after
# `bash bench/gpu_smoke_prepare.sh` here (it fills .gpu/ with the wheels the GPU image lacks, the
# offline tokenizer and a review file; .gpu/ is git-ignored, carry it):
#
#   device run: bash bench/gpu_smoke.sh            (carry: [".gpu"], timeout_s: 540)
#
# It builds the model on the GPU host (4 layers, bfloat16), runs `sieve-pl plan` and then
# `sieve-pl fit` (calibrate -> project -> search with the sensitivity seed and a short GA ->
# export -> evaluate), and writes bench/results/gpu_smoke.json ($OUT/gpu_smoke.json on the
# device machine): each stage's seconds and the peak CUDA memory it allocated, next to the
# plan's estimate. Budget: about 8 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
LAYERS="${LAYERS:-4}"
if [ -d .gpu/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/wheels/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
WORK="${TMPDIR:-/tmp}/sieve_gpu_smoke"
rm -rf "$WORK" && mkdir -p "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

python3 - "$WORK" "$LAYERS" <<'EOF'
import sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
work, layers = sys.argv[1], int(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(".gpu/tokenizer")
config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, tie_word_embeddings=True, max_position_embeddings=512,
                     pad_token_id=tokenizer.pad_token_id, torch_dtype="bfloat16")
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(f"{work}/model")
tokenizer.save_pretrained(f"{work}/model")
print("model", sum(p.numel() for p in model.parameters()) / 1e9, "B parameters")
EOF

ARGS=(--config configs/demo.yaml --model.pretrained "$WORK/model" --model.dtype bfloat16
      --trainer.accelerator gpu --trainer.devices 1 --trainer.enable_progress_bar false
      --data.source .gpu/reviews.jsonl --data.sizes '{calibration: 128, validation: 64, test: 64, train: 32}'
      --calibration.dtype float32 --search.population 6 --search.generations 2
      --recover.enabled false --quantize.formats '[]' --quantize.measure false
      --transfer.sources '{}' --data.pool '{sisters: {}}' --run.root "$WORK" --run.name smoke)
python3 -m sieve_pl.cli plan "${ARGS[@]}" | tee "$WORK/plan.txt"
start=$(date +%s)
python3 bench/gpu_peaks.py "${ARGS[@]}" --peaks "$WORK/peaks.json" 2>&1 | tail -40
python3 - "$WORK" "$OUT" "$(( $(date +%s) - start ))" "$LAYERS" <<'EOF'
import json, sys, torch
from pathlib import Path
work, out, seconds, layers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
summary = json.loads((work / "smoke" / "summary.json").read_text())
result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": layers,
          "wall_seconds": seconds, "stage_seconds": summary["stage_seconds"],
          "peak_cuda_mb": json.loads((work / "peaks.json").read_text()),
          "plan": (work / "plan.txt").read_text(),
          "rows": {k: {m: v.get(m) for m in ("validation", "test", "target_params_kept")}
                   for k, v in summary["rows"].items()}}
out.mkdir(parents=True, exist_ok=True)
(out / "gpu_smoke.json").write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
EOF
