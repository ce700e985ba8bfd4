"""Leave-one-dataset-out over several reference sizes at once, from :mod:`architecture` results.

Each ``--runs LABEL=DIR`` is a results folder of ``benchmarks/architecture.py`` (one JSON file per
configuration). For each left-out dataset the configuration with the best mean macro-F1 over the
other datasets, every task and every run, is chosen and scored on the left-out dataset, run by run.

Usage: ``python benchmarks/combined_lodo.py --runs full=benchmarks/results/refit
100=benchmarks/results/refit_100 --configs default refit_nofloor floor300
--out benchmarks/results/refit/combined_lodo.md``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from spikgpt.bench.tasks import TASKS

DATASET = {t: t.split("_")[0] for t in TASKS}


def table(rows: list[dict], configs: list[str], runs: list[str]) -> str:
    def mean(config: str, datasets: set[str], which: list[str]) -> float:
        return float(
            np.mean(
                [
                    np.mean([r["macro_f1"] for r in rows if (r["config"], r["task"], r["run"]) == (config, t, g)])
                    for t in TASKS
                    if DATASET[t] in datasets
                    for g in which
                ]
            )
        )

    head = (
        ["left out", "chosen on the others"] + [f"held out, {g}" for g in runs] + [f"{configs[0]}, {g}" for g in runs]
    )
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    held = []
    for d in sorted(set(DATASET.values())):
        best = max(configs, key=lambda c: mean(c, set(DATASET.values()) - {d}, runs))
        held.append([mean(best, {d}, [g]) for g in runs] + [mean(configs[0], {d}, [g]) for g in runs])
        lines.append(f"| {d} | {best} | " + " | ".join(f"{x:.3f}" for x in held[-1]) + " |")
    lines.append("| **mean** | | " + " | ".join(f"**{x:.3f}**" for x in np.mean(held, axis=0)) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="LABEL=DIR")
    p.add_argument("--configs", nargs="+", required=True, help="the first is the baseline column")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    rows = []
    for spec in args.runs:
        label, folder = spec.split("=", 1)
        for c in args.configs:
            rows += [{**r, "run": label} for r in json.loads((Path(folder) / f"{c}.json").read_text())]
    text = table(rows, args.configs, [s.split("=", 1)[0] for s in args.runs])
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
