"""Unknown on 100-cell references: cross-fitted calibration with the query scored by every fold model.

A reference of about 100 cells holds out ~20 calibration cells, too few for the exponential tail
(``decision.MIN_TAIL_CELLS``), so held-out calibration calls nothing Unknown there. Cross-fitting
calibrates on all 100. Until 0.19 its final model, fitted on every cell, scored the query, and
gave new cells lower scores than each fold model gave its held-out fold: the null was too wide and
power was lost (README, *Calibration*). Scoring the query with the fold models themselves
(cross-conformal scoring, Vovk 2015) puts query and calibration cells on the same footing: each
calibration cell is scored by the one model that did not see it, each query cell by all k of them.
0.20 does so by default on such references (the mean over fold models, chosen here).

Rules compared, every reference subsampled to ``--reference-cells`` (seeded, stratified, as
``spikgpt bench --reference-cells``), the package's decision (:func:`~spikgpt.openset.decision.decide`
cell by cell: cross-fitted models have no calibration positions) at FDR 0.10:

- ``cross-fitted``: the query scored by a final model fitted on every cell (``calibration_folds=5``
  until 0.19);
- ``cross-conformal mean``: the query scored by the mean over the fold models (0.20's
  :meth:`spikgpt.model.SpikGPTModel.fold_scores`);
- ``cross-conformal max``: by the largest over the fold models (more power, less valid);
- ``… · no calls when shifted`` (0.19): the same, but no cell is called Unknown in a query the
  shift correction judged shifted as a whole (``decide(withhold_under_shift=True)``), after 0.15's
  run of this script found 20–31 % of shifted closed-set queries' known cells called Unknown;
- ``… · guard`` (0.20): cells predicted as a type with no calibration cell (fewer than 5 reference
  cells: never held out of a fold) are not tested (``decide(untested=...)``).
- ``held out`` (0.21): held-out calibration (``calibration_folds=1``): fold 0's model alone, its
  held-out fifth calibrating, with the neighbourhood test as the package's held-out models decide.
  Fold 0 is a stratified fifth as the package's 20 % split is, not the same cells. The default
  up to 0.20 at these sizes above ~105 cells; compared with cross-fitting at 150, 250 and 400
  cells (``benchmarks/calibration_size.py``), and at 500 cells and full size (0.21.1).
  ``held out · cell by cell`` (0.21.1): the same without the neighbourhood test.
- ``cross-conformal mean · fold-0 neighbourhood`` (0.21.1): the cross-conformal mean with a
  neighbourhood test whose null is fold 0's held-out cells placed among the query cells in fold
  0's mapped embedding (the cached positions; a prototype of a neighbourhood test for
  cross-fitted models, which the package did not have).
- ``cross-conformal mean · fold neighbourhoods`` (0.22, the package's rule for cross-fitted
  models): the neighbourhood test over all five folds, each fold's held-out cells placed among
  the query cells in its own model's embedding (:func:`~spikgpt.openset.decision.fold_neighbourhood_pvalues`);
  calls are withheld under a shift only where no neighbourhood test runs (folds under 21 cells:
  mESC's references); ``· no calls when shifted`` withholds them always. Caches from before 0.22
  hold fold 0's positions only: :func:`add_positions` refits folds 1–4 (checked against the
  cached scores) and adds theirs. ``· Simes``: the same with the cell's own and its
  neighbourhood's p-values merged by Simes instead of Bonferroni (``neighbourhood_null.merged_pvalues``);
  ``held out · Simes · guard`` the same merge for the held-out rule. Since 0.23 the package
  merges by Simes, so ``cross-conformal mean · fold neighbourhoods · Simes · guard`` is the
  package's rule; the rules without ``· Simes`` keep 0.11–0.22's Bonferroni merge.

Open set: the scenarios of ``novelty_cache.py`` on ``--open-seeds`` reference subsamples; closed
set: the bench tasks with their composition-shifted query variants (``--closed-seeds``). Reported
and chosen as ``neighbourhood_null.py`` does (leave-one-dataset-out, the same objective). The
package reproduces these calibration and query scores (checked through ``spikgpt.train`` on two
scenarios). The predicted types here are those of a classifier fitted on every cell at once
(0.19's final model); 0.20's is the held-out network refitted on every cell. With the default
shift mode they change no call of a withholding rule (types are corrected on their own only once
the gate fired), but the guard reads them: not rerun with 0.20's classifier (~3 h on 2 cores).

Usage: ``python benchmarks/cross_conformal.py --open-seeds 0 1 --closed-seeds 0 1 2 --cache DIR --out
benchmarks/results/cross_conformal_020`` (``--cache``: each scenario's fitted scores are kept there
as ``.npz`` and reused by a rerun; 0.19's run, seed 0 only, is in ``results/cross_conformal``);
0.21: ``--reference-cells 150`` and ``250`` with ``--open-seeds 0 --closed-seeds 0 1 2``
(``results/cross_conformal_150``, ``_250``), ``400`` with ``--closed-seeds 0``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
from neighbourhood_null import TABLE_HEAD, lodo_lines, summarise, table_rows, write_results
from novelty_cache import closed_tasks, scenarios
from novelty_decision import objective

from spikgpt.api import _fit_scored, _held_out_scores, labels_of
from spikgpt.bench.tasks import DEFAULT_DATA_ROOT, subsample_reference
from spikgpt.data import Cells
from spikgpt.model import NetworkConfig, TrainConfig
from spikgpt.model.training import MIN_SPLIT_CELLS, cpu_settings, stratified_folds
from spikgpt.openset.decision import (
    DEFAULT_FDR,
    NEIGHBOURS,
    calibration_statistic,
    combined_statistic,
    neglog_pvalues,
    neighbourhoods_tested,
)
from spikgpt.openset.novelty import DEFAULT_COMBINATION as NAMES

FOLDS = 5
SCORINGS = ("cross-fitted", "cross-conformal mean", "cross-conformal max")
WITHHELD = " · no calls when shifted"
GUARD = " · guard"
HELD_OUT = "held out"
CELL_BY_CELL = " · cell by cell"
FOLD0_NEIGHBOURS = " · fold-0 neighbourhood"
FOLD_NEIGHBOURS = " · fold neighbourhoods"
RULES = tuple(r + w + g for r in SCORINGS for w in ("", WITHHELD) for g in ("", GUARD))
RULES += (HELD_OUT + GUARD, HELD_OUT + WITHHELD + GUARD, HELD_OUT + CELL_BY_CELL + GUARD)
NEIGHBOURHOODS = (FOLD0_NEIGHBOURS, FOLD_NEIGHBOURS)
RULES += tuple("cross-conformal mean" + nb + w + GUARD for nb in NEIGHBOURHOODS for w in ("", WITHHELD))
SIMES = " · Simes"
RULES += ("cross-conformal mean" + FOLD_NEIGHBOURS + SIMES + GUARD, HELD_OUT + SIMES + GUARD)
ONE_FOLD = "cross-conformal one fold"
DRAW_SEED = [0]  # the one-fold rule's draw (``--draw-seed``)
RULES += (ONE_FOLD + GUARD, ONE_FOLD + FOLD_NEIGHBOURS + SIMES + GUARD)
ARRAYS = ("pred", "matched", "unseen")
POSITIONS = tuple(f"Z{w}{j}" for j in range(FOLDS) for w in "cq")


def query_scores(model, query: Cells) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Default raw scores of the query under ``model`` (mapped), its predicted types, the matched cells
    and the cells' positions (the standardised mapped embedding the neighbourhood test reads)."""
    E, residual = model.embed(query, NAMES)
    ok = np.isfinite(E).all(axis=1)
    mapped = model.map_query(E[ok])
    part = model.classify(E, residual, mapped, NAMES)
    if not part.embedded.all():
        raise RuntimeError("every query cell must embed (rows index the query)")
    return part.scores, part.probs[part.embedded].argmax(axis=1), mapped.matched, part.outputs.embedding


def fit_folds(ref, key: str, kw: dict, query, seed: int, folds=range(FOLDS), final: bool = True) -> dict:
    """Fold models' out-of-fold calibration scores, every model's query scores, the final model's predictions.

    Every fold model's positions as well (``Zc<j>``: its held-out cells, ``Zq<j>``: the query, in
    its standardised mapped embedding). ``folds`` / ``final=False``: only those fold models, for
    :func:`add_positions`.
    """
    y, classes = labels_of(ref, key)
    cells, q = Cells(ref, **kw), Cells(query, **kw)
    fit = {
        "embedder": "default",
        "net_cfg": NetworkConfig(in_dim=1, n_classes=len(classes)),
        "cfg": TrainConfig(),
        "seed": seed,
    }
    # The default scores read the embedder and embedding-space statistics only, not the network:
    # fold models train it for a token 2 epochs (the final model, which labels cells, in full).
    assert set(NAMES) == {"mahalanobis_embedding", "pca_residual"}
    fold_fit = {**fit, "cfg": TrainConfig(max_epochs=2)}
    fold = stratified_folds(y, FOLDS, min_cells=MIN_SPLIT_CELLS, seed=seed)
    cal, per_fold, positions = [], [], {}
    with cpu_settings(1):
        for j in folds:
            kept, held = np.flatnonzero(fold != j), np.flatnonzero(fold == j)
            m = _fit_scored(cells.subset(kept), y[kept], classes, **fold_fit, progress=False)
            c, _, positions[f"Zc{j}"] = _held_out_scores(m, cells.subset(held), y[held])
            s, _, _, positions[f"Zq{j}"] = query_scores(m, q)
            cal.append(c)
            per_fold.append(s)
        out = {
            "calibration": {n: np.concatenate([c[n] for c in cal]) for n in NAMES},
            "folds": {n: np.stack([s[n] for s in per_fold]) for n in NAMES},
            **positions,
        }
        if not final:
            return out
        final_model = _fit_scored(cells, y, classes, **fit, progress=False)
        scores, pred, matched, _ = query_scores(final_model, q)
    truth = query.obs[key].astype(str).to_numpy()
    return {**out, "final": scores, "pred": pred, "matched": matched, "unseen": ~np.isin(truth, classes)}


def add_positions(fitted: dict, ref, key: str, kw: dict, query, seed: int) -> dict:
    """``fitted`` (a cache from before 0.22, with fold 0's positions only) with every fold's positions.

    Refits fold models 1 to 4 (as :func:`fit_folds` does; seeded) and checks that they reproduce
    the cached query scores, so that the positions belong to the models that scored the cells.
    """
    missing = [j for j in range(FOLDS) if f"Zc{j}" not in fitted]
    more = fit_folds(ref, key, kw, query, seed, folds=missing, final=False)
    for i, j in enumerate(missing):
        for n in NAMES:
            if not np.allclose(more["folds"][n][i], fitted["folds"][n][j], rtol=1e-4, atol=1e-5):
                raise RuntimeError(f"fold {j} does not reproduce the cached scores {n}; refit without the cache")
    return {**fitted, **{k: v for k, v in more.items() if k.startswith("Z")}}


def save_fitted(path: Path, fitted: dict) -> None:
    """:func:`fit_folds`'s result as one ``.npz`` (nested keys joined by ``/``)."""
    flat = {f"{k}/{n}": v for k in ("calibration", "final", "folds") for n, v in fitted[k].items()}
    np.savez(path, **flat, **{k: fitted[k] for k in ARRAYS + POSITIONS if k in fitted})


def load_fitted(path: Path) -> dict:
    """The inverse of :func:`save_fitted`."""
    z = np.load(path)
    out = {k: z[k] for k in ARRAYS + POSITIONS if k in z}
    for k in ("calibration", "final", "folds"):
        out[k] = {n: z[f"{k}/{n}"] for n in NAMES}
    return out


def scenario(
    fitted: dict, rule: str, rows=slice(None), uncalibrated: np.ndarray | None = None, n_fold0: int = 0
) -> dict:
    """``neighbourhood_null``'s scenario dict for one rule.

    ``uncalibrated``: per class, whether no calibration cell represents it (the guard's types).
    ``held out``: fold 0's model and its ``n_fold0`` held-out cells alone, with their positions
    for the neighbourhood test (the package's held-out calibration); ``· cell by cell`` drops
    them; ``· fold-0 neighbourhood`` gives the cross-conformal scores fold 0's positions,
    ``· fold neighbourhoods`` every fold's (the package's cross-fitted rule, 0.22); ``· Simes``
    merges the two tests by Simes; the other rules have none (they decide cell by cell).
    """
    has = {}
    for suffix in (GUARD, SIMES, WITHHELD, CELL_BY_CELL, FOLD0_NEIGHBOURS, FOLD_NEIGHBOURS):  # outermost first
        has[suffix], rule = rule.endswith(suffix), rule.removesuffix(suffix)
    guard, simes, withhold, cell_by_cell = has[GUARD], has[SIMES], has[WITHHELD], has[CELL_BY_CELL]
    fold0_neighbours, fold_neighbours = has[FOLD0_NEIGHBOURS], has[FOLD_NEIGHBOURS]
    cal = fitted["calibration"]
    # each fold's calibration cells placed among the query cells in its embedding: the neighbourhood test
    with_positions = fold0_neighbours or (rule == HELD_OUT and not cell_by_cell)
    folds = range(FOLDS) if fold_neighbours else range(1) if with_positions else range(0)
    positions = {"positions": [(fitted[f"Zq{j}"][rows], fitted[f"Zc{j}"]) for j in folds]} if folds else {}
    if fold_neighbours:  # as the package decides: calls withheld under a shift only where no neighbourhood test runs
        withhold = withhold or not neighbourhoods_tested([len(fitted[f"Zc{j}"]) for j in folds])
    if rule == HELD_OUT:
        scores = {n: v[0] for n, v in fitted["folds"].items()}
        cal = {n: v[:n_fold0] for n, v in cal.items()}
    elif rule == "cross-fitted":
        scores = fitted["final"]
    elif rule == "cross-conformal mean":
        scores = {n: v.mean(axis=0) for n, v in fitted["folds"].items()}
    elif rule == ONE_FOLD:  # each query cell scored by one fold model, drawn uniformly
        draw = np.random.default_rng(DRAW_SEED[0]).integers(FOLDS, size=fitted["pred"].shape[0])
        scores = {n: v[draw, np.arange(v.shape[1])] for n, v in fitted["folds"].items()}
    else:
        scores = {n: v.max(axis=0) for n, v in fitted["folds"].items()}
    scores = {n: v[rows] for n, v in scores.items()}
    cal_stat = calibration_statistic(cal, NAMES)
    return {
        "names": NAMES,
        "scores": scores,
        "calibration": cal,
        "calibration_statistic": cal_stat,
        "L": neglog_pvalues(combined_statistic(scores, cal, NAMES)[0], cal_stat),
        "pred": fitted["pred"][rows],
        "unseen": fitted["unseen"][rows],
        "matched": fitted["matched"][rows],
        "withhold": withhold,
        **({"combine": "simes"} if simes else {}),
        **positions,
        **({"untested": uncalibrated[fitted["pred"][rows]]} if guard else {}),
    }


def uncalibrated_classes(ref, key: str, seed: int) -> tuple[np.ndarray, int]:
    """Per class (sorted, as :func:`~spikgpt.api.labels_of`), whether no fold holds out any of its cells;
    and how many cells fold 0 holds out (every fold holds out a cell of each other class)."""
    y, classes = labels_of(ref, key)
    fold = stratified_folds(y, FOLDS, min_cells=MIN_SPLIT_CELLS, seed=seed)
    return ~np.isin(np.arange(len(classes)), y[fold >= 0]), int((fold == 0).sum())


def objective_of(res: dict[str, dict], datasets: list[str]) -> float:
    """``novelty_decision.py``'s objective of one rule's :func:`summarise` result over ``datasets``."""
    closed = [res[d]["closed_worst_false_unknown"] for d in datasets]
    return objective([res[d] for d in datasets], DEFAULT_FDR, [w for w in closed if np.isfinite(w)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference-cells", type=int, default=100)
    p.add_argument("--closed-seeds", type=int, nargs="*", default=[0])
    p.add_argument("--open-seeds", type=int, nargs="*", default=[0], help="reference subsamples of the open set")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--only", nargs="*", default=None, help="dataset names to run")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cross_conformal"))
    p.add_argument("--cache", type=Path, default=None, help="folder keeping each scenario's fitted scores")
    p.add_argument("--rules", nargs="*", default=None, help="only these rules (exact names)")
    p.add_argument("--draw-seed", type=int, default=0, help="seed of the one-fold rule's draw of each cell's fold")
    args = p.parse_args()
    DRAW_SEED[0] = args.draw_seed
    rules = RULES if not args.rules else tuple(r for r in RULES if r in args.rules)
    logging.basicConfig(level=logging.ERROR)
    open_set = {r: [] for r in rules}
    closed = {r: [] for r in rules}
    jobs = [(s, *sc, {}) for s in args.open_seeds for sc in scenarios(args.data_dir)]
    jobs += [(s, *t) for s in args.closed_seeds for t in closed_tasks(args.data_dir, s)]
    for seed, dataset, name, ref, query, key, kw, variants in jobs:
        if args.only and dataset not in args.only:
            continue
        t0 = time.perf_counter()
        kept = args.cache / (name.replace("/", "-") + f"__s{seed}.npz") if args.cache else None
        sub = subsample_reference(ref, key, args.reference_cells, seed)
        if kept is not None and kept.exists():
            fitted = load_fitted(kept)
            if not all(k in fitted for k in POSITIONS):  # a cache from before 0.22: fold 0's positions only
                fitted = add_positions(fitted, sub, key, kw, query, seed)
                save_fitted(kept, fitted)
        else:
            fitted = fit_folds(sub, key, kw, query, seed)
            if kept is not None:
                kept.parent.mkdir(parents=True, exist_ok=True)
                save_fitted(kept, fitted)
        uncalibrated, n_fold0 = uncalibrated_classes(sub, key, seed)
        for rule in rules:
            for v, rows in (variants or {"": slice(None)}).items():
                sc = scenario(fitted, rule, rows, uncalibrated, n_fold0)
                sc = {"name": f"{name}__s{seed}{v}", "dataset": dataset, **sc}
                (closed if variants else open_set)[rule].append(sc)
        print(f"{name} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    if not open_set[rules[0]]:  # a closed-set-only run fills the cache; a run with the open set reports
        print(f"fitted scores kept in {args.cache}; no open-set scenario to summarise")
        return
    res, lines = (
        {},
        [
            f"# Unknown on {args.reference_cells}-cell references: cross-fitted vs cross-conformal scoring (FDR 0.1)",
            "",
            "Cell by cell (no neighbourhood test); recall: mean over subsample sizes 3, 10, 30, all (5 draws each); "
            f"closed worst: worst false Unknown over the bench tasks × seeds {args.closed_seeds} × query variants.",
            "",
            *TABLE_HEAD,
        ],
    )
    for rule in rules:
        # a rule whose scenarios carry positions decides with the package's neighbourhood test
        neighbourhood = "positions" in open_set[rule][0]
        res[rule] = summarise(open_set[rule], closed[rule], (NEIGHBOURS,) if neighbourhood else ())
        lines += table_rows(rule, res[rule])
    if len(res[rules[0]]) > 1:
        datasets = sorted(res[rules[0]])
        lines += lodo_lines(res, datasets)
        best = max(rules, key=lambda r: objective_of(res[r], datasets))
        lines += ["", f"Objective on all datasets: `{best}` {objective_of(res[best], datasets):.3f}."]
        held = HELD_OUT + GUARD
        if held in res:
            lines[-1] += f" `{held}` (20 % held out, `calibration_folds=1`) {objective_of(res[held], datasets):.3f}."

    write_results(args.out, res, lines)


if __name__ == "__main__":
    main()
