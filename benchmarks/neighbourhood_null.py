"""The neighbourhood test of the Unknown rule, chosen leave-one-dataset-out on the caches of ``novelty_cache.py``.

Built in 0.11 from this script's prototype (the rows ``m=10`` run the package's
:func:`~spikgpt.openset.decision.decide` with positions; other sizes are computed here the same
way). The issue's suggestion for small groups of new cells ("test them as a group, with a null
calibrated for groups of that size"). For a query cell x, ``T_m(x)`` is the mean corrected
``−log p`` (the default rule's, after its shift correction) of its ``m`` nearest other query
cells in the mapped, standardised embedding. The null is the same statistic of the held-out
calibration cells, each placed among the query cells: the neighbourhood of a known cell, with
whatever correlation neighbouring cells' scores have (a Gamma null for averages of independent
cells was anti-conservative, FDR 0.73 on pbmc68k, README). ``p_m(x)`` is its conformal p-value
(with the exponential tail); the cell's p-value is ``K · min(p_own, p_m …)`` over its ``K``
tests (Bonferroni), then Benjamini–Hochberg at 0.10 as in the package.

The caches of ``novelty_cache.py`` do not hold the calibration cells' embeddings, so they are
rebuilt: the reference is regenerated, split with the model's seed as :func:`spikgpt.train`
splits it, and embedded; the stored calibration scores must be reproduced (checked).

Usage: ``python benchmarks/neighbourhood_null.py --cache DIR --closed-cache DIR2 --neighbours 10 5 2,5,10
--out benchmarks/results/neighbourhood_null``; ``--gates``, ``--gate-quantiles`` and ``--shifts`` add rules; ``--pool
OLD/results.json`` repeats the leave-one-dataset-out choice on these results pooled with a
replicate run's (caches built on another machine). ``--scores scaled_mahalanobis_embedding
pca_residual --scale-powers 0 0.5 1`` tests the class-scaled distance (calibration scores that
models older than it lack are computed from their calibration cells' positions).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
from novelty_cache import closed_tasks, scenarios
from novelty_decision import objective

from spikgpt.api import labels_of
from spikgpt.bench.tasks import DEFAULT_DATA_ROOT
from spikgpt.data import Cells
from spikgpt.model import SpikGPTModel
from spikgpt.model.training import MIN_SPLIT_CELLS, stratified_split
from spikgpt.openset import novelty as novelty_module
from spikgpt.openset.decision import (
    DEFAULT_FDR,
    DEFAULT_SHIFT,
    GATE,
    GATE_QUANTILE,
    NEIGHBOURS,
    adaptive_qvalues,
    bh_qvalues,
    calibration_statistic,
    combined_statistic,
    decide,
    fold_neighbourhood_pvalues,
    neglog_pvalues,
    neighbourhood_test,
    neighbourhoods_tested,
    parse_shift,
    shift_correction,
)
from spikgpt.openset.novelty import DEFAULT_COMBINATION, CellOutputs

SIZES = (3, 10, 30, None)
#: How :func:`evaluate` turns p-values into calls: the package's (Storey-adaptive) Benjamini–Hochberg
#: since 0.26; results committed before 0.26 used plain ``bh_qvalues`` (``QVALUES[0] = bh_qvalues``).
QVALUES = [adaptive_qvalues]


def prepare(
    model: SpikGPTModel, ref, key: str, kw: dict, seed: int, z, names: tuple[str, ...], rows=slice(None)
) -> dict:
    """The ``−log p`` of scores ``names`` before shift correction, predictions and positions of query and calibration.

    Models since 0.11 store their calibration cells' positions; for older ones the calibration
    cells are rebuilt from ``ref`` (0.2 held out, as those versions did) and checked.
    """
    cal_positions = model.novelty.calibration_positions()
    stored = calibration_scores(model.novelty, cal_positions, names)
    if cal_positions is None:
        y, _ = labels_of(ref, key)
        _, cal_idx = stratified_split(y, 0.2, min_cells=MIN_SPLIT_CELLS, seed=seed)
        E_cal, r_cal = model.embedder.embed(Cells(ref[cal_idx], **kw))
        out = model.outputs(E_cal)
        out.residual = r_cal
        rebuilt = model.raw_scores(out, names)
        if not all(np.allclose(rebuilt[n], stored[n], rtol=1e-4, atol=1e-5) for n in names):
            msg = "calibration cells not reproduced: the cache was made with other code or data"
            raise RuntimeError(msg)
        cal_positions = out.embedding
    E = z["q_embedding"][rows]
    ok = np.isfinite(E).all(axis=1)
    E = E[ok]
    mapped = model.map_query(E)
    E = E - mapped.shift * model.input_std
    q = model.outputs(E)
    q.residual = z["q_residual"][rows][ok]
    scores = model.raw_scores(q, names)
    cal_stat = calibration_statistic(stored, names)
    stat, _ = combined_statistic(scores, stored, names)
    return {
        "names": names,
        "novelty": model.novelty,
        "scores": scores,
        "calibration": stored,
        "calibration_statistic": cal_stat,
        "L": neglog_pvalues(stat, cal_stat),
        "pred": q.probs.argmax(axis=1),
        "Zq": q.embedding,
        "Zc": cal_positions,
        "unseen": ~np.isin(z["q_truth"][rows][ok], model.classes),
        "matched": mapped.matched,
    }


def calibration_scores(novelty, positions: np.ndarray | None, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The stored calibration scores ``names``; an embedding-space score that models older than it lack is computed
    from the calibration cells' positions (models since 0.11)."""
    missing = [n for n in names if f"cal_{n}" not in novelty.state]
    stored = {n: novelty.state[f"cal_{n}"] for n in names if n not in missing}
    if missing:
        stored |= embedding_scores(novelty, positions, tuple(missing))
        if any(len(v) != len(positions) for v in stored.values()):
            raise RuntimeError("calibration positions are a sample of the calibration cells: cannot rescore")
    return stored


def embedding_scores(novelty, X: np.ndarray, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Scores ``names`` that read only the standardised embedding ``X`` (no network outputs needed)."""
    return novelty.raw_scores(CellOutputs.of_embedding(X), names)


def with_scale_power(sc: dict, power: float) -> dict:
    """``sc`` rescored with ``scaled_mahalanobis_embedding`` at ``CLASS_SCALE_POWER = power``."""
    name, names = "scaled_mahalanobis_embedding", sc["names"]
    if name not in names:
        return sc
    saved = novelty_module.CLASS_SCALE_POWER
    novelty_module.CLASS_SCALE_POWER = power  # the scorer recomputes its class scales for a new power
    try:
        scores = {**sc["scores"], **embedding_scores(sc["novelty"], sc["Zq"], (name,))}
        cal = {**sc["calibration"], **embedding_scores(sc["novelty"], sc["Zc"], (name,))}
    finally:
        novelty_module.CLASS_SCALE_POWER = saved
    cal_stat = calibration_statistic(cal, names)
    L = neglog_pvalues(combined_statistic(scores, cal, names)[0], cal_stat)
    return {**sc, "scores": scores, "calibration": cal, "calibration_statistic": cal_stat, "L": L, "power": power}


def positions(sc: dict, idx: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The scenario's ``(query, calibration)`` positions, query rows ``idx``: ``Zq`` / ``Zc``, or one pair per
    fold model (``positions``, a cross-fitted model's)."""
    return [(q[idx], c) for q, c in sc.get("positions") or [(sc["Zq"], sc["Zc"])]]


def package_decision(sc: dict, idx: np.ndarray, shift: str, **kw):
    """:func:`~spikgpt.openset.decision.decide` on the scenario's query cells ``idx`` (``kw``: positions, untested)."""
    return decide(
        {n: v[idx] for n, v in sc["scores"].items()},
        sc["calibration"],
        sc["names"],
        calibration_statistics=sc["calibration_statistic"],
        shift=shift,
        null_cells=sc["matched"][idx],
        groups=sc["pred"][idx],
        **kw,
    )


def merged_pvalues(
    sc: dict, idx: np.ndarray, shift: str = DEFAULT_SHIFT, merge: str = "simes", fdr: float = DEFAULT_FDR
) -> np.ndarray:
    """The package's rule with its cell's own and neighbourhood p-values merged by ``merge``.

    ``"simes"``: the package's :func:`~spikgpt.openset.decision.neighbourhood_test` (since 0.23
    ``min(2 · min(p, p_nb), max(p, p_nb))``, valid when the two p-values are positively dependent,
    as two measures of the same novelty are; since 0.27 with the null formed among the cells not
    called Unknown on their own p-values at ``fdr`` by ``QVALUES[0]``; set
    ``decision.NULL_WITHOUT_OWN_CALLS = False`` to reproduce 0.23–0.26). ``"bonferroni"``: ``2 · min(p, p_nb)``
    (the package's 0.11–0.22), so the committed rows of that rule stay reproducible. Cells
    ``untested`` get 1 after the merge, ``withhold`` as the package.
    """
    d = package_decision(sc, idx, shift)
    p = d.pvalue
    pairs = positions(sc, idx)
    untested = sc["untested"][idx] if "untested" in sc else None
    if neighbourhoods_tested([len(c) for _, c in pairs], len(idx)):
        L = -np.log(np.maximum(p, 1e-300))
        if merge == "bonferroni":
            p = np.minimum(1.0, 2 * np.minimum(p, fold_neighbourhood_pvalues(L, pairs)))
        else:
            p, _ = neighbourhood_test(L, pairs, untested, calls=lambda q: QVALUES[0](q) <= fdr)
    if untested is not None:
        p = np.where(untested, 1.0, p)
    return np.ones(len(idx)) if sc.get("withhold") and d.shift["location"] > 0 else p


def pvalues(
    sc: dict,
    idx: np.ndarray,
    ms: tuple[int, ...],
    gate: float = GATE,
    shift: str = DEFAULT_SHIFT,
    quantile: float = GATE_QUANTILE,
) -> np.ndarray:
    """The rule's p-values of query cells ``idx``, with the neighbourhood tests ``ms``.

    No test, or the package's (``ms == (NEIGHBOURS,)``), at the package's ``gate`` and gate ``quantile``:
    :func:`spikgpt.openset.decision.decide` itself with ``shift`` (``@matched``: estimated on the
    cells the query mapping matched, as :func:`spikgpt.annotate` passes them), so those rows are
    the package's rule — with the package's test, its own p-values and the neighbourhood test's
    merged here (:func:`merged_pvalues`): by Simes where the scenario says ``combine="simes"``
    (the package since 0.23), else by Bonferroni (0.11–0.22), so the committed rows of both
    reproduce; other sizes and gates are computed here, merged by Bonferroni. A scenario marked
    ``withhold`` (a cross-fitted model's) calls nothing where the shift correction ran
    (``decide(withhold_under_shift=True)``, as cross-fitted models decide); one with ``untested``
    (a mask over the query) tests none of those cells (``decide(untested=...)``).
    """
    default_power = sc.get("power", novelty_module.CLASS_SCALE_POWER) == novelty_module.CLASS_SCALE_POWER
    if sc.get("combine") == "simes" and ms == (NEIGHBOURS,):
        return merged_pvalues(sc, idx, shift, "simes")
    package = gate == GATE and quantile == GATE_QUANTILE and default_power
    if ms == (NEIGHBOURS,) and package:
        return merged_pvalues(sc, idx, shift, "bonferroni")
    if ms == () and package:
        d = package_decision(sc, idx, shift, untested=sc["untested"][idx] if "untested" in sc else None)
        # decide(withhold_under_shift=True) at whatever FDR the caller's Benjamini–Hochberg uses
        return np.ones(len(idx)) if sc.get("withhold") and d.shift["location"] > 0 else d.pvalue
    if sc.get("withhold") or "untested" in sc:
        raise ValueError(
            "withheld and untested calls are the package's rule: its gate, quantile and neighbourhoods only"
        )
    mode, on_matched = parse_shift(shift)
    null_cells = sc["matched"][idx] if on_matched else None
    L, _ = shift_correction(sc["L"][idx], mode, null_cells, sc["pred"][idx], gate=gate, gate_quantile=quantile)
    tests = [np.exp(-L)] + [fold_neighbourhood_pvalues(L, positions(sc, idx), m) for m in ms]
    return np.minimum(1.0, len(tests) * np.min(tests, axis=0))


def evaluate(
    sc: dict,
    ms: tuple[int, ...],
    fdr: float,
    sizes=SIZES,
    draws: int = 5,
    gate: float = GATE,
    shift: str = DEFAULT_SHIFT,
    quantile: float = GATE_QUANTILE,
) -> list[dict]:
    """Recall, false Unknown and FDR on one scenario for each subsample size of its unseen cells."""
    unseen = sc["unseen"]
    ui, ki = np.flatnonzero(unseen), np.flatnonzero(~unseen)
    rows = []
    for size in sizes:
        if size is not None and size >= len(ui):
            continue
        for d in range(1 if size is None else draws):
            pick = ui if size is None else np.random.default_rng(d).choice(ui, size, replace=False)
            idx = np.sort(np.concatenate([ki, pick]))
            called, u = QVALUES[0](pvalues(sc, idx, ms, gate, shift, quantile)) <= fdr, unseen[idx]
            rows.append(
                {
                    "size": "all" if size is None else size,
                    "recall": float(called[u].mean()) if u.any() else float("nan"),
                    "false_unknown": float(called[~u].mean()),
                    "fdr": float((called & ~u).sum() / max(called.sum(), 1)),
                }
            )
    return rows


def size_mean(rows: list[dict], key: str, sizes: list) -> float:
    """Mean of ``key`` over subsample sizes, each size weighted equally (as ``novelty_decision.py``)."""
    return float(np.mean([np.mean([r[key] for r in rows if r["size"] == s]) for s in sizes]))


def load(cache: Path, closed: bool, data_root: Path, names: tuple[str, ...]) -> list[dict]:
    """Every cached scenario (closed: every query variant) scored with ``names``, its calibration cells rebuilt."""
    seeds = sorted({int(f.stem.rsplit("__s", 1)[1]) for f in cache.glob("*.npz")})
    out = []
    for seed in seeds:
        jobs = closed_tasks(data_root, seed) if closed else ((*s, {}) for s in scenarios(data_root))
        for dataset, name, ref, _query, key, kw, variants in jobs:
            f = cache / (re.sub(r"[^A-Za-z0-9_.+-]", "-", name) + f"__s{seed}.npz")
            if not f.exists():
                continue
            z, model = np.load(f), SpikGPTModel.load(f.with_suffix(""))
            for v, rows in (variants or {"": slice(None)}).items():
                out.append(
                    {"name": f.stem + v, "dataset": dataset, **prepare(model, ref, key, kw, seed, z, names, rows)}
                )
            print(f.stem, flush=True)
    return out


def keeps_a_new_type_that_fills_its_type(gate: float, quantile: float = GATE_QUANTILE, draws: int = 20) -> bool:
    """The tests' check of the shift correction (``tests/openset/test_decision.py``), over ``draws`` seeds.

    A query without shift: 600 known cells (``−log p`` exponential(1), two predicted types) and 40
    far cells that are the whole of a third predicted type. The correction must leave those 40
    Unknown at the default FDR; a gate low enough to fire on the small rise of the median that
    40 new cells cause removes them type by type.
    """
    for seed in range(draws):
        rng = np.random.default_rng(seed)
        L = np.concatenate([rng.exponential(size=600), rng.exponential(size=40) + 20])
        groups = np.repeat([0, 1, 2], [300, 300, 40])
        corrected, _ = shift_correction(L, "gated_by_type", None, groups, gate=gate, gate_quantile=quantile)
        if not (bh_qvalues(np.exp(-corrected))[-40:] <= DEFAULT_FDR).all():
            return False
    return True


def summarise(
    open_set: list[dict],
    closed: list[dict],
    ms: tuple[int, ...],
    gate: float = GATE,
    shift: str = DEFAULT_SHIFT,
    quantile: float = GATE_QUANTILE,
) -> dict[str, dict]:
    """Per dataset: recall by subsample size, false Unknown, FDR and the closed-set worst false Unknown."""
    res = {}
    rule = {"gate": gate, "shift": shift, "quantile": quantile}
    for d in sorted({sc["dataset"] for sc in open_set}):
        rows = [r for sc in open_set if sc["dataset"] == d for r in evaluate(sc, ms, DEFAULT_FDR, **rule)]
        by = {s: np.mean([r["recall"] for r in rows if r["size"] == s]) for s in (3, 10, 30, "all")}
        by = {s: v for s, v in by.items() if np.isfinite(v)}
        sizes = [s for s in (3, 10, 30, "all") if s in by]
        cw = [
            evaluate(sc, ms, DEFAULT_FDR, sizes=(None,), **rule)[0]["false_unknown"]
            for sc in closed
            if sc["dataset"] == d
        ]
        res[d] = {
            "recall": float(np.mean(list(by.values()))),
            **{f"recall_{s}": float(v) for s, v in by.items()},
            "false_unknown": size_mean(rows, "false_unknown", sizes),
            "worst_false_unknown": float(max(x["false_unknown"] for x in rows)),
            "fdr": size_mean(rows, "fdr", sizes),
            "closed_worst_false_unknown": float(max(cw)) if cw else float("nan"),
        }
    return res


TABLE_HEAD = [
    "| rule | dataset | recall | 3 cells | 10 cells | 30 cells | all | false Unknown | worst | FDR | closed worst |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]


def table_rows(name: str, res: dict[str, dict]) -> list[str]:
    """Markdown rows of :func:`summarise`'s result, one per dataset and their mean."""
    lines = []
    for d, r in res.items():
        by = [f"{r[f'recall_{s}']:.2f}" if f"recall_{s}" in r else "–" for s in (3, 10, 30, "all")]
        lines.append(
            f"| {name} | {d} | {r['recall']:.3f} | "
            + " | ".join(by)
            + f" | {r['false_unknown']:.4f} | {r['worst_false_unknown']:.3f} | {r['fdr']:.3f} | "
            f"{r['closed_worst_false_unknown']:.3f} |"
        )
    m = {k: np.mean([v[k] for v in res.values()]) for k in ("recall", "false_unknown", "fdr")}
    worst = np.nanmax([v["closed_worst_false_unknown"] for v in res.values()])
    lines.append(
        f"| **{name}** | **mean** | **{m['recall']:.3f}** | | | | | {m['false_unknown']:.4f} | "
        f"{max(v['worst_false_unknown'] for v in res.values()):.3f} | {m['fdr']:.3f} | {worst:.3f} |"
    )
    return lines


def pooled(runs: list[dict[str, dict[str, dict]]]) -> dict[str, dict[str, dict]]:
    """Per rule and dataset, the mean of recall, false Unknown and FDR over runs, and the worst closed-set value.

    Runs are replicates of the same rules on caches built on other machines (model training is
    not bit-reproducible across processors, ``benchmarks/results/device_training.json``); only
    rules and datasets present in every run are kept.
    """
    rules = [k for k in runs[0] if all(k in r for r in runs)]
    out = {}
    for k in rules:
        out[k] = {}
        for d in [d for d in runs[0][k] if all(d in r[k] for r in runs)]:
            rows = [r[k][d] for r in runs]
            out[k][d] = {m: float(np.mean([x[m] for x in rows])) for m in ("recall", "false_unknown", "fdr")}
            out[k][d]["closed_worst_false_unknown"] = float(np.nanmax([x["closed_worst_false_unknown"] for x in rows]))
    return out


def lodo_lines(res: dict[str, dict[str, dict]], datasets: list[str]) -> list[str]:
    """Leave-one-dataset-out over the rules of ``res`` (novelty_decision.py's objective), as markdown."""

    def score(k: str, among: list[str]) -> float:
        cw = [res[k][x]["closed_worst_false_unknown"] for x in among]
        return objective([res[k][x] for x in among], DEFAULT_FDR, [w for w in cw if np.isfinite(w)])

    lines = [
        "",
        "Leave-one-dataset-out over these rules (novelty_decision.py's objective, closed-set worst included):",
        "",
        "| left out | chosen on the others | recall | false Unknown | FDR | closed worst |",
        "|---|---|---|---|---|---|",
    ]
    held = []
    for d in datasets:
        best = max(res, key=lambda k: score(k, [x for x in datasets if x != d]))
        r = res[best][d]
        held.append(r)
        lines.append(
            f"| {d} | {best} | {r['recall']:.3f} | {r['false_unknown']:.4f} | {r['fdr']:.3f} | "
            f"{r['closed_worst_false_unknown']:.3f} |"
        )
    m = {k: np.nanmean([r[k] for r in held]) for k in ("recall", "false_unknown", "fdr", "closed_worst_false_unknown")}
    lines.append(
        f"| **mean** | | **{m['recall']:.3f}** | {m['false_unknown']:.4f} | {m['fdr']:.3f} | "
        f"{m['closed_worst_false_unknown']:.3f} |"
    )
    return [*lines, "", f"Chosen on all datasets: `{max(res, key=lambda k: score(k, datasets))}`."]


def write_results(out: Path, res: dict, lines: list[str]) -> None:
    """``out/results.json`` (``res``) and ``out/results.md`` (``lines``); the table printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, required=True, help="open-set cache (novelty_cache.py)")
    p.add_argument("--closed-cache", type=Path, default=None, help="closed-set cache (novelty_cache.py --closed)")
    p.add_argument("--neighbours", nargs="+", default=["10"], help="neighbourhood sizes, comma-separated per rule")
    p.add_argument("--gates", type=float, nargs="+", default=[GATE], help="shift-correction gates (decision.GATE)")
    p.add_argument("--gate-quantiles", type=float, nargs="+", default=[GATE_QUANTILE], help="decision.GATE_QUANTILE")
    p.add_argument("--shifts", nargs="+", default=[DEFAULT_SHIFT], help="SHIFT_MODES[@matched]")
    p.add_argument(
        "--scores",
        nargs="+",
        default=list(DEFAULT_COMBINATION),
        help="the combined scores (novelty.DEFAULT_COMBINATION)",
    )
    p.add_argument(
        "--scale-powers",
        type=float,
        nargs="+",
        default=[novelty_module.CLASS_SCALE_POWER],
        help="novelty.CLASS_SCALE_POWER of scaled_mahalanobis_embedding",
    )
    p.add_argument(
        "--pool", type=Path, nargs="*", default=[], help="results.json of earlier runs of the same rules to pool with"
    )
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/neighbourhood_null"))
    args = p.parse_args()
    names = tuple(args.scores)
    tests = {"default": ()} | {f"m={s}": tuple(int(x) for x in s.split(",")) for s in args.neighbours}
    gate_suffix = (lambda g: f" · gate {g}") if len(args.gates) > 1 else (lambda g: "")
    quantile_suffix = (lambda q: f" · q{q:g}") if len(args.gate_quantiles) > 1 else (lambda q: "")
    power_suffix = (lambda w: f" · power {w:g}") if len(args.scale_powers) > 1 else (lambda w: "")
    shift_suffix = (lambda s: f" · {s}") if len(args.shifts) > 1 else (lambda s: "")
    rules = {
        name + power_suffix(w) + gate_suffix(g) + quantile_suffix(q) + shift_suffix(s): (ms, g, s, q, w)
        for w in args.scale_powers
        for s in args.shifts
        for q in args.gate_quantiles
        for g in args.gates
        for name, ms in tests.items()
    }
    admissible = {(g, q): keeps_a_new_type_that_fills_its_type(g, q) for g in args.gates for q in args.gate_quantiles}
    open_set = load(args.cache, False, args.data_dir, names)
    closed = load(args.closed_cache, True, args.data_dir, names) if args.closed_cache else []
    datasets = sorted({sc["dataset"] for sc in open_set})
    res, lines = {}, []
    lines += [
        f"# Neighbourhood test with a calibration-neighbourhood null (FDR {DEFAULT_FDR})",
        "",
        "recall: share of unseen cells called Unknown, mean over subsample sizes 3, 10, 30, all (5 draws each); "
        "closed worst: worst false Unknown over the closed-set cache's tasks, seeds and query variants.",
        "",
        *TABLE_HEAD,
    ]
    rescored = {}
    for name, (ms, g, s, q, w) in rules.items():
        if w not in rescored:
            rescored[w] = ([with_scale_power(sc, w) for sc in open_set], [with_scale_power(sc, w) for sc in closed])
        res[name] = summarise(*rescored[w], ms, g, s, q)
        lines += table_rows(name, res[name])
    refused = [g for g, ok in admissible.items() if not ok]
    if refused:
        lines += [
            "",
            "Not admissible (a new type that fills its predicted type in a query without shift is corrected "
            f"away, `keeps_a_new_type_that_fills_its_type`): (gate, quantile) {refused}.",
        ]
    chosen = {k: v for k, v in res.items() if admissible[(rules[k][1], rules[k][3])]}
    lines += lodo_lines(chosen, datasets)
    if args.pool:
        both = pooled([chosen, *(json.loads(f.read_text()) for f in args.pool)])
        lines += [
            "",
            f"Pooled with {', '.join(map(str, args.pool))} (per dataset: mean recall, false Unknown and FDR "
            "over the runs, the worst closed-set false Unknown):",
            *lodo_lines(both, datasets),
        ]
    write_results(args.out, res, lines)


if __name__ == "__main__":
    main()
