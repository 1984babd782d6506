"""Run summaries and search plots (Markdown / CSV / PNG)."""
from __future__ import annotations

import csv
from pathlib import Path

from .io import write_json
from .models.pruning import layer_and_kind


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _confirmed(rows: dict) -> bool:
    """Whether the run scored a confirmation split (then the tables show its column)."""
    return any("confirmation" in row for row in rows.values())


def _size_row(name: str, row: dict, total: int, confirmation: bool = False) -> str:
    """``| model | validation | test | [confirmation |] parameters | decoder Linear weights
    kept |``"""
    test = _pct(row["test"])
    if row.get("test_examples") and row.get("validation") is None:
        test += f" ({row['test_examples']} ex.)"  # a measured form scored on a subset
    confirmed = f" {_pct(row.get('confirmation'))} |" if confirmation else ""
    return (f"| {name} | {_pct(row['validation'])} | {test} |{confirmed}"
            f" {row['params'] / 1e6:.2f}M | {_pct(row['target_params_kept'] / total)} |")


def _head(accuracy: str, confirmation: bool) -> list[str]:
    """The size table's header and rule (``accuracy``: what follows each split's name)."""
    columns = ["model", f"validation{accuracy}", f"test{accuracy}",
               *([f"confirmation{accuracy}"] if confirmation else []),
               "parameters", "decoder Linear weights kept"]
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def format_summary(r: dict) -> str:
    """The short table printed at the end of ``sieve-pl fit``."""
    total = r["target_params"]
    measured = any("peak_memory_mb" in row for row in r["rows"].values())
    confirmation = _confirmed(r["rows"])
    head, rule = _head(" acc", confirmation)
    if measured:
        head += " disk MB | weights MB | peak memory MB | ms / example |"
        rule += "---|---|---|---|"
    lines = ["", f"sieve-pl: {r['strategy']} search at epsilon {r['epsilon']} "
                 f"({r['pruned_units']} of {r['units']} units pruned)", head, rule]
    for name, row in r["rows"].items():
        line = _size_row(name, row, total, confirmation)
        if measured:
            line += "".join(f" {row[k]:.1f} |" if row.get(k) is not None else " |" for k in
                            ("disk_mb", "weights_mb", "peak_memory_mb",
                             "latency_ms_per_example"))
        lines.append(line)
    for source, scores in (r.get("transfer") or {}).items():
        lines.append(f"cross-dataset, {source} ({scores['examples']} examples), test accuracy: "
                     + ", ".join(f"{row} {_pct(v)}" for row, v in scores.items()
                                 if row != "examples"))
    if r.get("cost"):
        c = r["cost"]
        tokens = c["search_tokens"]
        line = f"search cost: {tokens:,} forward tokens in {c['evaluations']} evaluations"
        if c.get("naive_tokens"):
            line += (f" = {_pct(tokens / c['naive_tokens'])} of a naive GA "
                     "(population x generations x validation set)")
        lines.append(line)
    if r.get("confirmation"):
        c = r["confirmation"]
        what = "with LoRA" if c.get("with_lora") else "without recovery"
        verdict = ("pass" if c["passed"] else "failed: stepped back toward dense, "
                   f"{c['searched_kept'] / 1e6:.2f}M -> {c['kept'] / 1e6:.2f}M weights kept")
        lines.append(f"confirmation ({c['examples']} examples no selection read): the search's "
                     f"levels ({what}) {verdict} — accuracy {_pct(c['accuracy'])} vs base "
                     f"{_pct(c['base_accuracy'])}")
    if r.get("refit", {}).get("accuracy_after") is not None:
        f = r["refit"]
        lines.append(f"refit: validation accuracy {_pct(f['accuracy_before'])} -> "
                     f"{_pct(f['accuracy_after'])} ({'kept' if f['used'] else 'discarded'})")
    if (r.get("distill") or {}).get("accuracy_after") is not None:
        f = r["distill"]
        lines.append(f"distillation: validation accuracy {_pct(f['accuracy_before'])} -> "
                     f"{_pct(f['accuracy_after'])} ({'kept' if f['used'] else 'discarded'})")
    rec = r.get("recover") or {}
    if rec.get("best_val_acc") is not None:
        lines.append(_recovery_line(rec, (r.get("confirmation") or {}).get("lora_gate")))
    for task, metrics in next(iter((r.get("lm_eval") or {}).values()), {}).items():
        for metric in (m for m in metrics if m in ("acc", "acc_norm", "exact_match", "f1")):
            lines.append(f"lm-eval {task} {metric}: " + ", ".join(
                f"{row} {_pct(scores[task][metric])}" for row, scores in r["lm_eval"].items()))
    if r.get("bottlenecks"):
        lines.append(f"bottlenecks (never pruned): {len(r['bottlenecks'])} matrices, e.g. "
                     + ", ".join(r["bottlenecks"][:4]))
    lines.append(f"pruned model ({r.get('final', 'pruned')}): {r['model_dir']}")
    if r.get("stage_seconds"):
        lines.append("stage seconds: " + ", ".join(f"{k} {v:.1f}"
                                                   for k, v in r["stage_seconds"].items()))
    return "\n".join(lines)


def _recovery_line(rec: dict, gate: dict | None = None) -> str:
    """What recovery did, and why the export does or does not use it (``gate``: the confirm
    stage's test of LoRA's gain, ``lora_gate``)."""
    kind = "LoRA" if rec.get("quantize", "none") == "none" else f"QLoRA ({rec['quantize']})"
    memory = rec.get("peak_memory_mb")
    steps = f" ({rec['steps']} steps)" if rec.get("steps") is not None else ""
    line = (f"recovery: {kind}, {rec['epochs']} epochs{steps}, validation accuracy by epoch "
            + ", ".join(_pct(a) for a in rec["val_acc"])
            + (f", peak memory {memory:.0f} MB" if memory else ""))
    if rec.get("confirmation_after") is not None:  # the export decision was taken on it
        before, after = rec["confirmation_before"], rec["confirmation_after"]
        why = ""
        if gate:  # the gain in standard errors of the paired difference, against keep_z
            errors = gate["gain"] * gate["examples"] / max(gate["changed"], 1e-12) ** 0.5
            why = f": {errors:+.1f} standard errors, keep_z {gate['z']:g}"
        return line + (f"; confirmation accuracy {_pct(before)} -> {_pct(after)} ("
                       + ("exported" if rec.get("used", True) else "not exported") + why + ")")
    return line + ("" if rec.get("used", True) else
                   f"; not exported (best {_pct(rec['best_val_acc'])} < "
                   f"{_pct(rec['accuracy_before'])} without it)")


# the hub's task type (model-index) of each task kind
TASK_TYPES = {"Classification": "text-classification", "MultipleChoice": "multiple-choice",
              "Generation": "text-generation"}


def _dataset(source: str) -> str:
    """A data source as a card names it: a built-in or hub name, or a local file's name (the
    card may leave this machine; its paths must not)."""
    return Path(source).name if Path(source).expanduser().exists() else source


def model_index(r: dict, name: str, task: str, source: str, metric: str = "accuracy") -> list:
    """The card's ``model-index``: the exported row's validation, test and confirmation scores
    on ``source`` and its cross-dataset scores, in the hub's results format."""
    final = r.get("final", "pruned")
    row = r["rows"].get(final) or {}
    kind = {"type": TASK_TYPES.get(task, "text-generation"), "name": task}

    def result(dataset: str, value: float, label: str, split: str | None = None) -> dict:
        data = {"name": dataset, "type": dataset, **({"split": split} if split else {})}
        return {"task": dict(kind), "dataset": data,  # a copy: no YAML anchors in the card
                "metrics": [{"type": metric, "value": round(float(value), 4), "name": label}]}

    results = [result(_dataset(source), row[split], f"{split} {metric}", split)
               for split in ("validation", "test", "confirmation") if row.get(split) is not None]
    for other, scores in (r.get("transfer") or {}).items():
        if scores.get(final) is not None:
            results.append(result(_dataset(other), scores[final], f"cross-dataset {metric} "
                                  f"({scores['examples']} examples)"))
    return [{"name": name, "results": results}] if results else []


def model_card(r: dict, base_model: str | None, task: str, source: str, prompt: str | None,
               layout: dict, metric: str = "accuracy", repo: str | None = None,
               gguf: dict | None = None, decilm: dict | None = None,
               standard: bool = False) -> str:
    """The export's README.md: Hugging Face card metadata, how it was cut, what it scores, how
    to load and evaluate it (users of every pruning tool ask those three things first).

    ``base_model`` is a hub id or None (a local model: the card names no path); ``repo`` is
    where the export is pushed, the model-index's name; ``gguf``: the GGUF files written
    (``export/gguf.json``); ``decilm``: the DeciLM folder's widths (``export/decilm.json``);
    ``standard``: whether ``export/standard`` was written."""
    import yaml

    total = r["target_params"]
    base, final = r["rows"]["base"], r["rows"].get(r.get("final", "pruned"), {})
    dataset, label = _dataset(source), base_model or "a local model"
    name = repo or f"{(base_model or 'model').rpartition('/')[2]}-sieve-{dataset}"
    meta = {**({"base_model": base_model} if base_model else {}),
            "library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["sieve-pl", "pruned", "task-specific"],
            "model-index": model_index(r, name, task, source, metric)}
    if not meta["model-index"]:
        del meta["model-index"]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {label[0].upper() + label[1:]}, pruned for {dataset} by sieve-pl", "",
             f"Task-specific pruning (LLM-Sieve) of {f'`{base_model}`' if base_model else label}"
             f" for `{task}` on `{dataset}`"
             f" with a {r['strategy']} search at epsilon {r['epsilon']} "
             f"({'relative' if r.get('relative', True) else 'absolute'} accuracy loss allowed)."]
    if final:
        lines += ["", f"**{r.get('final', 'pruned')}**: {_pct(final['target_params_kept'] / total)} of the decoder "
                      f"Linear weights kept, {final['params'] / 1e6:.1f}M of "
                      f"{base['params'] / 1e6:.1f}M parameters; test accuracy "
                      f"{_pct(final['test'])} vs {_pct(base['test'])} for the base model."]
    if prompt:
        lines += ["", "Prompt template (the model was calibrated and selected on it):", "",
                  "```text", prompt, "```"]
    confirmation = _confirmed(r["rows"])
    lines += ["", *_head("", confirmation)]
    lines += [_size_row(name, row, total, confirmation) for name, row in r["rows"].items()]
    lines += ["", "Validation selected the cut; test"
              + (" and confirmation are" if confirmation else " is") + " held out. Accuracy "
              "can drop more on other data than on this task's test split:"]
    for other, scores in (r.get("transfer") or {}).items():
        lines.append(f"- {other} ({scores['examples']} examples): " + ", ".join(
            f"{row} {_pct(v)}" for row, v in scores.items() if row != "examples"))
    if not r.get("transfer"):
        lines.append("- no cross-dataset check was run (`transfer.sources`).")
    for row, tasks in (r.get("lm_eval") or {}).items():
        lines.append(f"- lm-evaluation-harness, {row}: " + "; ".join(
            f"{task} " + ", ".join(f"{m} {v:.4f}" for m, v in metrics.items()
                                   if not m.endswith("_stderr") and m != "sample_len")
            for task, metrics in tasks.items()))
    units = {k: len(v) for k, v in layout.items() if isinstance(v, dict) and v}
    widths = layout.get("intermediate_sizes")
    lines += ["", "Layout (`config.json`, key `sieve`): " + ", ".join(
        f"{n} {k}" for k, n in units.items()) + ": factored Linears hold two smaller ones "
        "(`ranks`), resized ones are smaller Linears (`shapes`), narrowed attention keeps fewer "
        "value dimensions per head (`heads`)."]
    if widths:
        lines += ["", f"Sizes in `config.json`: the MLP size (`intermediate_size`; GPT-2: "
                      f"`n_inner`) is the widest MLP the model holds ({max(widths)} neurons), "
                      "not the unpruned width; `sieve.intermediate_sizes` lists each layer's "
                      f"({', '.join(map(str, widths))}). The attention sizes (heads, "
                      "`head_dim`) are the base model's: a narrowed v is zero-padded back to "
                      "`head_dim` per head, and a factored matrix has no standard field."]
    lines += ["",
        "## Load", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        "path = \"<this folder or repo>\"",
        "# the tokenizer needs no code (False: transformers 5 would ask about config.json's)",
        "tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)",
        "# the pruned layout lives in this folder's modeling_sieve.py: without",
        "# trust_remote_code the load raises instead of building the unpruned architecture",
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
        "```", ""]
    if gguf:
        smallest = min(gguf, key=lambda name: gguf[name]["bytes"])
        archs = sorted({info["architecture"] for info in gguf.values()})
        lines += ["## llama.cpp and Ollama", "",
                  "GGUF files: " + ", ".join(f"`{name}` ({info['bytes'] / 2**20:.0f} MB)"
                                             for name, info in gguf.items())
                  + f"; llama.cpp architecture `{'`, `'.join(archs)}` (`deci`: one MLP width "
                  "per layer, as Nemotron-NAS models; attention is written dense).", "",
                  "```bash", f"llama-cli -m {smallest} -p \"<prompt>\"",
                  "ollama create <name> -f Modelfile  # FROM the GGUF; its chat template",
                  "```", ""]
    lines += ["## vLLM and SGLang", ""]
    if standard:
        lines += ["`../standard` (next to this folder in the run) is the base architecture "
                  "unchanged, with one MLP width in every layer:", "",
                  "```bash", "vllm serve ../standard", "```", ""]
    if decilm:
        lines += ["`../decilm` holds this model as the DeciLM (Nemotron-NAS) architecture that "
                  "vLLM and SGLang serve: each layer's MLP width "
                  f"({', '.join(map(str, decilm['written_widths']))}) is the width kept rounded "
                  "up to a multiple of 256 with zero neurons, and attention is dense. Its config "
                  "class is in the folder:", "",
                  "```bash", "vllm serve ../decilm --trust-remote-code", "```", ""]
    if not (standard or decilm):
        lines += ["This folder's layout is sieve-pl's own, which vLLM does not load. Export "
                  "with `--export.formats '[hf, decilm]'` (any cut) or a standard search "
                  "(`--search.space standard`, `standard` format) for a folder it serves.", ""]
    lines += ["## Evaluate", "", "```bash",
              "lm_eval --model hf --model_args pretrained=<this folder>,trust_remote_code=True "
              "--tasks <task>", "```", ""]
    return "\n".join(lines)


def save_search(result: dict, folder: Path) -> None:
    """search.json, levels.json and levels.png; the GA's logbook.csv and fitness.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder = Path(folder)
    write_json(folder / "search.json", result)
    write_json(folder / "levels.json", result["levels"])
    logbook = result.get("logbook") or []
    if logbook:
        with open(folder / "logbook.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(logbook[0]))
            writer.writeheader()
            writer.writerows(logbook)
        gens = [r["generation"] for r in logbook]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(gens, [r["best"] for r in logbook], marker="o", label="best")
        ax.plot(gens, [r["mean"] for r in logbook], marker=".", label="mean")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("generation")
        ax.set_ylabel("fitness (fraction removed; < 0 infeasible)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "fitness.png", dpi=120)
        plt.close(fig)

    cells = {layer_and_kind(n): keep for n, keep in result["levels"].items()}
    layers = sorted({layer for layer, _ in cells})
    kinds = list(dict.fromkeys(kind for _, kind in cells))
    grid = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), keep in cells.items():
        grid[layers.index(layer), kinds.index(kind)] = keep
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.5 + 0.22 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(kinds)), [k.split(".")[-1] for k in kinds], rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), layers)
    ax.set_ylabel("layer")
    ax.set_title("keep level per unit")
    fig.colorbar(image, ax=ax, label="keep fraction")
    fig.tight_layout()
    fig.savefig(folder / "levels.png", dpi=120)
    plt.close(fig)
