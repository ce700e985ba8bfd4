"""The Unknown decision: conformal p-values, a shift-robust null and Benjamini–Hochberg.

A query cell is ``Unknown`` when the test "this cell is of a type the reference contains" is
rejected while the false discovery rate over the query is held at the level the user sets
(``fdr``, default 0.10: at most about a tenth of the Unknown calls are cells of known types).

1. **Conformal p-values** (Bates, Candès, Lei, Romano & Sesia 2023). Every novelty score of a
   query cell is compared with the same score of held-out reference cells that no fitted step
   has seen; ``p = (1 + #{calibration ≥ score}) / (n + 1)``. Beyond the largest calibration
   score, an exponential tail fitted to the calibration cells' upper ``TAIL`` share (peaks over
   threshold) continues the p-value, so a cell far outside the reference gets one below
   ``1 / (n + 1)``: with a few hundred calibration cells the plain conformal p-value cannot go
   lower, and Benjamini–Hochberg over thousands of query cells would then reject nothing. The
   tail needs ``MIN_TAIL_CELLS`` cells to fit: with fewer than 21 calibration cells p-values
   stay plainly conformal and few or no cells can be called Unknown.
2. **Several scores, one p-value.** Each score's p-value becomes ``−log p``; the cell's
   statistic is the largest of them, itself calibrated the same way on the calibration cells
   (so the maximum over scores costs no extra false calls).
3. **Shift is not novelty.** When the query as a whole sits away from the reference (batch,
   protocol, stimulation), all its cells get small p-values. Under the null ``−log p`` is
   exponential(1), with median ``log 2`` and quartile spread ``log 2 − log(4/3)``. If the query's
   median exceeds ``log 2`` by more than :data:`GATE`, its lower half (known cells, as long as
   fewer than half of the query cells are of unseen types) estimates the shift: ``−log p`` is
   re-centred and re-scaled so that the query's median and lower quartile sit where the null's
   do. Nothing is ever made *more* novel. Its price: a query with no shift but many new cells (a
   third of pbmc68k's query when B cells are left out) also has a raised median, and the
   correction then removes their evidence (81 % of B cells Unknown without it, 0 % with it);
   ``shift="none"`` is the choice
   for queries from the reference's own study. A shift need not be the same for every type (a
   protocol moves some cell lines off the reference's subspace and not others): with
   ``"gated_by_type"`` (the default), once the query as a whole is judged shifted, each predicted
   type of at least ``MIN_TYPE_CELLS`` cells is also re-centred and re-scaled on its own cells,
   and a cell keeps the smaller of the two. Only then: per type without a global shift, a new
   type that fills most of the type it is predicted as would pass for that type's shift.
4. **Neighbourhoods.** With the positions of query and calibration cells (models since 0.11),
   each cell is also tested through the mean ``−log p`` of its :data:`NEIGHBOURS` nearest other
   query cells, against the same mean around each calibration cell placed among the query
   cells (:func:`neighbourhood_pvalues`); the cell's two p-values are merged by Simes,
   ``min(2 · min, max)`` (0.23; until 0.22 Bonferroni, ``2 · min``). A
   few new cells together are seen where each alone is not. Since 0.27 the calibration cells'
   neighbourhoods are formed among the query cells that are not Unknown on their own p-values
   at :data:`DEFAULT_FDR` (:data:`NULL_WITHOUT_OWN_CALLS`): a calibration cell beside a new
   group would otherwise borrow its scores, and the null would grow with the group it should
   expose. A cross-fitted model (0.22) has one null per fold: each fold model's held-out cells
   placed among the query cells in that fold model's embedding, the p-values averaged over
   folds (:func:`fold_neighbourhood_pvalues`).
   Only where every fold holds 21 positions or more, enough for a tail (:func:`neighbourhoods_tested`).
5. **Types the calibration lacks are not tested.** A type with too few reference cells to hold
   any out (fewer than ``min_cells_per_class``) has no calibration cell, and its known query
   cells look novel against the others: cells predicted as such a type get p-value 1 (reason
   ``"uncalibrated_type"``) and keep their label (``untested``; 0.20).
6. **Benjamini–Hochberg** over the query's cells at level ``fdr``, Storey-adaptive since 0.26
   (:func:`adaptive_qvalues`: the level divided by the estimated share of known cells). Or, when the user sets
   ``false_unknown`` instead (the share of known cells they accept to lose), every cell is
   tested at that level on its own: ``Unknown`` iff ``p <= false_unknown``. That bounds the
   share of known cells called Unknown, not the share of Unknown calls that are known cells:
   it has far more power for a handful of new cells in a large query, and far more false
   calls among few true ones.

Guarantee and its limits: under exchangeability of known query cells with the calibration cells
(no shift), conformal p-values are valid and Benjamini–Hochberg controls the FDR (Bates et al.,
Theorem 2); the exponential tail is an approximation beyond the calibration data, and the shift
correction assumes a minority of unseen cells. ``benchmarks/novelty_decision.py`` measures the
FDR reached on every shared dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.neighbors import NearestNeighbors
from tqdm.auto import tqdm

UNKNOWN = "Unknown"
#: Share of calibration cells whose scores define the exponential tail.
TAIL = 0.2
#: Fewest calibration cells a tail is fitted to. Below it (fewer than 21 calibration cells: a
#: reference of about 100 cells) p-values stay plainly conformal, ≥ 1 / (n + 1). Measured: a tail
#: fitted to the 4 top cells of a 100-cell pbmc68k reference put 22 % of a same-study query's
#: known cells beyond it (``spikgpt bench --reference-cells 100``); with 7 (the tests' 160-cell
#: synthetic references) the synthetic checks of ``benchmarks/novelty_decision.py`` hold.
MIN_TAIL_CELLS = 5
#: Default false discovery rate of the Unknown calls.
DEFAULT_FDR = 0.10
_LOG2 = float(np.log(2.0))
_NULL_SPREAD = float(np.log(2.0) - np.log(4.0 / 3.0))  # median − lower quartile of exponential(1)


@dataclass
class Decision:
    """Outcome of :func:`decide` for n query cells."""

    pvalue: np.ndarray  # [n] p-value after the shift correction
    qvalue: np.ndarray  # [n] Storey-adaptive Benjamini–Hochberg adjusted p-value (adaptive_qvalues)
    unknown: np.ndarray  # [n] bool, Unknown at the FDR level (q <= fdr)
    reason: np.ndarray  # [n] the score with the smallest p-value ("uncalibrated_type": not tested)
    shift: dict  # the estimated global shift (location, scale) in −log p units
    smallest: float = 0.0  # the smallest p-value any cell could have got (0: none, the tails have no floor)
    withheld: int = 0  # cells the rule would have called Unknown, not called (``withhold_under_shift``)


def neglog_pvalues(
    x: np.ndarray, calibration: np.ndarray, tail: float = TAIL, *, grid: str = "conformal"
) -> np.ndarray:
    """``−log`` of conformal p-values of ``x`` against ``calibration``, with an exponential tail.

    Computed on the log scale so that a cell far outside the reference keeps a finite,
    ordered statistic instead of a p-value that underflows to 0.

    Parameters
    ----------
    x
        Scores of the cells to test (higher = more novel).
    calibration
        The same score of held-out reference cells.
    tail
        Share of the calibration cells (the highest) to which the exponential tail is fitted.
    grid
        ``"conformal"``: ``(1 + #{calibration ≥ x}) / (n + 1)``. ``"loo"``: ``x`` are the
        calibration cells themselves, each compared with the others, ``#{calibration ≥ x} / n``
        (itself included). ``"matched"``: new cells on the same grid as ``"loo"``,
        ``max(#{calibration ≥ x}, 1) / n``, so that a statistic built from several scores
        (:func:`combined_statistic`) takes the same values for a new cell and a calibration cell
        of the same ranks; mixing grids would break ties in favour of calling new cells novel.

    Returns
    -------
    ``[len(x)]`` values ``−log p >= 0``.
    """
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    n = len(cal)
    x = np.asarray(x, dtype=np.float64)
    at_least = n - np.searchsorted(cal, x, side="left")  # calibration cells >= x (itself included if LOO)
    if grid == "conformal":
        p = (1.0 + at_least) / (n + 1.0)
    else:  # "loo" counts the cell itself; "matched" puts new cells on that grid
        p = np.maximum(at_least, 1) / n
    L = -np.log(np.clip(p, 1e-300, 1.0))
    n_tail = tail_cells(n, tail)
    if not n_tail:
        return L
    start = cal[n - n_tail - 1]
    scale = max(float((cal[n - n_tail :] - start).mean()), 1e-12)
    # (n_tail + 1) / (n + 1) cells are at least as extreme at ``start``; the fitted tail is used
    # only beyond the largest calibration score, where the plain p-value stops at 1 / (n + 1):
    # inside the calibration range the p-value stays exactly conformal (and so valid).
    L_tail = -np.log((n_tail + 1.0) / (n + 1.0)) + (x - start) / scale
    return np.where(x > cal[-1], np.maximum(L, L_tail), L)


def tail_cells(n: int, tail: float = TAIL) -> int:
    """How many of ``n`` calibration cells the exponential tail is fitted to; 0: too few for a tail."""
    n_tail = int(np.ceil(tail * n))
    return n_tail if MIN_TAIL_CELLS <= n_tail < n else 0


def tail_pvalues(x: np.ndarray, calibration: np.ndarray, tail: float = TAIL) -> np.ndarray:
    """Conformal p-values with an exponential tail (``exp`` of :func:`neglog_pvalues`)."""
    return np.exp(-neglog_pvalues(x, calibration, tail))


def smallest_pvalue(
    calibration: dict[str, np.ndarray], names: tuple[str, ...], calibration_statistics: np.ndarray | None = None
) -> float:
    """The p-value of a query cell beyond every calibration cell on every score: the smallest there is.

    0 when the calibration cells fit the exponential tails (:func:`neglog_pvalues`), which have no
    floor. With 20 calibration cells or fewer it is at least ``2 / (n + 1)``: such a cell ties
    with the most extreme calibration cell (both get the grid's smallest per-score p-value,
    ``1 / n``). The shift correction only raises p-values.
    """
    if calibration_statistics is None:
        calibration_statistics = calibration_statistic(calibration, names)
    stat, _ = combined_statistic({n: np.array([np.inf]) for n in names}, calibration, names)
    return float(np.exp(-neglog_pvalues(stat, calibration_statistics))[0])


def unreachable_unknown(
    smallest: float, n_calibration: int, n_query: int, fdr: float, false_unknown: float | None = None
) -> str:
    """Why (almost) no cell can be called Unknown, given the ``smallest`` p-value there is; or ``""``.

    Benjamini–Hochberg calls the ``k`` smallest p-values when the ``k``-th is at most
    ``fdr · k / n``; with every p-value at least ``smallest`` (:func:`smallest_pvalue`) no cell is
    called unless ``smallest · n / fdr`` query cells or more lie beyond every calibration cell.
    The per-cell rule calls nothing when ``false_unknown < smallest``.
    """
    if smallest <= 0 or n_query == 0:
        return ""
    floor = f"The model was calibrated on {n_calibration} reference cells, so no p-value is below {smallest:.3f}"
    if false_unknown is not None:
        if 0 < false_unknown < smallest:
            return (
                f"{floor}, and false_unknown={false_unknown} calls no cell Unknown; "
                f"set false_unknown >= {smallest:.3f}."
            )
        return ""
    if fdr <= 0:
        return ""
    need = int(np.ceil(smallest * n_query / fdr - 1e-9))
    cells = f"{need} of the {n_query} query cells"
    if need > n_query:
        reach = (
            f"no cell can be called Unknown at FDR {fdr} (a call needs at least {cells} beyond every calibration cell)"
        )
    else:
        reach = f"at FDR {fdr} a cell is called Unknown only if at least {cells} lie beyond every calibration cell"
    return (
        f"{floor}: {reach}. To call a few new cells, test cells one by one with false_unknown >= {smallest:.3f} "
        "(--false-unknown), or calibrate on every reference cell with calibration_folds=5 at training "
        "(--calibration-folds 5, which calls nothing in a query shifted as a whole); either calls more known "
        "cells Unknown (README, small references)."
    )


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values: a cell is rejected at level ``fdr`` iff ``q <= fdr``."""
    p = np.asarray(p, dtype=np.float64)
    n = len(p)
    if n == 0:
        return np.zeros(0)
    order = np.argsort(p, kind="stable")
    ranked = p[order] * n / np.arange(1, n + 1)
    q = np.empty(n)
    q[order] = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    return q


#: Storey's λ: p-values above it are counted as known cells' to estimate their share. 0.5 is
#: Storey's own choice (Storey, Taylor & Siegmund 2004), not tuned here.
STOREY_LAMBDA = 0.5


def known_share(p: np.ndarray, lam: float = STOREY_LAMBDA) -> float:
    """Storey's estimate (with its +1) of the share of cells whose null is true, at most 1."""
    p = np.asarray(p, dtype=np.float64)
    return 1.0 if len(p) == 0 else min(1.0, (np.sum(p > lam) + 1) / (len(p) * (1 - lam)))


def adaptive_qvalues(p: np.ndarray) -> np.ndarray:
    """Storey-adaptive Benjamini–Hochberg q-values: :func:`bh_qvalues` times :func:`known_share`.

    Benjamini–Hochberg controls the FDR at ``fdr`` times the share of known cells; where a query
    holds many new cells that share is estimated and divided out, so the FDR asked for is the one
    spent (0.26; chosen leave-one-dataset-out, README *Unknown*). Adaptive procedures of this kind
    keep the FDR with conformal p-values (Gao & Roquain 2026, arXiv:2603.17984, and references there).
    """
    return bh_qvalues(p) * known_share(p)  # both at most 1


def combined_statistic(
    scores: dict[str, np.ndarray],
    calibration: dict[str, np.ndarray],
    names: tuple[str, ...],
    *,
    grid: str = "matched",
) -> tuple[np.ndarray, np.ndarray]:
    """Largest ``−log p`` over the scores ``names`` and, per cell, which score it came from."""
    L = np.stack([neglog_pvalues(scores[n], calibration[n], grid=grid) for n in names], axis=1)
    best = L.argmax(axis=1)
    return L[np.arange(len(L)), best], np.asarray(names, dtype=object)[best]


def calibration_statistic(calibration: dict[str, np.ndarray], names: tuple[str, ...]) -> np.ndarray:
    """:func:`combined_statistic` of every calibration cell against the other calibration cells."""
    return combined_statistic(calibration, calibration, names, grid="loo")[0]


SHIFT_MODES = ("none", "location", "quartile", "scale", "gated", "gated_by_type")
#: ``"gated"``: "scale", but only for a shift of the known cells' median ``−log p`` above this.
#: Chosen leave-one-dataset-out over {1, 0.75, 0.5, 0.25} with the neighbourhood test
#: (benchmarks/neighbourhood_null.py --gates; 0 is refused: it corrects away a new type that fills
#: its predicted type in a query without shift), on two replicate sets of caches built on two
#: processors, pooled (``--pool``): 0.25 (0.12–0.13: 0.5, chosen on one set, which the other set
#: alone overturns; 0.11: 1). Against 0.5 it keeps IFN-β's FDR under 0.10 (0.113 → 0.069) at a
#: held-out recall of 0.209 (0.208–0.211); against 1, worst FDR 0.16 → 0.11, worst closed-set
#: false Unknown 6.1 % → 5.4 %.
GATE = 0.25
#: ``"gated"``: the quantile of the query's ``−log p`` whose excess over the null's
#: (``−log(1 − q)``) is compared with :data:`GATE`. A lower quantile moves with a global shift
#: but hardly with a new group of under ~60 % of the query; measured leave-one-dataset-out over
#: {0.5, 0.25, 0.1} × gates {0.25, 0.5} (``neighbourhood_null.py --gate-quantiles``, 0.15): the
#: median stays — lower quantiles keep more of pbmc68k's new groups but leave its per-type
#: miscalibration (FDR 0.104 → 0.135) and IFN-β's milder stimulation (0.069 → 0.115) uncorrected.
GATE_QUANTILE = 0.5
#: ``"gated_by_type"``: fewest cells of a predicted type for a correction of its own. 5, 10, 20
#: and 40 gave identical numbers on every cached scenario; 10 keeps a type's median and quartile
#: from resting on a handful of cells.
MIN_TYPE_CELLS = 10
#: Chosen leave-one-dataset-out (benchmarks/novelty_decision.py). ``"MODE@matched"`` (estimated
#: on the query cells the mapping matched) is an option, not a candidate: matched cells are those
#: nearest the reference, so the estimate is biased low under a strong shift.
DEFAULT_SHIFT = "gated_by_type"
_LOG43 = float(np.log(4.0 / 3.0))  # lower quartile of exponential(1)


def shift_correction(
    neglog_p: np.ndarray,
    mode: str = "scale",
    null_cells: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    gate: float = GATE,
    gate_quantile: float = GATE_QUANTILE,
) -> tuple[np.ndarray, dict]:
    """Re-centre (``"location"``) and re-scale (``"scale"``) ``−log p`` when the query's lower half is shifted.

    With ``null_cells`` (a boolean mask of query cells known to have a reference counterpart,
    e.g. :attr:`spikgpt.mapping.Mapping.matched`) the shift is estimated on them alone, so a
    large group of new cells does not pass for a shift. ``groups`` (the predicted type of every
    cell) is what ``"gated_by_type"`` corrects type by type once ``"gated"`` has found a shift;
    without it ``"gated_by_type"`` is ``"gated"``. ``gate``: how far the ``gate_quantile``
    quantile of ``−log p`` must lie above the null's (``log 2`` for the median) for the
    ``"gated"`` modes to correct.
    """
    L = np.asarray(neglog_p, dtype=np.float64)
    none = {"location": 0.0, "scale": 1.0}
    if mode == "gated_by_type":
        corrected, info = shift_correction(L, "gated", null_cells, gate=gate, gate_quantile=gate_quantile)
        if info["location"] == 0 or groups is None:
            return corrected, {**info, "types_corrected": 0}
        groups, n_types = np.asarray(groups), 0
        for g in np.unique(groups):
            own = groups == g
            if own.sum() >= MIN_TYPE_CELLS:
                corrected[own] = np.minimum(corrected[own], shift_correction(L[own], "scale")[0])
                n_types += 1
        return corrected, {**info, "types_corrected": n_types}
    ref = L if null_cells is None or null_cells.sum() < 10 else L[null_cells]
    if mode == "none" or len(ref) < 10:
        return L, none
    q25, q50, q_gate = np.quantile(ref, [0.25, 0.5, gate_quantile])
    if mode == "quartile":  # location from the lower quartile: robust to up to ~70 % unseen cells
        if q25 <= _LOG43:
            return L, none
        return np.maximum(np.minimum(L, L - q25 + _LOG43), 0.0), {"location": float(q25 - _LOG43), "scale": 1.0}
    if q50 <= _LOG2 or (mode == "gated" and q_gate + np.log1p(-gate_quantile) <= gate):
        return L, none
    scale = max((q50 - q25) / _NULL_SPREAD, 1.0) if mode in ("scale", "gated") else 1.0
    corrected = np.minimum(L, (L - q50) / scale + _LOG2)
    return np.maximum(corrected, 0.0), {"location": float(q50 - _LOG2), "scale": float(scale)}


#: A query cell's neighbourhood: its this many nearest other query cells. Chosen leave-one-dataset-out
#: over {none, 5, 10, 2+5+10} (benchmarks/neighbourhood_null.py): held-out recall 0.23 vs 0.18.
NEIGHBOURS = 10
#: Largest query whose neighbourhoods are tested (exact neighbours cost n² distances). Beyond it
#: a group of a few new cells could not be called at a controlled FDR anyway (Benjamini–Hochberg
#: needs ``p <= fdr · k / n``), and a large new group is seen cell by cell.
MAX_NEIGHBOURHOOD_CELLS = 20_000


#: Form calibration cells' neighbourhoods among the query cells that are not Unknown on their own
#: p-value (0.27). A calibration cell placed beside a group of new cells otherwise borrows their
#: scores, and the null grows with the very group it should expose: on the cross-conformal caches,
#: a null formed among the known query cells alone (an oracle) called 0.98 of 30-cell pancreas
#: groups where the null among all cells called 0.46. ``False``: among all query cells (0.11–0.26).
NULL_WITHOUT_OWN_CALLS = True


def neighbourhood_pvalues(
    neglog_p: np.ndarray,
    query: np.ndarray,
    calibration: np.ndarray,
    m: int = NEIGHBOURS,
    *,
    among: np.ndarray | None = None,
) -> np.ndarray:
    """Conformal p-values of each query cell's neighbourhood against known cells' neighbourhoods.

    The statistic of a query cell is the mean ``−log p`` of its ``m`` nearest *other* query cells
    (positions ``query``); its null is the same mean around each held-out calibration cell
    (positions ``calibration``) placed among the query cells — the neighbourhood of a known
    cell, with whatever correlation neighbouring cells' scores have. A few new cells close
    together raise each other's statistic, which a single cell's p-value cannot show.
    ``among``: the query cells (boolean mask) that may neighbour a calibration cell; all when ``None``.
    """
    nn = NearestNeighbors(n_neighbors=m, algorithm="brute").fit(query)
    around_query = neglog_p[nn.kneighbors(return_distance=False)].mean(axis=1)
    if among is not None:
        nn = NearestNeighbors(n_neighbors=m, algorithm="brute").fit(query[among])
        neglog_p = neglog_p[among]
    around_calibration = neglog_p[nn.kneighbors(calibration, return_distance=False)].mean(axis=1)
    return np.exp(-neglog_pvalues(around_query, around_calibration))


def fold_neighbourhood_pvalues(
    neglog_p: np.ndarray,
    positions: Sequence[tuple[np.ndarray, np.ndarray]],
    m: int = NEIGHBOURS,
    *,
    progress: bool = False,
    among: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`neighbourhood_pvalues` over several embeddings, each with its own calibration cells.

    ``positions``: one ``(query, calibration)`` pair per model whose held-out cells calibrate —
    one for a held-out model; one per fold model for a cross-fitted one, each fold's held-out
    cells placed among the query cells in that fold model's embedding. The p-value is the mean
    of the folds' p-values weighted by their calibration cells: cross-conformal (Vovk 2015),
    which without the exponential tail is ``(1 + Σ_j #{fold j's null ≥ cell's statistic in
    fold j}) / (n + 1)`` up to the ``+ 1`` per fold. ``progress``: a bar over the folds (each an
    exact ``n × n`` neighbour search: ~1.2 s at 20,000 cells on 2 cores). ``among``: as
    :func:`neighbourhood_pvalues`.
    """
    sizes = np.array([len(cal) for _, cal in positions], dtype=np.float64)
    folds = tqdm(positions, desc="neighbourhood test", unit="fold", disable=None if progress else True, leave=False)
    per_fold = [neighbourhood_pvalues(neglog_p, q, cal, m, among=among) for q, cal in folds]
    return np.average(np.stack(per_fold), axis=0, weights=sizes)


def neighbourhood_test(
    neglog_p: np.ndarray,
    positions: Sequence[tuple[np.ndarray, np.ndarray]],
    untested: np.ndarray | None = None,
    *,
    calls: Callable[[np.ndarray], np.ndarray] | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Step 4 of the rule: each cell's own p-value merged with its neighbourhood's.

    ``neglog_p``: the cells' own (shift-corrected) ``−log p``. The calibration cells'
    neighbourhoods are formed among the query cells that ``calls`` leaves known on their own
    p-values (:data:`NULL_WITHOUT_OWN_CALLS`; among all when it calls none, or leaves
    :data:`NEIGHBOURS` cells or fewer). ``calls`` defaults to adaptive Benjamini–Hochberg at
    :data:`DEFAULT_FDR`, whatever level or rule then decides, so that a cell's p-value does not
    depend on them (q-values re-decide at another FDR as they stand). ``untested`` cells count as
    known there and get p-value 1. Returns the merged p-values (Simes, ``min(2 · min, max)``) and
    the neighbourhood test's own.
    """
    p = np.exp(-neglog_p)
    among = None
    calls = calls if calls is not None else (lambda q: adaptive_qvalues(q) <= DEFAULT_FDR)
    if NULL_WITHOUT_OWN_CALLS:
        known = ~calls(p if untested is None else np.where(untested, 1.0, p))
        among = None if known.all() or known.sum() <= NEIGHBOURS else known
    p_nb = fold_neighbourhood_pvalues(neglog_p, positions, progress=progress, among=among)
    # Simes (chosen leave-one-dataset-out over 150-cell to full-size references, 0.23)
    merged = np.minimum(np.minimum(1.0, 2.0 * np.minimum(p, p_nb)), np.maximum(p, p_nb))
    return (merged if untested is None else np.where(untested, 1.0, merged)), p_nb


def neighbourhoods_tested(n_positions: Sequence[int], n_query: int | None = None) -> bool:
    """Whether folds of ``n_positions`` calibration positions make a neighbourhood test of ``n_query`` cells.

    Queries of more than :data:`NEIGHBOURS` and at most :data:`MAX_NEIGHBOURHOOD_CELLS` cells
    (``None``: any such query), and only where every fold's null is long enough for the
    exponential tail (:func:`tail_cells`: 21 positions or more). A shorter null cannot put a
    p-value below ``1 / (n + 1)`` (0.048 for a 100-cell reference's 20-cell folds), so it calls
    nothing and its merge only halves the cells' own p-values (Bonferroni, ≤ 0.22): on the tests' 100-cell
    cross-fitted reference it cut the new type's cells called from 27 to 11 of 60 (0.22).
    """
    if n_query is not None and not NEIGHBOURS < n_query <= MAX_NEIGHBOURHOOD_CELLS:
        return False
    return bool(n_positions) and all(tail_cells(int(n)) for n in n_positions)


def decide(
    scores: dict[str, np.ndarray],
    calibration: dict[str, np.ndarray],
    names: tuple[str, ...],
    *,
    fdr: float = DEFAULT_FDR,
    calibration_statistics: np.ndarray | None = None,
    shift: str = DEFAULT_SHIFT,
    null_cells: np.ndarray | None = None,
    false_unknown: float | None = None,
    groups: np.ndarray | None = None,
    positions: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    withhold_under_shift: bool = False,
    untested: np.ndarray | None = None,
    progress: bool = False,
) -> Decision:
    """Unknown calls for query cells at false discovery rate ``fdr`` (or per cell at ``false_unknown``).

    Parameters
    ----------
    scores
        Raw novelty scores of the query cells (higher = more novel), by name.
    calibration
        The same scores of held-out reference cells.
    names
        The scores to combine.
    fdr
        Target false discovery rate of the Unknown calls, in (0, 1); 0 calls nothing Unknown.
    calibration_statistics
        :func:`calibration_statistic` of the calibration cells, if already computed.
    shift
        Correct a global shift of the query (step 3 of the module docs): one of
        :data:`SHIFT_MODES` (``"scale"``: location and scale), optionally ``"MODE@matched"``.
    null_cells
        Query cells with a reference counterpart (:attr:`spikgpt.mapping.Mapping.matched`),
        on which an ``@matched`` shift is estimated (see :func:`shift_correction`); all cells
        when ``None`` or without ``@matched``.
    false_unknown
        When set, ``fdr`` is not used: each cell is ``Unknown`` iff its p-value is at most
        ``false_unknown`` (in [0, 1)), which bounds the share of known cells called Unknown.
    groups
        The predicted type of every query cell, for ``shift="gated_by_type"``.
    positions
        ``[(query, calibration), …]``: positions of the query cells and of the calibration cells
        in the (mapped, standardised) embedding — one pair for a held-out model, one per fold
        model for a cross-fitted one (each fold's own held-out cells in its own embedding). Then
        each cell is also tested through its neighbourhood (:func:`fold_neighbourhood_pvalues`;
        where :func:`neighbourhoods_tested`: every fold of at least 21 positions, queries of more
        than :data:`NEIGHBOURS` and at most :data:`MAX_NEIGHBOURHOOD_CELLS` cells); its two
        p-values are merged by Simes, ``min(2 · min(p, p_nb), max(p, p_nb))`` (0.23; until 0.22
        Bonferroni, twice the smaller), valid for positively dependent p-values — two measures
        of the same novelty — and never above Bonferroni's; ``reason`` is ``"neighbourhood"``
        where the neighbourhood's was the smaller.
    withhold_under_shift
        Call no cell Unknown where the shift correction ran (the query judged shifted as a
        whole); p- and q-values are kept and :attr:`Decision.withheld` counts the calls not
        made. Cross-fitted models decide so where their folds are too small for the
        neighbourhood test (:meth:`spikgpt.model.SpikGPTModel.decide_unknown`): with their calibration the
        correction called up to 20–31 % of a shifted query's known cells Unknown
        (``benchmarks/cross_conformal.py``).
    untested
        Cells not to test (boolean mask): those predicted as a type no calibration cell
        represents. They count in the shift correction as every cell does, then get p-value 1
        and reason ``"uncalibrated_type"``. Chosen on 100-cell references, where pbmc68k's 2- and
        4-cell types were 8 of 12 false calls (``benchmarks/cross_conformal.py``).
    progress
        Show a progress bar over the neighbourhood test's folds.

    Returns
    -------
    :class:`Decision`.
    """
    check_fdr(fdr)
    if false_unknown is not None:
        check_false_unknown(false_unknown)
    stat, reason = combined_statistic(scores, calibration, names)
    if calibration_statistics is None:
        calibration_statistics = calibration_statistic(calibration, names)
    L = neglog_pvalues(stat, calibration_statistics)
    mode, on_matched = parse_shift(shift)
    L, info = shift_correction(L, mode, null_cells if on_matched else None, groups)
    p = np.exp(-L)
    smallest = smallest_pvalue(calibration, names, calibration_statistics)
    untested = None if untested is None or not untested.any() else np.asarray(untested, dtype=bool)
    if positions is not None and neighbourhoods_tested([len(cal) for _, cal in positions], len(L)):
        merged, p_nb = neighbourhood_test(L, positions, untested, progress=progress)
        reason = np.where(p_nb < p, "neighbourhood", reason).astype(object)
        p = merged
        smallest = 0.0  # the neighbourhood null's tails have no floor
    if untested is not None:
        p = np.where(untested, 1.0, p)
        reason = np.where(untested, "uncalibrated_type", reason).astype(object)
    q = adaptive_qvalues(p)  # ties at p = 0 (beyond float range) are all rejected together, as they should
    unknown = (q <= fdr) & (fdr > 0) if false_unknown is None else (p <= false_unknown) & (false_unknown > 0)
    withheld = int(unknown.sum()) if withhold_under_shift and info["location"] > 0 else 0
    return Decision(p, q, unknown & (withheld == 0), reason, info, smallest, withheld)


def parse_shift(shift: str) -> tuple[str, bool]:
    """``(mode, on_matched)`` of a shift setting ``"MODE"`` or ``"MODE@matched"``; ``ValueError`` if invalid.

    ``MODE`` is one of :data:`SHIFT_MODES`; ``@matched`` estimates the shift on the query cells
    that have a mutual-nearest-neighbour counterpart in the reference (known types).
    """
    mode, at, where = shift.partition("@")
    if mode not in SHIFT_MODES or (at and where != "matched"):
        msg = f"shift must be one of {SHIFT_MODES}, optionally with '@matched' (e.g. 'scale@matched'), got {shift!r}."
        raise ValueError(msg)
    return mode, where == "matched"


def check_shift(shift: str) -> str:
    """``shift`` itself; ``ValueError`` unless :func:`parse_shift` accepts it."""
    parse_shift(shift)
    return shift


def check_fdr(fdr: float) -> None:
    """Raise ``ValueError`` unless ``fdr`` is in [0, 1)."""
    if not 0 <= fdr < 1:
        msg = f"fdr must be in [0, 1) (the share of Unknown calls allowed to be known cells, e.g. 0.1), got {fdr}."
        raise ValueError(msg)


def check_false_unknown(level: float) -> None:
    """Raise ``ValueError`` unless ``level`` is in [0, 1)."""
    if not 0 <= level < 1:
        msg = (
            "false_unknown must be in [0, 1) (the share of known cells allowed to be called Unknown, "
            f"e.g. 0.01), got {level}."
        )
        raise ValueError(msg)


def reject(raw_labels: np.ndarray, unknown: np.ndarray) -> np.ndarray:
    """``raw_labels`` with ``Unknown`` where ``unknown`` is true (a new array)."""
    labels = np.asarray(raw_labels, dtype=object).copy()
    labels[np.asarray(unknown, dtype=bool)] = UNKNOWN
    return labels
