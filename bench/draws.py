"""The demo over several data draws: does the ε promise hold out of sample?

Runs ``sieve-pl fit --config configs/demo.yaml --data.seed S`` for each seed (one run folder
each; finished stages are reused, and draws already in the JSON are not rerun, so an
interrupted sweep resumes), then reads every summary:
decoder-Linear weights removed (the export, and without recovery), validation / confirmation /
test accuracy against the base model, the drug-review transfer check, whether the search's
levels passed confirmation and whether recovery was exported. A draw *holds ε* when test and
transfer accuracy are both at least (1 − ε) × the base model's on that set. "Without recovery"
is the same draw with ``recover.enabled false`` (a second run folder that starts from hard links
to the first one's calibrate, project and search stages: only confirmation and evaluation run).

    python bench/draws.py [--seeds 0 1 2] [--config configs/demo.yaml] [extra fit options]

Prints a Markdown table (mean ± sd over the draws) and writes bench/results/draws.json with every
run's summary.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import write_result

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, seed: int, root: str, extra: list[str], plain: bool = False) -> dict:
    name = f"draw-{seed}" + ("-without-recovery" if plain else "")
    if plain:  # the recovered draw's first stages, linked (the stages write by atomic rename)
        for stage in ("calibrate", "project", "search"):
            source, target = ROOT / root / f"draw-{seed}" / stage, ROOT / root / name / stage
            if source.exists() and not target.exists():
                shutil.copytree(source, target, copy_function=os.link)
        extra = [*extra, "--recover.enabled", "false", "--quantize.formats", "[]",
                 "--quantize.measure", "false"]
    command = [sys.executable, "-m", "sieve_pl.cli", "fit", "--config", config,
               "--data.seed", str(seed), "--run.root", root, "--run.name", name,
               "--trainer.enable_progress_bar", "false", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    summary = json.loads((ROOT / root / name / "summary.json").read_text())
    return {**summary, "wall_seconds": time.perf_counter() - start}


def previous_summaries(out: str, config: str, extra: list[str],
                       key: str = "summaries") -> dict[int, dict]:
    """Draws an interrupted sweep already finished (same config and options), even where their
    run folders are gone: a 20-minute draw is not rerun to fill a table."""
    path = ROOT / out
    if not path.exists():
        return {}
    previous = json.loads(path.read_text())
    if previous.get("args", {}).get("config") != config or previous.get("extra") != extra:
        return {}
    return {int(seed): summary for seed, summary in previous.get(key, {}).items()}


def figures(summary: dict, plain: dict | None = None) -> dict:
    rows, eps, total = summary["rows"], summary["epsilon"], summary["target_params"]
    final, base = rows[summary["final"]], rows["base"]
    pruned = rows["pruned"]
    transfer = next(iter(summary.get("transfer", {}).values()), {})
    keep = 1 - eps

    def holds(row_value, base_value):
        return row_value is not None and row_value >= keep * base_value - 1e-9

    confirmed = summary.get("confirmation") or {}
    out = {"removed": 1 - final["target_params_kept"] / total,
           "removed_by_search": 1 - confirmed.get("searched_kept",
                                                  final["target_params_kept"]) / total,
           "removed_without_recovery": (1 - plain["rows"][plain["final"]]["target_params_kept"]
                                        / total) if plain else None,
           "final": summary["final"], "recovery_exported": summary["final"] == "pruned+lora",
           "confirmation_passed": (summary.get("confirmation") or {}).get("passed"),
           "stage_seconds": summary.get("stage_seconds"),
           # the stages' own recorded times: a resumed draw reports what its stages cost
           "seconds": sum((summary.get("stage_seconds") or {}).values()) or summary["wall_seconds"]}
    for split in ("validation", "confirmation", "test"):
        out[split] = {"base": base.get(split), "pruned": pruned.get(split),
                      "final": final.get(split)}
    out["transfer"] = {"base": transfer.get("base"), "pruned": transfer.get("pruned"),
                       "final": transfer.get(summary["final"]),
                       "examples": transfer.get("examples")}
    out["test_holds"] = holds(final.get("test"), base["test"])
    out["transfer_holds"] = holds(out["transfer"]["final"], transfer.get("base") or 0)
    out["recovery_lowered_confirmation"] = (
        rows.get("pruned+lora", {}).get("confirmation") is not None
        and rows["pruned+lora"]["confirmation"] < (pruned.get("confirmation") or 0)
        and summary["final"] == "pruned+lora")
    return out


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--root", default="checkpoints/draws")
    parser.add_argument("--out", default="bench/results/draws.json")
    args, extra = parser.parse_known_args()
    summaries = previous_summaries(args.out, args.config, extra)
    plain = previous_summaries(args.out, args.config, extra, "without_recovery")
    for seed in args.seeds:  # one after another; the JSON is rewritten after each draw
        for done, without in ((summaries, False), (plain, True)):
            if seed in done:
                print(f"draw {seed}{' without recovery' if without else ''}: reusing its "
                      f"summary from {args.out}", file=sys.stderr)
                continue
            done[seed] = run(args.config, seed, args.root, extra, without)
            write_result(args.out, {"args": vars(args), "extra": extra, "summaries": summaries,
                                    "without_recovery": plain})
    summaries = {seed: summaries[seed] for seed in args.seeds}
    rows = {seed: figures(s, plain.get(seed)) for seed, s in summaries.items()}
    print("| draw | removed (search's levels; without recovery) | export | confirmation: base → "
          "final | test: base → final | drug reviews: base → final | holds ε (test, drugs) | "
          "search's levels passed confirmation | recovery lowered confirmation | minutes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for seed, r in rows.items():
        print(f"| {seed} | {pct(r['removed'])} ({pct(r['removed_by_search'])}; "
              f"{pct(r['removed_without_recovery'])}) | "
              f"{r['final']} | {pct(r['confirmation']['base'])} → "
              f"{pct(r['confirmation']['final'])} | {pct(r['test']['base'])} → "
              f"{pct(r['test']['final'])} | {pct(r['transfer']['base'])} → "
              f"{pct(r['transfer']['final'])} | {r['test_holds']}, {r['transfer_holds']} | "
              f"{r['confirmation_passed']} | {r['recovery_lowered_confirmation']} | "
              f"{r['seconds'] / 60:.1f} |")
    print(f"| mean ± sd | {mean_sd([r['removed'] for r in rows.values()])} "
          f"({mean_sd([r['removed_by_search'] for r in rows.values()])}; "
          f"{mean_sd([r['removed_without_recovery'] for r in rows.values()])}) | | | | | | | | |")
    write_result(args.out, {"args": vars(args), "extra": extra, "draws": rows,
                            "summaries": summaries, "without_recovery": plain})


if __name__ == "__main__":
    main()
