"""Reference type profiles: each cell's Spearman correlation to the mean rank profile of every reference type.

SingleR's signal (correlation of a cell's ranks with reference profiles on marker genes) survives
the batch shifts that break CellTypist, and the default embedder already ranks each cell's marker
and variable genes. Two uses are measured here, neither adopted (README, *Design decisions*):

``classifier``: the spiking classifier fed ``emb`` (the standardised, mapped embedding: what it
reads today), ``corr`` (the correlations alone, centred per cell, unit s.d.), ``emb+corr`` (both
side by side) or ``emb+corrW`` (the correlations up-weighted to the embedding's total variance) —
one network per seed, early-stopped as the calibration network is (``TrainConfig(members=1)``),
on every bench task; macro-F1 on the query's known types, then leave-one-dataset-out over the
four inputs.

``novelty``: ``profile_correlation`` = 1 − a cell's largest correlation to the types of the fold
model that scores it, added as a third score to the default Unknown rule on
``cross_conformal.py``'s caches (each fold's default embedder refitted exactly as it was, on the
same cells and seed; the new scores go to ``--out-cache``), then the rule scored with and without
it, and the ranking ceiling of its final p-values (``novelty_decision.ranking_ceiling``).

Usage::

    python benchmarks/type_profiles.py classifier --seeds 0 1 2 --out benchmarks/results/type_profiles
    python benchmarks/type_profiles.py novelty --cache /tmp/ccfull/all --out-cache /tmp/ccfull_pc \
        --reference-cells 100000 --closed-seeds 0 --out benchmarks/results/type_profiles
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from spikgpt.bench.metrics import closed_set
from spikgpt.bench.tasks import DEFAULT_DATA_ROOT, TASKS
from spikgpt.data import Cells
from spikgpt.embed.default import DefaultEmbedder
from spikgpt.mapping import estimate_mapping
from spikgpt.model.network import NetworkConfig
from spikgpt.model.training import TrainConfig, fit_network

INPUTS = ("emb", "corr", "emb+corr", "emb+corrW")
SCORE = "profile_correlation"


def rank_values(emb: DefaultEmbedder, cells: Cells) -> np.ndarray:
    """``[cells, genes]`` each cell's per-cell-standardised ranks over ``emb``'s genes (float64)."""
    return emb._values(cells.aligned(emb.genes)[0]).astype(np.float64)


def type_profiles(R: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``[types, genes]`` mean of rank values ``R`` per type present in ``y``, centred and unit-norm."""
    P = np.stack([R[y == c].mean(axis=0) for c in np.unique(y)])
    P -= P.mean(axis=1, keepdims=True)
    return P / np.linalg.norm(P, axis=1, keepdims=True)


def correlations(R: np.ndarray, profiles: np.ndarray) -> np.ndarray:
    """``[cells, types]`` Spearman correlation of each cell's rank values ``R`` with each type profile."""
    R = R - R.mean(axis=1, keepdims=True)
    R /= np.maximum(np.linalg.norm(R, axis=1, keepdims=True), 1e-12)
    return R @ profiles.T


def classifier_run(name: str, seed: int, inputs=INPUTS, data_root: Path = DEFAULT_DATA_ROOT) -> dict:
    """Macro-F1 of one network per input on task ``name``, seed ``seed``."""
    t = TASKS[name]
    ref, q = t.load(data_root, seed)
    yr, yq = (a.obs[t.label_key].astype(str).to_numpy() for a in (ref, q))
    types = np.unique(yr)
    cr, cq = Cells(ref, use_raw=t.use_raw), Cells(q, use_raw=t.use_raw)
    emb = DefaultEmbedder().fit(cr, seed=seed, labels=yr)
    Er, Eq = emb.transform(cr), emb.transform(cq)
    # the package's standardisation (one global scale) and query mapping
    mean = Er.mean(axis=0)
    std = np.sqrt(((Er - mean) ** 2).sum(axis=1).mean() / Er.shape[1])
    Zr, Zq = (Er - mean) / std, (Eq - mean) / std
    Zq = Zq - estimate_mapping(Zq.astype(np.float32), Zr.astype(np.float32)).shift
    Rr = rank_values(emb, cr)
    P = type_profiles(Rr, yr)
    Cr, Cq = correlations(Rr, P), correlations(rank_values(emb, cq), P)
    Cr, Cq = Cr - Cr.mean(axis=1, keepdims=True), Cq - Cq.mean(axis=1, keepdims=True)
    s, w = Cr.std(), np.sqrt(Zr.shape[1] / Cr.shape[1])
    feats = {
        "emb": (Zr, Zq),
        "corr": (Cr / s, Cq / s),
        "emb+corr": (np.hstack([Zr, Cr / s]), np.hstack([Zq, Cq / s])),
        "emb+corrW": (np.hstack([Zr, w * Cr / s]), np.hstack([Zq, w * Cq / s])),
    }
    out = {"task": name, "seed": seed}
    for v in inputs:
        A, B = (x.astype(np.float32) for x in feats[v])
        net_cfg = NetworkConfig(in_dim=A.shape[1], n_classes=len(types))
        net, _ = fit_network(
            A, np.searchsorted(types, yr), net_cfg, TrainConfig(members=1, workers=1), seed=seed, progress=False
        )
        with torch.inference_mode():
            logits = net(torch.from_numpy(B)).mean(0).numpy()
        out[v] = closed_set(yq, types[logits.argmax(axis=1)], list(types))["macro_f1"]
    return out


def lodo(rows: list[dict], inputs=INPUTS) -> list[str]:
    """Leave-one-dataset-out over the inputs: per dataset (tasks and seeds averaged), the input chosen on the others."""
    by = {}
    for r in rows:
        by.setdefault(r["task"].split("_")[0], {}).setdefault(r["task"], []).append(r)
    mean = {
        d: {v: np.mean([np.mean([r[v] for r in rs]) for rs in tasks.values()]) for v in inputs}
        for d, tasks in by.items()
    }
    lines = ["| left out | chosen on the others | held out | `emb` (today) |", "|---|---|---|---|"]
    held = []
    for d in sorted(mean):
        pick = max(inputs, key=lambda v: np.mean([mean[o][v] for o in mean if o != d]))
        held.append((mean[d][pick], mean[d]["emb"]))
        lines.append(f"| {d} | `{pick}` | {mean[d][pick]:.3f} | {mean[d]['emb']:.3f} |")
    lines.append(f"| **mean** | | **{np.mean([h[0] for h in held]):.3f}** | {np.mean([h[1] for h in held]):.3f} |")
    return lines


def classifier(args) -> None:
    """The ``classifier`` measurement (resumable: rows kept in ``classifier.jsonl``)."""
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "classifier.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    done = {(r["task"], r["seed"]) for r in rows}
    for name in args.tasks or list(TASKS):
        for seed in args.seeds:
            if (name, seed) in done:
                continue
            t0 = time.perf_counter()
            r = classifier_run(name, seed, data_root=args.data_dir)
            rows.append(r)
            with log.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(
                f"{name} seed {seed} ({time.perf_counter() - t0:.0f} s): "
                + ", ".join(f"{v} {r[v]:.3f}" for v in INPUTS)
            )
    lines = ["| task | " + " | ".join(f"`{v}`" for v in INPUTS) + " |", "|---|" + "---|" * len(INPUTS)]
    for name in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == name]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{np.mean([r[v] for r in rs]):.3f} ± {np.std([r[v] for r in rs]):.3f}" for v in INPUTS)
            + " |"
        )
    lines += ["", *lodo(rows)]
    (args.out / "classifier.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def novelty(args) -> None:
    """The ``novelty`` measurement: add the score to each cached scenario, then score the rule with and without it."""
    import cross_conformal as cc
    import neighbourhood_null as nn
    from novelty_cache import closed_tasks, scenarios
    from novelty_decision import ranking_ceiling

    from spikgpt.api import labels_of
    from spikgpt.bench.tasks import subsample_reference
    from spikgpt.embed.base import make_embedder
    from spikgpt.model.training import MIN_SPLIT_CELLS, cpu_settings, stratified_folds
    from spikgpt.openset.decision import DEFAULT_FDR, NEIGHBOURS, bh_qvalues

    nn.QVALUES[0] = bh_qvalues  # measured (session 28) under 0.25's plain Benjamini–Hochberg
    args.out_cache.mkdir(parents=True, exist_ok=True)
    jobs = [(0, *sc, {}) for sc in scenarios(args.data_dir)]
    jobs += [(s, *t) for s in args.closed_seeds for t in closed_tasks(args.data_dir, s)]
    base_names = ("mahalanobis_embedding", "pca_residual")  # the default scores until 0.25
    rule = "cross-conformal one fold · fold neighbourhoods · Simes · guard"
    runs = {"default": base_names, f"default + {SCORE}": (*base_names, SCORE)}
    open_set, closed = {r: [] for r in runs}, {r: [] for r in runs}
    ceiling = {r: {} for r in runs}
    for seed, dataset, name, ref, query, key, kw, variants in jobs:
        src = args.cache / (name.replace("/", "-") + f"__s{seed}.npz")
        dst = args.out_cache / src.name
        if not src.exists():
            continue
        sub = subsample_reference(ref, key, args.reference_cells, seed)
        if not dst.exists():
            y, _ = labels_of(sub, key)
            cells, q = Cells(sub, **kw), Cells(query, **kw)
            fold = stratified_folds(y, cc.FOLDS, min_cells=MIN_SPLIT_CELLS, seed=seed)
            cal, per = [], []
            with cpu_settings(1):
                for j in range(cc.FOLDS):
                    kept = cells.subset(np.flatnonzero(fold != j))
                    emb = make_embedder("default").fit(kept, seed=seed, labels=y[fold != j])
                    P = type_profiles(rank_values(emb, kept), y[fold != j])
                    held = rank_values(emb, cells.subset(np.flatnonzero(fold == j)))
                    cal.append(1 - correlations(held, P).max(axis=1))
                    per.append(1 - correlations(rank_values(emb, q), P).max(axis=1))
            z = dict(np.load(src))
            z[f"calibration/{SCORE}"], z[f"folds/{SCORE}"] = np.concatenate(cal), np.stack(per)
            z[f"final/{SCORE}"] = z[f"folds/{SCORE}"].mean(axis=0)
            np.savez(dst, **z)
        unc, n0 = cc.uncalibrated_classes(sub, key, seed)
        for r, names in runs.items():
            cc.NAMES = names
            fitted = cc.load_fitted(dst)
            for v, rows in (variants or {"": slice(None)}).items():
                sc = {"name": f"{name}__s{seed}{v}", "dataset": dataset, **cc.scenario(fitted, rule, rows, unc, n0)}
                (closed if variants else open_set)[r].append(sc)
                if not variants:  # the oracle threshold on the rule's final p-values, as nn.evaluate subsamples
                    u = sc["unseen"]
                    ui, ki = np.flatnonzero(u), np.flatnonzero(~u)
                    for size in nn.SIZES:
                        if size is not None and size >= len(ui):
                            continue
                        for d in range(1 if size is None else 5):
                            pick = ui if size is None else np.random.default_rng(d).choice(ui, size, replace=False)
                            idx = np.sort(np.concatenate([ki, pick]))
                            p = nn.pvalues(sc, idx, (NEIGHBOURS,))
                            ceiling[r].setdefault(dataset, {}).setdefault(size, []).append(
                                ranking_ceiling(p, u[idx], DEFAULT_FDR)
                            )
        print(name, seed, flush=True)
    lines = [
        f"# Default Unknown rule ± `{SCORE}`, {args.reference_cells}-cell references (FDR 0.1)",
        "",
        *nn.TABLE_HEAD,
    ]
    res = {}
    for r in runs:
        res[r] = nn.summarise(open_set[r], closed[r], (NEIGHBOURS,))
        lines += nn.table_rows(r, res[r])
    datasets = sorted(res["default"])
    lines += nn.lodo_lines(res, datasets)
    lines += ["", "Ranking ceiling of the final p-values (sizes weighted equally), recall in brackets:", ""]
    for r in runs:
        per = {d: float(np.mean([np.mean(v) for v in ceiling[r][d].values()])) for d in datasets}
        lines.append(
            f"- {r}: "
            + ", ".join(f"{d} {per[d]:.3f} ({res[r][d]['recall']:.3f})" for d in datasets)
            + f"; mean {np.mean(list(per.values())):.3f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"novelty_{args.reference_cells}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def pool(args) -> None:
    """Leave-one-dataset-out over the rule with and without the score, pooled over result folders.

    ``--runs``: folders holding ``cross_conformal.py``-style ``results.json`` of the default rule,
    in pairs ``DIR_base`` / ``DIR_pc`` (without / with the score), given by their common stem.
    """
    import neighbourhood_null as nn

    rule = "cross-conformal one fold · fold neighbourhoods · Simes · guard"
    res = {}
    for label, suffix in (("0.25 default (maha + residual)", "base"), (f"+ {SCORE}", "pc")):
        runs = [json.loads((args.dir / f"{stem}_{suffix}" / "results.json").read_text())[rule] for stem in args.runs]
        res[label] = nn.pooled([{"x": r} for r in runs])["x"]
    datasets = sorted(next(iter(res.values())))
    lines = [f"# Pooled over {', '.join(args.runs)}", "", "| rule | " + " | ".join(datasets) + " | mean |"]
    lines.append("|---|" + "---|" * (len(datasets) + 1))
    for k, v in res.items():
        cells = [
            f"{v[d]['recall']:.3f} (FDR {v[d]['fdr']:.3f}, closed {v[d]['closed_worst_false_unknown']:.3f})"
            for d in datasets
        ]
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {np.mean([v[d]['recall'] for d in datasets]):.3f} |")
    lines += nn.lodo_lines(res, datasets)
    (args.dir / f"pooled_{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("classifier")
    c.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    c.add_argument("--tasks", nargs="*", default=None)
    n = sub.add_parser("novelty")
    n.add_argument("--cache", type=Path, required=True, help="cross_conformal.py's cache of these references")
    n.add_argument("--out-cache", type=Path, required=True, help="where the caches with the new score go")
    n.add_argument("--reference-cells", type=int, default=100_000)
    n.add_argument("--closed-seeds", type=int, nargs="*", default=[0])
    for q in (c, n):
        q.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_ROOT)
        q.add_argument("--out", type=Path, default=Path("benchmarks/results/type_profiles"))
    o = sub.add_parser("pool")
    o.add_argument("--dir", type=Path, default=Path("benchmarks/results/type_profiles/decision"))
    o.add_argument("--runs", nargs="+", required=True)
    o.add_argument("--name", required=True)
    args = p.parse_args()
    {"classifier": classifier, "novelty": novelty, "pool": pool}[args.what](args)


if __name__ == "__main__":
    main()
