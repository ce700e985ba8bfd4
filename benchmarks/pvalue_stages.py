"""Where the Unknown rule loses its evidence: known and unseen cells' p-values stage by stage.

For every open-set scenario of a ``cross_conformal.py`` cache (the package's cross-fitted rule,
``cross-conformal one fold · fold neighbourhoods · Simes · guard``, whole query, no subsample)
the p-values of the query cells after each stage of :func:`spikgpt.openset.decision.decide`:

- ``raw``: conformal p-values, no shift correction (``shift="none"``);
- ``corrected``: after the package's shift correction (step 3);
- ``neighbourhood``: the neighbourhood test's p-values on the corrected ones (step 4);
- ``merged``: the two merged by Simes, untested types at 1 — what Benjamini–Hochberg sees.

Per stage and dataset (mean over its scenarios): for thresholds ``t``, the share of *known* cells
with ``p <= t`` divided by ``t`` (1: valid and exact; below 1: conservative, the rule spends less
of the FDR than it may; above 1: anti-conservative) and the share of *unseen* cells with
``p <= t`` (power).

Usage: ``python benchmarks/pvalue_stages.py --cache DIR --reference-cells N --out FILE.md``
(``DIR``: a ``cross_conformal.py --cache`` folder of open-set scenarios, seed 0);
``--null-among-all``: the neighbourhood null formed among all query cells, as 0.11–0.26.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from cross_conformal import load_fitted, scenario, uncalibrated_classes
from neighbourhood_null import merged_pvalues, package_decision, positions
from novelty_cache import scenarios

from spikgpt.bench.tasks import DEFAULT_DATA_ROOT, subsample_reference
from spikgpt.openset import decision
from spikgpt.openset.decision import (
    DEFAULT_SHIFT,
    neighbourhood_test,
    neighbourhoods_tested,
)

RULE = "cross-conformal one fold · fold neighbourhoods · Simes · guard"
THRESHOLDS = (0.01, 0.05, 0.1, 0.3)
STAGES = ("raw", "corrected", "neighbourhood", "merged")


def stage_pvalues(sc: dict) -> dict[str, np.ndarray]:
    """The query cells' p-values after each of :data:`STAGES`."""
    idx = np.arange(len(sc["unseen"]))
    corrected = package_decision(sc, idx, DEFAULT_SHIFT).pvalue
    pairs = positions(sc, idx)
    nb = np.ones(len(idx))
    if neighbourhoods_tested([len(c) for _, c in pairs], len(idx)):
        untested = sc["untested"][idx] if "untested" in sc else None
        nb = neighbourhood_test(-np.log(np.maximum(corrected, 1e-300)), pairs, untested)[1]
    return {
        "raw": package_decision(sc, idx, "none").pvalue,
        "corrected": corrected,
        "neighbourhood": nb,
        "merged": merged_pvalues(sc, idx),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--reference-cells", type=int, default=100_000)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_ROOT)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--null-among-all", action="store_true", help="0.11–0.26's neighbourhood null")
    args = ap.parse_args()
    decision.NULL_WITHOUT_OWN_CALLS = not args.null_among_all
    logging.basicConfig(level=logging.ERROR)
    rows: dict[tuple[str, str], list[list[float]]] = {}
    for dataset, name, ref, _query, key, _kw in scenarios(args.data_dir):
        f = args.cache / (name.replace("/", "-") + "__s0.npz")
        if not f.exists():
            continue
        uncalibrated, n_fold0 = uncalibrated_classes(subsample_reference(ref, key, args.reference_cells, 0), key, 0)
        sc = scenario(load_fitted(f), RULE, slice(None), uncalibrated, n_fold0)
        u = sc["unseen"]
        for stage, p in stage_pvalues(sc).items():
            known = [float((p[~u] <= t).mean() / t) for t in THRESHOLDS]
            rows.setdefault((dataset, stage), []).append(known + [float((p[u] <= t).mean()) for t in THRESHOLDS])
        print(name, flush=True)
    ts = " / ".join(str(t) for t in THRESHOLDS)
    lines = [
        f"# p-values stage by stage ({args.reference_cells}-cell references, seed 0, whole queries)",
        "",
        f"t = {ts}. known: share of known cells with p <= t, over t (1 = exact). unseen: share with p <= t.",
        "",
        "| dataset | stage | known / t | unseen <= t |",
        "|---|---|---|---|",
    ]
    table = {}
    for dataset in sorted({d for d, _ in rows}):
        for stage in STAGES:
            m = np.mean(rows[(dataset, stage)], axis=0)
            table.setdefault(dataset, {})[stage] = m.tolist()
            k, s = len(THRESHOLDS), " / "
            lines.append(
                f"| {dataset} | {stage} | {s.join(f'{x:.2f}' for x in m[:k])} | {s.join(f'{x:.2f}' for x in m[k:])} |"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"thresholds": THRESHOLDS, "table": table}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
