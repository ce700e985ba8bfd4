"""Mapping the query onto the reference before classification and novelty scoring.

A batch, protocol or condition effect that adds a gene-specific offset to log expression moves
every cell by the same vector after a linear embedder (the default HVG → scaling → PCA). spikgpt
estimates that vector from **mutual nearest neighbours** between query and reference cells
(seeded samples of at most 2,000 each)
(Haghverdi et al. 2018): a query cell and a reference cell that are each among the other's
``k`` nearest are taken to be the same kind of cell, and the median of their differences is the
shift. It is re-estimated after moving the query (a few rounds, as in iterative closest point)
because under a strong shift the first pairs are the facing edges of the two clouds.

Why a single translation and not a per-cell correction: it cannot align a new cell type away
(every query cell moves by the same vector, so a group that is far from every reference type
stays far), and it needs nothing from the reference but the sample of reference embeddings the
model already stores for novelty scoring. Cell types absent from the query do not bias it
(pairs form only where both sides have cells).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Neighbours searched on each side for mutual pairs.
K_MUTUAL = 20
#: Rounds of re-estimation.
ROUNDS = 5
#: Query and reference cells used to estimate the shift (seeded samples beyond this): the cost
#: is then fixed (measured ~1 s), whatever the query size.
MAX_QUERY_CELLS = 2000
MAX_REFERENCE_CELLS = 2000


@dataclass
class Mapping:
    """A translation of the standardised embedding, from the query towards the reference."""

    shift: np.ndarray  # [d] subtracted from every query cell
    n_pairs: int  # mutual pairs in the last round
    rounds: int
    matched: np.ndarray  # [n] bool: query cells in a mutual pair in the last round (False where not sampled)
    #: Each fold model's own mapping of the same query (cross-fitted models, :meth:`spikgpt.SpikGPTModel.map_query`).
    folds: tuple[Mapping | None, ...] = ()

    @property
    def norm(self) -> float:
        """Length of the shift (standardised-embedding units)."""
        return float(np.linalg.norm(self.shift))


def _ranking_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[len(a), len(b)]`` squared Euclidean distances less each row's constant ``|a_i|²``.

    They rank every row's neighbours in ``b`` as the distances do, from one matrix product
    (``[a, 1] · [-2b, |b|²]ᵀ``) with no pass over the result.
    """
    ones = np.ones((len(a), 1))
    return np.hstack([a, ones]) @ np.hstack([-2.0 * b, (b.astype(np.float64) ** 2).sum(axis=1, keepdims=True)]).T


def mutual_pairs(query: np.ndarray, reference: np.ndarray, k: int = K_MUTUAL) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)`` where query cell ``i`` and reference cell ``j`` are mutual k-nearest neighbours.

    Exact (brute-force) neighbours; where distances tie at a reference cell's ``k``-th nearest
    query cell, every tied query cell counts as within its ``k``. Holds two dense
    ``[len(query), len(reference)]`` matrices: meant for :func:`estimate_mapping`'s samples
    (≤ 2,000 cells each, 64 MB).
    """
    kq, kr = min(k, len(reference)), min(k, len(query))
    to_ref = np.argpartition(_ranking_distances(query, reference), kq - 1, axis=1)[:, :kq]
    from_ref = _ranking_distances(reference, query)
    # reference cell j's kr-th nearest query cell: query cell i is among its kr nearest iff no farther
    reach = np.partition(from_ref, kr - 1, axis=1)[:, kr - 1]
    iq = np.repeat(np.arange(len(query)), kq)
    jr = to_ref.ravel()
    back = from_ref[jr, iq] <= reach[jr]
    return iq[back], jr[back]


def _draw(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.sort(rng.choice(n, MAX_QUERY_CELLS, replace=False)) if n > MAX_QUERY_CELLS else np.arange(n)


def query_sample(n: int, seed: int = 0) -> np.ndarray:
    """The rows of an ``n``-cell query that :func:`estimate_mapping` uses (all up to :data:`MAX_QUERY_CELLS`)."""
    return _draw(np.random.default_rng(seed), n)


def estimate_mapping(
    query: np.ndarray,
    reference: np.ndarray,
    *,
    k: int = K_MUTUAL,
    rounds: int = ROUNDS,
    seed: int = 0,
    n_query: int | None = None,
) -> Mapping:
    """Estimate the translation that brings ``query`` onto ``reference``.

    Parameters
    ----------
    query
        ``[n, d]`` standardised embedding of the query cells.
    reference
        ``[m, d]`` standardised embedding of reference cells (the model's stored sample).
    k
        Neighbours on each side for mutual pairs.
    rounds
        Re-estimation rounds (stops early once the update is below 1 % of the shift).
    seed
        Seed of the query and reference samples (beyond :data:`MAX_QUERY_CELLS` /
        :data:`MAX_REFERENCE_CELLS` cells).
    n_query
        The query's size when ``query`` holds only the rows ``query_sample(n_query, seed)`` (a
        query streamed from disk); the result is then the one the whole query would give.

    Returns
    -------
    The :class:`Mapping`; a zero shift when fewer than 2 query or reference cells are given.
    ``matched`` marks the query cells that have a reference counterpart (a mutual pair):
    they are known types (up to the edges of a new one), which the Unknown decision uses to
    estimate how far known query cells are shifted.
    """
    n, d = query.shape
    n_all = n if n_query is None else n_query
    matched = np.zeros(n_all, dtype=bool)
    if n < 2 or len(reference) < 2:
        return Mapping(np.zeros(d, np.float32), 0, 0, matched)
    rng = np.random.default_rng(seed)
    rows = _draw(rng, n_all)
    if n_query is None:
        query = query[rows]
    elif len(rows) != n:
        msg = f"query holds {n} cells; query_sample({n_query}) has {len(rows)}."
        raise ValueError(msg)
    if len(reference) > MAX_REFERENCE_CELLS:
        reference = reference[np.sort(rng.choice(len(reference), MAX_REFERENCE_CELLS, replace=False))]
    shift = np.zeros(d)
    n_pairs, done, iq = 0, 0, np.zeros(0, dtype=int)
    for _ in range(rounds):
        done += 1
        iq, jr = mutual_pairs(query - shift, reference, k)
        n_pairs = len(iq)
        if n_pairs == 0:
            break
        step = np.median((query - shift)[iq] - reference[jr], axis=0)
        shift = shift + step
        if np.linalg.norm(step) <= 0.01 * max(np.linalg.norm(shift), 1e-12):
            break
    matched[rows[iq]] = True
    return Mapping(shift.astype(np.float32), int(n_pairs), done, matched)
