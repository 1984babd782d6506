"""Big-model layers on this machine: time and peak memory per stage of a random Llama whose
decoder layers have Llama-3-8B's shapes (hidden 4096, MLP 14336, 32 q / 8 kv heads of 128),
with 2 and 4 layers, extrapolated to Llama-3-8B (32 layers) and Llama-3-70B (80 layers of
twice the width: the cubic terms of projection grow 8x, the rest 2-4x).

Each depth runs ``sieve-pl fit`` (calibrate → project → search, the issue's command: the demo
config with small splits, uniform search, no recovery/quantization/transfer) in a fresh process;
a thread samples that process's RSS every 0.2 s and the run's stage.json files give each stage's
seconds, so each stage's peak is the highest RSS seen while it ran.

    python bench/big_layers.py [--layers 2 4] [--out bench/results/big_layers.json]
        [--previous bench/results/big_layers_2.json]  (reuse an earlier depth's run)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from common import write_result
from sieve_pl.api import read_json

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
             num_key_value_heads=8, head_dim=128, vocab_size=49152, tie_word_embeddings=True)
STAGES = ("calibrate", "project", "search")


def make_model(layers: int, folder: Path) -> int:
    """A random 8B-shaped Llama with the offline tokenizer; returns its decoder weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sieve_pl.api import DEFAULT_MODEL, load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, **SHAPE)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    for name, p in model.named_parameters():  # as initialisation gives: norms at one
        torch.nn.init.ones_(p) if "norm" in name else torch.nn.init.normal_(p, std=0.02)
    model.tie_weights()  # (to_empty gave lm_head its own tensor: tied, as the config says)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.model.layers.parameters())


def die_with_parent() -> None:
    """The run is killed when this script dies (Linux): an orphaned run would share the cores
    with the next measurement."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def rss_mb(pid: int) -> float:
    total = 0.0
    for p in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def run(layers: int, root: Path) -> dict:
    model = root / f"llama8b-{layers}"
    weights = make_model(layers, model)
    command = [sys.executable, "-m", "sieve_pl.cli", "fit", "--config", "configs/demo.yaml",
               "--model.pretrained", str(model), "--run.root", str(root),
               "--run.name", f"run-{layers}",
               "--data.sizes", "{calibration: 32, validation: 16, test: 16, train: 16, "
               "confirmation: 0}",
               "--search.strategy", "uniform", "--recover.enabled", "false",
               "--quantize.formats", "[]", "--quantize.measure", "false",
               "--transfer.sources", "{}", "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    samples: list[tuple[float, float]] = []
    start = time.time()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=Path(__file__).resolve().parents[1],
                               preexec_fn=die_with_parent)
    done = threading.Event()

    def sample():
        while not done.is_set():
            samples.append((time.time(), rss_mb(process.pid)))
            time.sleep(0.2)
    threading.Thread(target=sample, daemon=True).start()
    output, _ = process.communicate()
    done.set()
    if process.returncode:
        raise RuntimeError(output[-3000:])
    run_dir = root / f"run-{layers}"
    stages, t = {}, start
    finished = {s: (run_dir / s / "stage.json").stat().st_mtime for s in STAGES}
    for stage in STAGES:  # stage windows end when its stage.json was written
        end = finished[stage]
        seconds = read_json(run_dir / stage / "stage.json")["seconds"]
        peak = max((mb for when, mb in samples if end - seconds - 1 <= when <= end), default=0)
        stages[stage] = {"seconds": seconds, "peak_rss_mb": round(peak)}
        t = end
    disk = {s: sum(f.stat().st_size for f in (run_dir / s).glob("*.safetensors")) / 2**20
            for s in ("calibrate", "project")}
    return {"layers": layers, "decoder_weights": weights, "stages": stages,
            "peak_rss_mb": round(max(mb for _, mb in samples)),
            "wall_seconds": round(time.time() - start, 1), "disk_mb": disk}


def extrapolate(small: dict, big: dict) -> dict:
    """Per-layer cost from the difference of two depths, scaled to 32 and 80 layers."""
    per = big["layers"] - small["layers"]
    out = {}
    for stage in ("calibrate", "project"):
        slope = (big["stages"][stage]["seconds"] - small["stages"][stage]["seconds"]) / per
        fixed = small["stages"][stage]["seconds"] - slope * small["layers"]
        out[stage] = {"seconds_per_layer": round(slope, 1),
                      "llama3_8b_hours": round((fixed + 32 * slope) / 3600, 2),
                      # 70B: hidden 8192, MLP 28672: projection is cubic in the widths (8x),
                      # calibration's products quadratic (4x) per token
                      "llama3_70b_hours": round((fixed + 80 * slope * (8 if stage == "project"
                                                                        else 4)) / 3600, 1)}
    out["peak_rss_growth_mb"] = big["peak_rss_mb"] - small["peak_rss_mb"]
    out["extra_layer_weights_mb"] = round((big["decoder_weights"] - small["decoder_weights"])
                                          * 4 / 2**20)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--out", default="bench/results/big_layers.json")
    parser.add_argument("--previous", nargs="*", default=[],
                        help="earlier JSONs of this script whose runs join the table (same "
                             "machine and code: each depth takes 10-20 minutes here)")
    args = parser.parse_args()
    results = [r for path in args.previous for r in json.loads(Path(path).read_text())["runs"]]
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        results += [run(n, Path(tmp)) for n in args.layers]
    results.sort(key=lambda r: r["layers"])
    payload = {"runs": results}
    if len(results) >= 2:
        payload["extrapolation"] = extrapolate(results[0], results[-1])
    print("| layers | stage | seconds | peak RSS (MB) |\n|---|---|---|---|")
    for r in results:
        for stage, s in r["stages"].items():
            print(f"| {r['layers']} | {stage} | {s['seconds']:.0f} | {s['peak_rss_mb']} |")
        print(f"| {r['layers']} | whole run | {r['wall_seconds']:.0f} | {r['peak_rss_mb']} |")
    if "extrapolation" in payload:
        print(payload["extrapolation"])
    write_result(args.out, payload)


if __name__ == "__main__":
    main()
