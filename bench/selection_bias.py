"""Why the search's own bound is optimistic, and what the confirmation rule buys (simulation).

The search keeps the largest cut whose validation score passes ``lost + z·sqrt(flips) ≤
budget`` among many candidates scored on the same examples: a winner's curse. Here candidates
lie along a frontier: cut j changes answers on a share ``f_j`` of examples (``flips``, rising to
about ``--flips`` at the true ε boundary) of which a share breaks and the rest are fixed, so that
the true accuracy loss rises linearly through ε·base at the middle of the frontier. Each trial
draws a validation split and a confirmation split (independent examples) and applies

1. the search: the largest cut passing the validation bound at ``--z`` (the search's
   ``confidence``);
2. confirmation at ``z_c``: if the chosen cut fails on the confirmation split, step back to the
   largest cut that passes there (what ``search.confirm`` does along the price path).

It reports, per rule, how often the final cut truly breaks ε (its true loss exceeds ε·base) and
the mean true share of the frontier kept. Run:

    python bench/selection_bias.py [--trials 4000] [--n 400] [--n-confirm 400 800 1600]
"""
from __future__ import annotations

import argparse

import numpy as np

from common import write_result


def simulate(trials: int, n: int, candidates: int, base: float, epsilon: float, flips: float,
             z: float, z_confirm: list[float], n_confirm: int | None = None,
             seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    allowed = epsilon * base
    # true loss from 0 to 2ε·base along the frontier (the boundary halfway), flips from 0 to 2×
    loss = np.linspace(0, 2 * allowed, candidates)
    flip = np.linspace(0.005, 2 * flips, candidates)
    broken = loss > allowed
    p_break, p_fix = (flip + loss) / 2, (flip - loss) / 2

    def draw(size):
        """Per trial and candidate: (lost answers, changed answers) on ``size`` examples;
        base errors (lost at dense) are common to all and cancel in the paired bound."""
        u = rng.random((trials, 1, size))  # one draw per example, shared: nested cuts
        breaks = (u < p_break[None, :, None]).sum(-1)
        fixes = ((u >= p_break[None, :, None])
                 & (u < (p_break + p_fix)[None, :, None])).sum(-1)
        return breaks - fixes, breaks + fixes

    def largest(lost, changed, size, zz):
        ok = lost + zz * np.sqrt(changed) <= allowed * size
        ok[:, 0] = True  # the dense end always passes
        return np.where(ok, np.arange(candidates), -1).max(1)

    v_lost, v_changed = draw(n)
    chosen = largest(v_lost, v_changed, n, z)
    rows = {"search only": {"breaks_epsilon": float(broken[chosen].mean()),
                            "frontier_kept": float((chosen / (candidates - 1)).mean())}}
    m = n_confirm or n
    c_lost, c_changed = draw(m)
    for zc in z_confirm:
        ok = c_lost + zc * np.sqrt(c_changed) <= allowed * m
        passes = ok[np.arange(trials), chosen]
        # step back: the largest cut at or below the chosen one that passes confirmation
        ok[:, 0] = True
        upto = np.where(ok & (np.arange(candidates)[None] <= chosen[:, None]),
                        np.arange(candidates), -1).max(1)
        rows[f"confirm z={zc:g}"] = {"passes_first": float(passes.mean()),
                                     "breaks_epsilon": float(broken[upto].mean()),
                                     "frontier_kept": float((upto / (candidates - 1)).mean())}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4000)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--n-confirm", type=int, nargs="+", default=[400, 800, 1600],
                        help="confirmation split sizes to simulate (the demo's: 800)")
    parser.add_argument("--candidates", type=int, default=52)
    parser.add_argument("--base", type=float, default=0.77)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--flips", type=float, default=0.12)
    parser.add_argument("--z", type=float, default=1.0)
    parser.add_argument("--out", default="bench/results/selection_bias.json")
    args = parser.parse_args()
    rows = simulate(args.trials, args.n, args.candidates, args.base, args.epsilon, args.flips,
                    args.z, [0.0, 1.0, 2.0, 3.0], args.n_confirm[0])
    for m in args.n_confirm[1:]:  # the same trials' search, a larger confirmation split
        more = simulate(args.trials, args.n, args.candidates, args.base, args.epsilon,
                        args.flips, args.z, [2.0, 3.0], m)
        rows.update({f"{k}, n_c={m}": v for k, v in more.items() if k != "search only"})
    print(f"{args.trials} trials, n = {args.n} validation examples (confirmation: "
          f"{args.n_confirm[0]} unless n_c says), {args.candidates} candidates, validation z = "
          f"{args.z:g}; the true ε boundary is the frontier's middle (kept 0.5)\n")
    print("| rule | confirmation passes | final cut truly breaks ε | frontier kept |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        first = f"{100 * r['passes_first']:.0f}%" if "passes_first" in r else "-"
        print(f"| {name} | {first} | {100 * r['breaks_epsilon']:.1f}% | "
              f"{r['frontier_kept']:.3f} |")
    write_result(args.out, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
