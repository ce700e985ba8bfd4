"""Held-out vs cross-fitted calibration: the default Unknown rule on two novelty caches.

Build the caches with ``benchmarks/novelty_cache.py`` (``--calibration-folds 1``, the default,
and ``--calibration-folds 5``), then compare the default rule (kNN + confidence + residual, scale
shift correction, mapping on) per dataset, with the metrics of ``novelty_decision.py``:

    python benchmarks/calibration_folds.py --held-out DIR1 --cross-fitted DIR2 \\
        --datasets pancreas cellbench pbmc68k mesc
"""

from __future__ import annotations

import argparse
from pathlib import Path

import novelty_decision as nd

from spikgpt.openset.decision import DEFAULT_FDR, DEFAULT_SHIFT
from spikgpt.openset.novelty import DEFAULT_COMBINATION


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--held-out", type=Path, required=True)
    p.add_argument("--cross-fitted", type=Path, required=True)
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--draws", type=int, default=5)
    args = p.parse_args()
    print("| dataset | calibration | AUROC | unseen → Unknown | false Unknown | FDR | known macro-F1 |")
    print("|---|---|---|---|---|---|---|")
    for label, folder in (("held out", args.held_out), ("5-fold cross-fitted", args.cross_fitted)):
        scenarios = [s for s in nd.load(folder) if str(s["dataset"]) in args.datasets]
        for dataset in args.datasets:
            rows = [
                r
                for s in scenarios
                if str(s["dataset"]) == dataset
                for r in nd.evaluate(s, DEFAULT_COMBINATION, DEFAULT_SHIFT, False, True, DEFAULT_FDR, args.draws)
            ]
            m = nd.summarise(rows)
            print(
                f"| {dataset} | {label} | {m['auroc']:.3f} | {m['recall']:.2f} | {m['false_unknown']:.3f} "
                f"| {m['fdr']:.2f} | {m['macro_f1']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
