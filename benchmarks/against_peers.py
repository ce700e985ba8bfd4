"""A no-peer ``spikgpt bench`` run against the peers of an earlier bench run (same tasks and seeds).

The peers' inputs do not depend on spikgpt's version, so a spikgpt-only rerun
(``spikgpt bench --no-peers``) can be compared with the peers of a committed full run instead of
rerunning them. Prints a markdown table (macro-F1 mean ± s.d. over seeds) and three counts: rows
at or above the best peer, at or above logistic regression on spikgpt's embedding, and with a
seed s.d. ≤ 0.03.

Several spikgpt-only runs (other seeds of the same tasks, e.g. ``run_bench(..., seeds=[3, 4])``
beside a 3-seed run) are pooled: their seeds are concatenated per task and method.

Usage: ``python benchmarks/against_peers.py NEW/results.json [MORE/results.json ...] --peers
benchmarks/results/bench/results.json``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

PEERS = ("celltypist", "celltypist_majority", "singler", "symphony")
TIE = 5e-4  # macro-F1 printed to three decimals: equal there counts as matching


def mean_sd(runs: list[dict], key: str = "macro_f1") -> tuple[float, float]:
    """Mean and sample s.d. of ``key`` over a method's seeds (s.d. 0 for one seed)."""
    v = np.array([r[key] for r in runs])
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def pooled(runs: list[dict]) -> dict:
    """The tasks of several bench results with every method's per-seed rows concatenated."""
    seeds = [s for r in runs for s in r["seeds"]]
    if len(set(seeds)) < len(seeds):
        msg = f"The runs repeat a seed ({seeds}): pool runs of distinct seeds."
        raise SystemExit(msg)
    tasks = {n: {**t, "methods": {k: list(v) for k, v in t["methods"].items()}} for n, t in runs[0]["tasks"].items()}
    for r in runs[1:]:
        for name, t in r["tasks"].items():
            for method, rows in t["methods"].items():
                tasks[name]["methods"][method] += rows
    return tasks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("new", type=Path, nargs="+", help="results.json of the spikgpt-only run(s), pooled")
    p.add_argument("--peers", type=Path, default=Path("benchmarks/results/bench/results.json"))
    args = p.parse_args()
    new = pooled([json.loads(path.read_text()) for path in args.new])
    old = json.loads(args.peers.read_text())["tasks"]
    above_peer = above_lr = stable = 0
    head = ("task", "spikgpt", "spikgpt (peers' run)", "best peer", "LR on embedding", "non-spiking twin")
    print("| " + " | ".join([*head, "false Unknown (worst)"]) + " |")
    print("|---|---|---|---|---|---|---|")
    for task, t in new.items():
        m, o = t["methods"], old[task]["methods"]
        s, sd = mean_sd(m["spikgpt"])
        peers = {name: mean_sd(o[name])[0] for name in PEERS if name in o}
        best = max(peers, key=peers.get)
        lr = mean_sd(m["logreg_embedding"])[0]
        twin, twin_sd = mean_sd(m["non-spiking twin"])
        worst = max(r["false_unknown"] for r in m["spikgpt"])
        above_peer += s >= peers[best] - TIE
        above_lr += s >= lr - TIE
        stable += sd <= 0.03
        print(
            f"| {task} | {s:.3f} ± {sd:.3f} | {mean_sd(o['spikgpt'])[0]:.3f} | {best} {peers[best]:.3f} | {lr:.3f} "
            f"| {twin:.3f} ± {twin_sd:.3f} | {worst:.3f} |"
        )
    print(f"\n{len(new)} rows: at or above the best peer {above_peer}, at or above LR {above_lr}, s.d. ≤ 0.03 {stable}")


if __name__ == "__main__":
    main()
