"""Accuracy vs decoder-Linear parameters kept: every compression variant on one plot.

Gathers what the other benchmarks and the pipeline measured on the same model and splits (it
refuses inputs whose model or split sizes differ):

* uniform keep levels per projection method and MLP form (factored matrices or neuron units),
  before recovery (``projection_methods.json``);
* uniform ``output_aligned`` levels before and after LoRA (``recovery.json``);
* each run's uniform bisection, per-kind seed and genetic search at its epsilon, before and after
  LoRA, and the dense model with and without the same LoRA budget (each run's
  ``summary.json``, written by ``sieve-pl fit``); the factored-only GA rows measured before
  neuron units existed are kept from the previous ``quality.json``, labelled as such.

Usage (after those have run):

    python bench/quality.py --runs checkpoints/demo checkpoints/demo_eps01

Prints a Markdown table, writes bench/results/quality.json and bench/results/quality.png.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from common import write_result  # noqa: E402


def run_rows(run: Path) -> tuple[list[dict], dict]:
    """Rows of one pipeline run: base, dense+LoRA, the search's levels before and after LoRA."""
    summary = json.loads((run / "summary.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    total = summary["rows"]["base"]["target_params_kept"]
    eps = summary["epsilon"]
    form = ("neurons" if config.get("projection", {}).get("mlp", "factored") == "neurons"
            else "factored")
    refit = " + compensation" if summary.get("refit", {}).get("used") else ""
    names = {"base": ("dense", "none"), "dense+lora": ("dense", "lora"),
             "uniform": (f"{form}: uniform, eps {eps:g}", "none"),
             "seed": (f"{form}: per-kind seed, eps {eps:g}", "none"),  # older runs
             "seed_kind": (f"{form}: per-kind seed, eps {eps:g}", "none"),
             "seed_sensitivity": (f"{form}: sensitivity seed, eps {eps:g}", "none"),
             "pruned": (f"{form}: genetic{refit}, eps {eps:g}", "none"),
             "pruned+lora": (f"{form}: genetic{refit}, eps {eps:g}", "lora")}
    rows = [{"variant": variant, "lora": lora,
             "kept": summary["rows"][key]["target_params_kept"] / total,
             "validation": summary["rows"][key]["validation"],
             "test": summary["rows"][key]["test"], "source": str(run / "summary.json")}
            for key, (variant, lora) in names.items() if key in summary["rows"]]
    return rows, {"model": config["model"]["pretrained"], "sizes": config["data"]["sizes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["checkpoints/demo"])
    parser.add_argument("--results", default="bench/results")
    args = parser.parse_args()
    results = Path(args.results)

    rows, sources = [], {}
    earlier = results / "quality.json"
    if earlier.exists():  # the factored-only GA runs measured before neuron units existed
        rows += [{**r, "variant": f"factored: {r['variant']} (earlier run)"}
                 for r in json.loads(earlier.read_text())["rows"]
                 if r["variant"].startswith("genetic")]
        rows += [r for r in json.loads(earlier.read_text())["rows"]
                 if r["variant"].startswith("factored: genetic")
                 and r["variant"].endswith("(earlier run)")]
    for run in map(Path, args.runs):
        found, sources[str(run)] = run_rows(run)
        rows += [r for r in found if not (r["variant"] == "dense" and any(
            q["variant"] == "dense" and q["lora"] == r["lora"] for q in rows))]
    methods = json.loads((results / "projection_methods.json").read_text())
    sources["projection_methods.json"] = {"model": methods["model"], "sizes": methods["sizes"]}
    def method_variant(r: dict) -> str:
        if r.get("mlp", "factored") == "factored":
            return f"uniform {r['method']}"
        cut = "MLP neurons only" if r.get("units") == "mlp" else f"MLP neurons + {r['method']}"
        return f"uniform {cut} ({r['neuron_order']})"

    rows += [{"variant": method_variant(r), "lora": "none", "kept": r["kept"],
              "validation": r["validation"], "test": r["test"],
              "source": "projection_methods.json"}
             for r in methods["rows"] if r["method"] != "dense" and "kept" in r]
    recovery = json.loads((results / "recovery.json").read_text())
    sources["recovery.json"] = {"model": recovery["model"], "sizes": recovery["sizes"]}
    rows += [{"variant": "uniform output_aligned", "lora": r["lora"], "kept": r["kept"],
              "validation": r["validation"], "test": r["test"], "source": "recovery.json"}
             for r in recovery["rows"] if r["levels"].startswith("uniform")
             and not (r["lora"] == "none" and any(
                 q["variant"] == "uniform output_aligned" and abs(q["kept"] - r["kept"]) < 1e-9
                 for q in rows))]
    for name, seen in sources.items():  # one model, one set of splits, or nothing
        first = next(iter(sources.values()))
        if seen["model"] != first["model"] or any(
                seen["sizes"].get(k) != first["sizes"].get(k)
                for k in ("calibration", "validation", "test")):
            raise SystemExit(f"{name} measured another model or other splits: {seen} vs {first}")
    rows.sort(key=lambda r: (r["variant"], r["lora"], -r["kept"]))

    print("| variant | LoRA | decoder weights kept | validation | test |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['lora']} | {100 * r['kept']:.1f}% "
              f"| {100 * r['validation']:.1f}% | {100 * r['test']:.1f}% |")

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), sharey=True)
    variants = sorted({r["variant"] for r in rows})
    colors = dict(zip(variants, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, split in zip(axes, ("validation", "test")):
        for variant in variants:
            for lora, marker, style in (("none", "o", "-"), ("lora", "s", "--")):
                pts = sorted((r["kept"], r[split]) for r in rows
                             if r["variant"] == variant and r["lora"] == lora)
                if pts:
                    ax.plot([100 * x for x, _ in pts], [100 * y for _, y in pts], style,
                            marker=marker, color=colors[variant],
                            label=f"{variant}{' + LoRA' if lora == 'lora' else ''}")
        ax.set_title(f"{split} accuracy")
        ax.set_xlabel("decoder-Linear weights kept (%)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{first['model']}: accuracy vs weights kept (solid: closed form; "
                 "dashed: + LoRA)")
    fig.tight_layout()
    fig.savefig(results / "quality.png", dpi=120)
    write_result(str(results / "quality.json"), {"rows": rows, "sources": sources})


if __name__ == "__main__":
    main()
