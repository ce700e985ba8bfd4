"""How many reference cells to hold out for calibration, chosen leave-one-dataset-out on small references.

With a fifth of a 100-cell reference held out, the Unknown rule calibrates on 20 cells: too few
for the exponential tail (``MIN_TAIL_CELLS``), so no p-value is below ``2 / 21`` and
Benjamini–Hochberg calls nothing Unknown. Holding out more cells (``novelty_cache.py
--min-calibration-cells``, never more than a third) gives the tail
its cells at the price of fewer cells for the embedder (the classifier is refitted on every
cell either way).

Each candidate is a pair of caches made by ``novelty_cache.py`` with the same
``--reference-cells`` and its ``--min-calibration-cells``: the open-set scenarios and the
closed-set bench tasks (``--closed``, several seeds). Every rule is the package's default
(:func:`spikgpt.openset.decision.decide` with the neighbourhood test), read from the models'
stored calibration cells.

Usage: ``python benchmarks/calibration_cells.py --candidate 20%=OPEN0,CLOSED0 25=OPEN25,CLOSED25
--out benchmarks/results/calibration_cells``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neighbourhood_null import TABLE_HEAD, load, lodo_lines, summarise, table_rows

from spikgpt.bench.tasks import DEFAULT_DATA_ROOT
from spikgpt.openset.decision import DEFAULT_FDR, NEIGHBOURS
from spikgpt.openset.novelty import DEFAULT_COMBINATION


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidate", nargs="+", required=True, help="LABEL=OPEN_CACHE,CLOSED_CACHE")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/calibration_cells"))
    args = p.parse_args()
    res, calibration_cells = {}, {}
    for spec in args.candidate:
        label, dirs = spec.split("=", 1)
        open_dir, closed_dir = (Path(x) for x in dirs.split(","))
        open_set = load(open_dir, False, args.data_dir, DEFAULT_COMBINATION)
        closed = load(closed_dir, True, args.data_dir, DEFAULT_COMBINATION)
        res[label] = summarise(open_set, closed, (NEIGHBOURS,))
        calibration_cells[label] = sorted({len(sc["calibration_statistic"]) for sc in open_set + closed})
    datasets = sorted(next(iter(res.values())))
    lines = [
        f"# Calibration cells held out of small references (FDR {DEFAULT_FDR}, the package's rule)",
        "",
        "recall: share of unseen cells called Unknown, mean over subsample sizes 3, 10, 30, all (5 draws each); "
        "closed worst: worst false Unknown over the closed-set tasks, seeds and query variants.",
        "",
        *(f"- `{k}`: calibration cells per model {v[0]}–{v[-1]}" for k, v in calibration_cells.items()),
        "",
        *TABLE_HEAD,
    ]
    for label, r in res.items():
        lines += table_rows(label, r)
    lines += lodo_lines(res, datasets)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"results": res, "calibration_cells": calibration_cells}, indent=1)
    )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
