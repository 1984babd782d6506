"""llama.cpp against the HF export: does the GGUF a run wrote answer as the transformers model
does, and is it smaller than the base model's GGUF at the same type?

For each ``export/model/model-<type>.gguf`` of the run, llama.cpp (through llama-cpp-python, its own
loader and kernels) reads every test prompt and picks the label word with the highest logit;
the HF export (``export/model``) does the same through transformers. Reports agreement and
both accuracies, the architecture written, and the file's size next to the base model's GGUF
written at the same type by the same writer (the dense model: nothing pruned). Usage:

    python bench/gguf_check.py --config configs/demo.yaml [--run.name demo]
        [--out bench/results/gguf_check.json]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import open_run, write_result
from sieve_pl.api import builtin_gguf, BUILTIN_MODELS, load_model, read_json, write_gguf


def llama_cpp_classes(path: Path, prompts: list[list[int]], label_ids: list[int]) -> list[int]:
    from llama_cpp import Llama

    # logits_all: without it llama-cpp-python keeps no logits after eval (its sampler reads them)
    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=1024, n_threads=2, logits_all=True,
                verbose=False)
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[llm.n_tokens - 1])
        out.append(int(np.argmax(logits[label_ids])))
    return out


@torch.no_grad()
def hf_classes(net, prompts: list[list[int]], label_ids: list[int]) -> list[int]:
    out = []
    for ids in prompts:
        logits = net(input_ids=torch.tensor([ids])).logits[0, -1]
        out.append(int(torch.argmax(logits[label_ids])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/gguf_check.json")
    args, cli_args = parser.parse_known_args()
    pipeline, run = open_run(cli_args)
    lm, data = pipeline.lm, pipeline.data
    task, tokenizer = lm.task, data.tokenizer
    label_ids = [ids[0] for ids in task._tokenize(tokenizer)]  # single-token label words
    rows = list(data.splits["test"])
    prompts = [tokenizer(task.prompt_text(r))["input_ids"] for r in rows]  # as collate does
    truth = [task.labels.index(str(r[task.label_field])) for r in rows]
    export = run.path / "export"
    net, _ = load_model(str(export / "model"))
    start = time.time()
    hf = hf_classes(net.eval(), prompts, label_ids)
    result = {"examples": len(rows), "hf_accuracy": float(np.mean(np.equal(hf, truth))),
              "hf_seconds": round(time.time() - start, 1), "files": {}}
    source = builtin_gguf(lm.pretrained) if lm.pretrained in BUILTIN_MODELS else None
    written = read_json(export / "gguf.json")
    for name, info in written.items():
        start = time.time()
        cpp = llama_cpp_classes(export / "model" / name, prompts, label_ids)
        with tempfile.TemporaryDirectory() as tmp:  # the dense model through the same writer
            base = write_gguf(lm.net, tokenizer, Path(tmp) / "base.gguf", info["type"], source)
        result["files"][name] = {
            **info, "agreement": float(np.mean(np.equal(cpp, hf))),
            "accuracy": float(np.mean(np.equal(cpp, truth))),
            "seconds": round(time.time() - start, 1), "base_bytes": base["bytes"],
            "size_vs_base": info["bytes"] / base["bytes"]}
        print(name, result["files"][name], flush=True)
    print("| file | arch | agreement with HF | accuracy (HF export) | MB | base MB |\n"
          "|---|---|---|---|---|---|")
    for name, r in result["files"].items():
        print(f"| {name} | {r['architecture']} | {100 * r['agreement']:.2f}% | "
              f"{100 * r['accuracy']:.2f}% ({100 * result['hf_accuracy']:.2f}%) | "
              f"{r['bytes'] / 2**20:.1f} | {r['base_bytes'] / 2**20:.1f} |")
    write_result(args.out, {**result, "run": str(run.path)})


if __name__ == "__main__":
    main()
