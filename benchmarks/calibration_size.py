"""Held-out against cross-fitted calibration across reference sizes, and one rule for all of them.

Reads ``benchmarks/cross_conformal.py`` results at several ``--reference-cells`` (``--runs
LABEL=DIR``, each a folder with its ``results.json``). Two tables:

1. per size, the objective of ``novelty_decision.py`` (mean share of unseen cells called Unknown
   minus twice the worst dataset's FDR and false-Unknown excesses, closed-set tasks included) of
   every rule, with the held-out rule (20 % held out, as ``calibration_folds=1``) where the run
   has it: where cross-fitting should start;
2. leave-one-dataset-out over the rules present at every size: for each dataset the rule with the
   best objective on the other four, averaged over sizes, scored on that dataset at each size.

Usage: ``python benchmarks/calibration_size.py --runs 100=benchmarks/results/cross_conformal_020
150=DIR 250=DIR --out benchmarks/results/calibration_size.md``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from cross_conformal import objective_of


def load(runs: list[str]) -> dict[str, dict]:
    """``LABEL=DIR`` → each run's results (rule → dataset → summary)."""
    out = {}
    for spec in runs:
        label, folder = spec.split("=", 1)
        out[label] = json.loads((Path(folder) / "results.json").read_text())
    return out


def worst(res: dict[str, dict], key: str) -> float:
    """The largest finite value of ``key`` over datasets."""
    values = [v[key] for v in res.values() if np.isfinite(v[key])]
    return float(max(values)) if values else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="LABEL=DIR of cross_conformal.py results")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    runs = load(args.runs)
    labels = list(runs)
    datasets = sorted(next(iter(runs[labels[0]].values())))
    lines = [
        "# Held-out against cross-fitted calibration by reference size (FDR 0.1)",
        "",
        "Per size: mean share of unseen cells called Unknown / worst dataset's FDR / worst closed-set "
        "false Unknown / objective (novelty_decision.py's).",
        "",
        "| rule | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    rules = list(dict.fromkeys(r for res in runs.values() for r in res))
    for rule in rules:
        cells = []
        for label in labels:
            res = runs[label].get(rule)
            if res is None:
                cells.append("–")
                continue
            recall = np.mean([v["recall"] for v in res.values()])
            cells.append(
                f"{recall:.3f} / {worst(res, 'fdr'):.3f} / {worst(res, 'closed_worst_false_unknown'):.3f} / "
                f"{objective_of(res, datasets):.3f}"
            )
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    common = [r for r in rules if all(r in res for res in runs.values())]
    lines += [
        "",
        "Leave-one-dataset-out over the rules at every size (chosen on the other datasets' mean objective over sizes):",
        "",
        "| left out | chosen on the others | " + " | ".join(f"recall / FDR / closed worst, {g}" for g in labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for d in datasets:
        others = [x for x in datasets if x != d]
        best = max(common, key=lambda r: np.mean([objective_of(runs[g][r], others) for g in labels]))
        scored = [runs[g][best][d] for g in labels]
        lines.append(
            f"| {d} | {best} | "
            + " | ".join(f"{s['recall']:.3f} / {s['fdr']:.3f} / {s['closed_worst_false_unknown']:.3f}" for s in scored)
            + " |"
        )
    best = max(common, key=lambda r: np.mean([objective_of(runs[g][r], datasets) for g in labels]))
    lines += ["", f"Chosen on all datasets and sizes: `{best}`."]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
