"""Human-readable run summaries."""
from __future__ import annotations


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_summary(r: dict) -> str:
    """The short table printed at the end of ``sieve-pl fit``."""
    kept, total = r["target_params"]["kept"], r["target_params"]["total"]
    dense, pruned = r["model_params"]["dense"], r["model_params"]["pruned"]
    lines = [
        "",
        f"sieve-pl: uniform keep {r['keep']:.3f} at epsilon {r['epsilon']} "
        f"({r['factored_matrices']} matrices factored)",
        "| model  | validation acc | test acc | parameters |",
        "|--------|----------------|----------|------------|",
        f"| base   | {_pct(r['base']['validation']):>14} | {_pct(r['base']['test']):>8} "
        f"| {dense / 1e6:>8.2f}M |",
        f"| pruned | {_pct(r['pruned']['validation']):>14} | {_pct(r['pruned']['test']):>8} "
        f"| {pruned / 1e6:>8.2f}M |",
        f"decoder Linear weights kept: {kept:,} / {total:,} ({_pct(kept / total)}); "
        f"whole model: {_pct(pruned / dense)}",
        f"pruned model: {r['model_dir']}",
    ]
    if r.get("stage_seconds"):
        lines.append("stage seconds: " + ", ".join(f"{k} {v:.1f}"
                                                   for k, v in r["stage_seconds"].items()))
    return "\n".join(lines)
