"""Measured, not adopted (0.25): the query cells' neighbourhoods from fold 0's positions for every fold.

Runs ``benchmarks/cross_conformal.py`` with :func:`spikgpt.openset.decision.fold_neighbourhood_pvalues`
replaced: the query cells' neighbourhood statistic is computed once, from the first fold model's
positions, and tested against each fold's own null (its held-out cells among the query cells in
its embedding). Same arguments as ``cross_conformal.py``, e.g.::

    python benchmarks/results/cross_conformal_shared_graph/patch.py --reference-cells 250 \
        --open-seeds 0 --closed-seeds 0 1 2 --cache CACHE --out OUT --draw-seed 2 \
        --rules "cross-conformal one fold · fold neighbourhoods · Simes · guard"
"""

import sys
from pathlib import Path

import numpy as np
from sklearn.neighbors import NearestNeighbors

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cross_conformal
import neighbourhood_null

import spikgpt.openset.decision as decision


def neighbourhood_means(neglog_p, query, around=None, m=decision.NEIGHBOURS):
    """Mean ``−log p`` of the ``m`` nearest query cells of each of ``around`` (``None``: each cell's others)."""
    nn = NearestNeighbors(n_neighbors=m, algorithm="brute").fit(query)
    return neglog_p[nn.kneighbors(around, return_distance=False)].mean(axis=1)


def shared_graph_pvalues(neglog_p, positions, m=decision.NEIGHBOURS, *, progress=False):
    """The weighted mean over folds, each fold's null against one shared query statistic."""
    sizes = np.array([len(cal) for _, cal in positions], dtype=np.float64)
    around_query = neighbourhood_means(neglog_p, positions[0][0], m=m)
    per_fold = [
        np.exp(-decision.neglog_pvalues(around_query, neighbourhood_means(neglog_p, q, cal, m))) for q, cal in positions
    ]
    return np.average(np.stack(per_fold), axis=0, weights=sizes)


if __name__ == "__main__":
    decision.fold_neighbourhood_pvalues = shared_graph_pvalues
    neighbourhood_null.fold_neighbourhood_pvalues = shared_graph_pvalues
    cross_conformal.main()
