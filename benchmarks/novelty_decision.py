"""Choose the Unknown rule leave-one-dataset-out, from the cache of ``novelty_cache.py``.

Every candidate rule (which novelty scores are combined; which shift correction, estimated on all
query cells; with or without mapping the query onto the reference first) is run on every cached
scenario, with the unseen type's query cells subsampled to 3, 10 and 30 cells (``--draws``
seeded draws each) as well as all of them. Per scenario it records the p-value AUROC, the share
of unseen cells called Unknown, false Unknown on known cells and the FDR of the Unknown calls.

Only rules that pass the tests' two synthetic checks are chosen (:func:`synthetic_checks`: a new
programme called Unknown, a wholly shifted query not). Leave-one-dataset-out: for each
dataset, the rule with the best objective on the *other*
datasets is chosen, and its numbers on the left-out dataset are the headline. Objective: the
share of unseen cells called Unknown (mean over datasets), minus 2 × the largest excess of a
dataset's FDR over the target and 2 × the largest excess of a dataset's false Unknown over 5 %
(the targets hold "on every task": a rule that fails one dataset is not rescued by the others;
until 0.5 the excesses were pooled over scenarios, which let a batch-shifted dataset's 20–60 %
false Unknown hide behind the rest). With ``--closed-cache`` (``novelty_cache.py --closed`` over
several seeds) the false-Unknown excess is also taken on the closed-set bench tasks: the worst
over tasks, seeds and composition-shifted query variants of a dataset (a user runs one seed, so
one seed's failure is theirs; until 0.10 only seed 0 was seen, and a rule that called 38 % of
one protocol-shifted query Unknown on seed 3 passed).

Usage: ``python benchmarks/novelty_decision.py --cache benchmarks/results/novelty_cache
--out benchmarks/results/novelty_decision``
"""

from __future__ import annotations

import argparse
import json
from itertools import product
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

from spikgpt.mapping import estimate_mapping
from spikgpt.model import SpikGPTModel
from spikgpt.openset.decision import DEFAULT_FDR, SHIFT_MODES, calibration_statistic, decide
from spikgpt.openset.novelty import SCORES

#: Candidate score sets. Each holds a distance in the embedding and the off-subspace residual:
#: a confidence-only rule (max_prob alone, tried and measured in the README) calls cells with
#: scrambled profiles confidently known, and a rule of embedding distances alone is blind to a new
#: type whose programme lies in genes the reference barely varies (the tests' synthetic new type:
#: 0 % Unknown with the Mahalanobis distance alone, 83 % with the residual in the combination) —
#: which the shared data rarely tests but a user's data will.
COMPONENTS = {
    "knn+prob+resid": ("knn_embedding", "max_prob", "pca_residual"),
    "knn+resid": ("knn_embedding", "pca_residual"),
    "knn+gauss+prob+resid": ("knn_embedding", "gaussian_embedding", "max_prob", "pca_residual"),
    "maha+knn+prob+resid": ("mahalanobis_embedding", "knn_embedding", "max_prob", "pca_residual"),
    "maha+resid": ("mahalanobis_embedding", "pca_residual"),
    "maha+prob+resid": ("mahalanobis_embedding", "max_prob", "pca_residual"),
}
SIZES = (3, 10, 30, None)


def load(cache: Path) -> list[dict]:
    """Every cached scenario with its query's novelty scores, without and with mapping.

    A closed-set cache (``novelty_cache.py --closed``) gives one scenario per query variant.
    """
    out = []
    for f in sorted(cache.glob("*.npz")):
        z = np.load(f, allow_pickle=False)
        model = SpikGPTModel.load(f.with_suffix(""))
        variants = [k for k in z.files if k.startswith("variant")] or [None]
        for v in variants:
            rows = slice(None) if v is None else z[v]
            sc = {"name": f.stem + ("" if v is None else v[len("variant") :]), "dataset": z["dataset"]}
            sc.update({k: z[k][rows] for k in ("q_embedding", "q_residual", "q_truth")}, classes=z["classes"])
            out.append(_scores(sc, model))
    return out


def _scores(sc: dict, model: SpikGPTModel) -> dict:
    """``sc`` with its query's novelty scores and predictions, without and with mapping."""
    E = sc["q_embedding"]
    ok = np.isfinite(E).all(axis=1)
    truth = sc["q_truth"][ok]
    known = np.isin(truth, model.classes)
    sc["mapped"] = {}
    for mapping in (False, True):
        EE = E[ok]
        if mapping:
            m = estimate_mapping(model.standardise(EE), model.novelty.state["ref_embedding"])
            EE = EE - m.shift * model.input_std
        o = model.outputs(EE)
        o.residual = sc["q_residual"][ok]
        pred_index = o.probs.argmax(axis=1)
        pred = np.asarray(model.classes)[pred_index]
        sc["mapped"][mapping] = {
            **{f"q_{n}": v for n, v in model.raw_scores(o).items()},
            "pred": pred_index,
            "macro_f1": float(f1_score(truth[known], pred[known], labels=sorted(set(truth[known])), average="macro")),
        }
    sc["q_truth"], sc["q_embedded"] = truth, np.ones(len(truth), bool)
    sc.update({f"cal_{n}": model.novelty.state[f"cal_{n}"] for n in SCORES})
    return sc


def evaluate(
    sc: dict,
    names: tuple[str, ...],
    shift: str,
    mapping: bool,
    fdr: float,
    draws: int,
    false_unknown: float | None = None,
    sizes: tuple[int | None, ...] = SIZES,
) -> list[dict]:
    """Metrics of one rule on one scenario, for each subsample size (per-cell rule at ``false_unknown`` if set)."""
    truth = sc["q_truth"]
    unseen = ~np.isin(truth, sc["classes"])
    scores = {n: sc["mapped"][mapping][f"q_{n}"] for n in names}
    cal = {n: sc[f"cal_{n}"] for n in names}
    cal_stat = calibration_statistic(cal, names)
    rows = []
    unseen_idx, known_idx = np.flatnonzero(unseen), np.flatnonzero(~unseen)
    for size in sizes:
        if size is not None and size >= len(unseen_idx):
            continue
        reps = 1 if size is None else draws
        for r in range(reps):
            rng = np.random.default_rng(r)
            pick = unseen_idx if size is None else rng.choice(unseen_idx, size, replace=False)
            idx = np.sort(np.concatenate([known_idx, pick]))
            d = decide(
                {n: v[idx] for n, v in scores.items()},
                cal,
                names,
                fdr=fdr,
                calibration_statistics=cal_stat,
                shift=shift,
                false_unknown=false_unknown,
                groups=sc["mapped"][mapping]["pred"][idx],
            )
            u = unseen[idx]
            called = d.unknown
            rows.append(
                {
                    "size": "all" if size is None else size,
                    "auroc": float(roc_auc_score(u, -np.log(np.maximum(d.pvalue, 1e-300))))
                    if 0 < u.sum() < len(u)
                    else float("nan"),
                    "recall": float(called[u].mean()) if u.any() else float("nan"),
                    "false_unknown": float(called[~u].mean()),
                    "fdr": float((called & ~u).sum() / max(called.sum(), 1)),
                    "ceiling": ranking_ceiling(d.pvalue, u, fdr),
                    "shift_location": d.shift["location"],
                    "macro_f1": sc["mapped"][mapping]["macro_f1"],
                }
            )
    return rows


def ranking_ceiling(pvalue: np.ndarray, unseen: np.ndarray, fdr: float) -> float:
    """Most unseen cells any threshold on ``pvalue`` calls Unknown at a false discovery proportion ≤ ``fdr``.

    An oracle that knows which cells are unseen: what a perfect threshold could get from this
    ranking. A rule's recall below it is lost to the threshold (multiplicity, calibration size,
    shift correction); the rest of the way to 1 is lost to the scores themselves.
    """
    if not unseen.any():
        return float("nan")
    order = np.argsort(pvalue, kind="stable")
    hit, sorted_p = unseen[order], pvalue[order]
    calls = np.arange(1, len(hit) + 1)
    # A threshold cannot split cells of equal p-value: cut only after the last of a tie.
    cut = np.append(sorted_p[1:] > sorted_p[:-1], True)
    ok = (np.cumsum(~hit) <= fdr * calls) & cut
    return float(np.cumsum(hit)[ok].max() / hit.sum()) if ok.any() else 0.0


def rows_by_dataset(scenarios: list[dict], names: tuple[str, ...], shift: str, mapping: bool, **kw) -> dict:
    """:func:`evaluate` on every scenario (``kw``: its remaining arguments), rows grouped by dataset."""
    out = {}
    for sc in scenarios:
        rows = evaluate(sc, names, shift, mapping, **kw)
        for r in rows:
            r["scenario"] = sc["name"]
        out.setdefault(str(sc["dataset"]), []).extend(rows)
    return out


def summarise(rows: list[dict]) -> dict:
    """Means over rows, each subsample size weighted equally (it has ``--draws`` rows, ``all`` one)."""
    keys = ("auroc", "recall", "ceiling", "false_unknown", "fdr", "macro_f1")
    sizes = [z for z in ("all", 30, 10, 3) if any(r["size"] == z for r in rows)]
    out = {k: float(np.nanmean([np.nanmean([r[k] for r in rows if r["size"] == z]) for z in sizes])) for k in keys}
    for size in ("all", 30, 10, 3):
        sub = [r["recall"] for r in rows if r["size"] == size]
        out[f"recall_{size}"] = float(np.mean(sub)) if sub else float("nan")
    out["worst_false_unknown"] = float(max(r["false_unknown"] for r in rows))
    out["worst_fdr"] = float(max(r["fdr"] for r in rows))
    return out


def synthetic_checks(candidates: list[tuple[str, str]]) -> dict[tuple[str, str], dict]:
    """Each (score set, shift mode) on the tests' two synthetic queries, with the package's default model.

    ``new_type``: a query holding a type whose programme no reference type has (share called
    Unknown, must be ≥ 0.5); ``shifted``: a query whose genes all carry a batch factor, with a new
    type in it (share of known cells called Unknown, must be ≤ 0.05). A rule that fails either is
    not admissible, whatever it scores on the shared data: those are the two promises the shared
    data test least (a new programme outside the reference's subspace; a whole-query shift).
    """
    import sys

    import scipy.sparse as sp

    import spikgpt

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from synthetic import FAST, synthetic_counts

    def called(model, query, names, shift):
        model.novelty_components = COMPONENTS[names]
        out = spikgpt.annotate(query, model, shift=shift, copy=True, progress=False)
        return (out.obs["spikgpt_label"] == "Unknown").to_numpy()

    plain = spikgpt.train(synthetic_counts({"A": 60, "B": 60, "C": 40}, seed=1), "cell_type", train_config=FAST)
    new_query = synthetic_counts({"A": 50, "B": 50, "C": 30}, seed=7, extra_types={"new": 25})
    new = (new_query.obs["cell_type"] == "new").to_numpy()
    big = spikgpt.train(synthetic_counts({"A": 150, "B": 150, "C": 150}, seed=3), "cell_type", train_config=FAST)
    shifted = synthetic_counts({"A": 100, "B": 100, "C": 100}, seed=4, extra_types={"D": 60})
    factors = np.random.default_rng(9).lognormal(0.0, 0.8, shifted.n_vars)
    shifted.X = sp.csr_matrix(np.round(shifted.X.toarray() * factors), dtype=np.float32)
    known = (shifted.obs["cell_type"] != "D").to_numpy()
    out = {}
    for names, shift in candidates:
        recall = float(called(plain, new_query, names, shift)[new].mean())
        false_unknown = float(called(big, shifted, names, shift)[known].mean())
        out[(names, shift)] = {
            "new_type_unknown": recall,
            "shifted_false_unknown": false_unknown,
            "admissible": recall >= 0.5 and false_unknown <= 0.05,
        }
    return out


def rule_key(comp: str, shift: str, mapping: bool, prefix: str = "") -> str:
    """The name of a candidate rule in the tables (``prefix``: its representation's label)."""
    return f"{prefix}{comp}|shift={shift}|{'mnn' if mapping else 'nomap'}"


def objective(per_dataset: list[dict], fdr: float, closed_worst: tuple[float, ...] | list[float] = ()) -> float:
    """Mean recall over datasets minus twice the worst dataset's FDR and false-Unknown excesses.

    ``closed_worst``: each dataset's worst false Unknown on the closed-set tasks (over seeds and
    query variants), taken into the false-Unknown excess.
    """
    recall = np.mean([s["recall"] for s in per_dataset])
    fdr_excess = max(max(0.0, s["fdr"] - fdr) for s in per_dataset)
    fu_excess = max([max(0.0, s["false_unknown"] - 0.05) for s in per_dataset] + [w - 0.05 for w in closed_worst])
    return float(recall - 2 * fdr_excess - 2 * fu_excess)


def closed_worst_false_unknown(scenarios: list[dict], names: tuple[str, ...], shift: str, mapping: bool, fdr: float):
    """Per dataset, the largest share of known cells called Unknown over its closed-set scenarios."""
    rows = rows_by_dataset(scenarios, names, shift, mapping, fdr=fdr, draws=1, sizes=(None,))
    return {d: max(r["false_unknown"] for r in v) for d, v in rows.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--cache",
        nargs="+",
        default=["benchmarks/results/novelty_cache"],
        help="cache folder(s); LABEL=DIR compares representations (e.g. log=DIR1 rank=DIR2), chosen by macro-F1",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/novelty_decision"))
    p.add_argument("--fdr", type=float, default=DEFAULT_FDR)
    p.add_argument("--draws", type=int, default=5)
    p.add_argument(
        "--false-unknown",
        type=float,
        nargs="*",
        default=[0.01, 0.05],
        help="levels of the per-cell rule (annotate(false_unknown=...)) measured with the default rule's scores",
    )
    p.add_argument(
        "--closed-cache",
        type=Path,
        default=None,
        help="closed-set cache (novelty_cache.py --closed, several seeds): worst false Unknown in the objective",
    )
    args = p.parse_args()
    caches = dict(c.split("=", 1) if "=" in c else ("", c) for c in args.cache)
    # Shift estimated on all query cells only: an estimate from the cells the mapping matched
    # (``@matched``, a candidate until 0.5) is biased low — the matched cells are those nearest
    # the reference — and let 13–17 % of a wholly shifted synthetic query be called Unknown
    # (tests/test_api.py, the batch-shift test), against 2 % estimated on all cells.
    candidates = list(product(COMPONENTS, SHIFT_MODES, (True, False)))
    per = {}  # (candidate) -> dataset -> rows
    rule = {}  # (candidate) -> (score set, shift mode)
    f1 = {}  # (representation, mapping) -> dataset -> macro-F1
    scen_by_label = {}
    for label, folder in caches.items():
        scen = scen_by_label[label] = load(Path(folder))
        datasets = sorted({str(sc["dataset"]) for sc in scen})
        prefix = f"{label}|" if label else ""
        for m in (False, True):
            f1[(label, m)] = {
                d: float(np.mean([sc["mapped"][m]["macro_f1"] for sc in scen if sc["dataset"] == d])) for d in datasets
            }
        for comp, shift, mapping in candidates:
            key = rule_key(comp, shift, mapping, prefix)
            rule[key] = (comp, shift)
            per[key] = rows_by_dataset(scen, COMPONENTS[comp], shift, mapping, fdr=args.fdr, draws=args.draws)
    table = {k: {d: summarise(v[d]) for d in datasets} for k, v in per.items()}
    closed = {}  # candidate (default representation) -> dataset -> worst closed-set false Unknown
    if args.closed_cache is not None:
        closed_scen = load(args.closed_cache)
        for comp, shift, mapping in candidates:
            worst = closed_worst_false_unknown(closed_scen, COMPONENTS[comp], shift, mapping, args.fdr)
            closed[rule_key(comp, shift, mapping)] = worst
    checks = synthetic_checks(sorted(set(rule.values())))
    admissible = {k: checks[rule[k]]["admissible"] for k in per}

    def choose(train: list[str]) -> tuple[tuple[str, bool], str, float]:
        """Representation and mapping by macro-F1 of known types, then the rule by the objective, on ``train``."""
        rep, mapping = max(f1, key=lambda lm: np.mean([f1[lm][d] for d in train]))
        prefix, tag = (f"{rep}|" if rep else ""), ("mnn" if mapping else "nomap")
        score = {
            k: objective([table[k][d] for d in train], args.fdr, [closed.get(k, {}).get(d, 0.0) for d in train])
            for k in per
            if k.endswith(tag) and (not prefix or k.startswith(prefix)) and admissible[k]
        }
        best = max(score, key=score.get)
        return (rep, mapping), best, score[best]

    lodo = {}
    for held in datasets:
        mapping, best, obj = choose([d for d in datasets if d != held])
        lodo[held] = {
            "chosen": best,
            "objective_on_others": obj,
            **table[best][held],
            "closed_worst_false_unknown": closed.get(best, {}).get(held, float("nan")),
            **{
                f"macro_f1_{rep or 'default'}_{'mapping' if m else 'no_mapping'}": v[held] for (rep, m), v in f1.items()
            },
        }
    mapping, default, _ = choose(datasets)
    # The per-cell rule is the user's choice of error rate, not a candidate: it is measured with
    # the default's scores, shift correction and mapping, on every dataset (nothing to choose).
    d_comp, d_shift = rule[default]
    per_cell = {
        str(level): {
            d: summarise(v)
            for d, v in rows_by_dataset(
                scen_by_label[mapping[0]],
                COMPONENTS[d_comp],
                d_shift,
                mapping[1],
                fdr=args.fdr,
                draws=args.draws,
                false_unknown=level,
            ).items()
        }
        for level in args.false_unknown
    }
    args.out.mkdir(parents=True, exist_ok=True)
    keep = sorted({default, *(v["chosen"] for v in lodo.values())})  # sorted: the same file on every run
    res = {
        "fdr": args.fdr,
        "draws": args.draws,
        "sizes": [str(s) for s in SIZES],
        "lodo": lodo,
        "default": default,
        "table": table,
        "synthetic_checks": {f"{c}|shift={sh}": v for (c, sh), v in checks.items()},
        "macro_f1_by_representation_and_mapping": {f"{k[0] or 'default'}|mapping={k[1]}": v for k, v in f1.items()},
        "scenarios": {k: [r for d in datasets for r in per[k][d]] for k in keep},
        "per_cell_rule": per_cell,
        "closed_worst_false_unknown": closed,
    }
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    cols = (
        "macro_f1",
        "auroc",
        "recall",
        "recall_all",
        "recall_30",
        "recall_10",
        "recall_3",
        "ceiling",
        "false_unknown",
        "worst_false_unknown",
        "fdr",
        "worst_fdr",
        "closed_worst_false_unknown",
    )
    lines = [
        f"# Unknown rule, leave-one-dataset-out (target FDR {args.fdr}, {args.draws} draws per subsample)",
        "",
        "Chosen on the other datasets, scored on the one left out. recall = share of unseen-type cells "
        "called Unknown (mean over subsample sizes 3, 10, 30, all, each weighted equally); false_unknown = share of "
        "known-type cells called Unknown; fdr = share of Unknown calls that are known cells (0 when none); "
        "ceiling = the most unseen cells any threshold on the rule's p-values calls at FDR <= the target, "
        "knowing the truth (same weighting as recall).",
        "",
        "| left out | chosen | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for d, r in lodo.items():
        lines.append(f"| {d} | {r['chosen']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    mean = {c: np.mean([r[c] for r in lodo.values()]) for c in cols}
    lines.append("| **mean** | | " + " | ".join(f"{mean[c]:.3f}" for c in cols) + " |")
    lines += [
        "",
        f"Default (chosen on all datasets): `{default}`.",
        "",
        "Macro-F1 of known types (representation, without / with mapping): "
        + "; ".join(
            f"{rep or 'default'}: "
            + ", ".join(f"{d} {f1[(rep, False)][d]:.3f} / {f1[(rep, True)][d]:.3f}" for d in datasets)
            for rep in caches
        )
        + ".",
    ]
    if closed:
        d_comp = rule[default][0]
        shown = [k for k in closed if k.startswith(f"{d_comp}|") and k.endswith("|mnn")]
        lines += [
            "",
            "## Closed-set false Unknown, worst over tasks, seeds and query variants (`--closed-cache`)",
            "",
            "| rule | " + " | ".join(datasets) + " |",
            "|---" * (len(datasets) + 1) + "|",
        ]
        for k in shown:
            lines.append(f"| {k} | " + " | ".join(f"{closed[k].get(d, float('nan')):.3f}" for d in datasets) + " |")
    lines += [
        "",
        "## The default per scenario (all unseen cells)",
        "",
        "| scenario | macro-F1 | AUROC | unseen → Unknown | false Unknown | FDR |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["scenarios"][default]:
        if r["size"] == "all":
            lines.append(
                f"| {r['scenario']} | {r['macro_f1']:.3f} | {r['auroc']:.3f} | {r['recall']:.2f} | "
                f"{r['false_unknown']:.3f} | {r['fdr']:.2f} |"
            )
    lines += [
        "",
        "## The per-cell rule (`false_unknown`), the default's scores",
        "",
        "Every cell tested at the level on its own (no multiplicity correction); nothing chosen, so no left-out "
        "dataset: the level is the user's.",
        "",
        "| false_unknown | dataset | " + " | ".join(cols[1:-1]) + " |",
        "|---" * len(cols) + "|",
    ]
    for level, by_dataset in per_cell.items():
        for d, r in by_dataset.items():
            lines.append(f"| {level} | {d} | " + " | ".join(f"{r[c]:.3f}" for c in cols[1:-1]) + " |")
        m = {c: np.mean([r[c] for r in by_dataset.values()]) for c in cols[1:-1]}
        lines.append(f"| {level} | **mean** | " + " | ".join(f"{m[c]:.3f}" for c in cols[1:-1]) + " |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: len(lodo) + 12]))


if __name__ == "__main__":
    main()
