"""``sieve-pl plan`` for Llama-3-8B on one 80 GB GPU and Llama-3-70B on 8 x 80 GB, from their
configs alone (no weights exist here: folders with a config.json and the offline tokenizer),
with the demo's task data; and the plan of the 2- and 4-layer 8B-shaped models next to what
bench/big_layers.py measured on this CPU (bench/results/big_layers.json).

    python bench/plan_big.py [--out bench/results/plan_big.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_result

ROOT = Path(__file__).resolve().parents[1]
LLAMA3 = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256,
              rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
              tie_word_embeddings=False, head_dim=128, num_key_value_heads=8)
MODELS = {"llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32),
          "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                             num_attention_heads=64)}
SHAPED = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152,
              hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
              num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
              max_position_embeddings=512)


def folder(tmp: Path, name: str, config: dict) -> Path:
    from sieve_pl.api import DEFAULT_MODEL, load_tokenizer

    path = tmp / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    load_tokenizer(DEFAULT_MODEL).save_pretrained(path)
    return path


def plan(model: Path, dtype: str, gpus: int, *extra: str) -> str:
    command = [sys.executable, "-m", "sieve_pl.cli", "plan", "--config", "configs/demo.yaml",
               "--model.pretrained", str(model), "--model.dtype", dtype, "--gpus", str(gpus),
               "--trainer.enable_progress_bar", "false", *extra]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return done.stdout


def rows(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) >= 5 and cells[0] and cells[0] not in ("stage",) and not cells[0].startswith("-"):
            out[cells[0]] = {"accelerator": cells[1], "host": cells[2], "disk": cells[3],
                             "time": cells[4]}
    return out


def gib(cell: str) -> float:
    value, unit = re.match(r"([\d.]+) (\w+)", cell).groups()
    return float(value) / (1024 if unit == "MiB" else 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/plan_big.json")
    parser.add_argument("--measured", default="bench/results/big_layers.json",
                        help="bench/big_layers.py's JSON to compare the plan with")
    args = parser.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, shape in MODELS.items():
            path = folder(tmp, name, {**LLAMA3, **shape, "torch_dtype": "bfloat16"})
            gpus = 1 if name == "llama3-8b" else 8
            text = plan(path, "bfloat16", gpus, "--gpu_memory", "80",
                        *(["--model.placement", "split"] if gpus > 1 else []),
                        "--calibration.dtype", "float32", "--recover.enabled", "true")
            print(f"## {name} on {gpus} x 80 GB\n\n{text}")
            result[name] = {"gpus": gpus, "plan": text, "rows": rows(text)}
        measured = ROOT / args.measured
        if measured.exists():
            runs = json.loads(measured.read_text())["runs"]
            for run in runs:
                path = folder(tmp, f"shaped-{run['layers']}",
                              {**SHAPED, "num_hidden_layers": run["layers"]})
                text = plan(path, "float32", 0, "--data.sizes",
                            "{calibration: 32, validation: 16, test: 16, train: 16, "
                            "confirmation: 0}",
                            "--search.strategy", "uniform")
                planned = rows(text)
                check = {stage: {"planned_gib": round(gib(planned[stage]["host"]), 2),
                                 "measured_gib": round(s["peak_rss_mb"] / 1024, 2)}
                         for stage, s in run["stages"].items() if stage in planned}
                for c in check.values():
                    c["error"] = round(c["planned_gib"] / c["measured_gib"] - 1, 3)
                print(f"## 8B-shaped, {run['layers']} layers, this CPU: plan vs measured peak "
                      f"RSS\n")
                for stage, c in check.items():
                    print(f"| {stage} | {c['planned_gib']} GiB | {c['measured_gib']} GiB | "
                          f"{100 * c['error']:+.0f}% |")
                result[f"shaped-{run['layers']}"] = {"plan": text, "check": check}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
