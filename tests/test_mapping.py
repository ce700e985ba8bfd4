"""Mutual nearest neighbours and the query → reference translation."""

import numpy as np
from sklearn.neighbors import NearestNeighbors

from spikgpt.mapping import estimate_mapping, mutual_pairs


def _pairs_by_knn_search(query, reference, k):
    """Mutual pairs from two scikit-learn kNN searches (0.24's implementation)."""
    to_ref = NearestNeighbors(n_neighbors=min(k, len(reference))).fit(reference).kneighbors(query)[1]
    to_query = NearestNeighbors(n_neighbors=min(k, len(query))).fit(query).kneighbors(reference)[1]
    return {(i, j) for i in range(len(query)) for j in to_ref[i] if i in to_query[j]}


def test_mutual_pairs_are_those_of_two_knn_searches():
    rng = np.random.default_rng(0)
    for n, m, k in [(300, 200, 20), (15, 200, 20), (200, 8, 20), (50, 60, 1)]:
        query = rng.normal(size=(n, 12))
        reference = (rng.normal(size=(m, 12)) + 0.5).astype(np.float32)
        iq, jr = mutual_pairs(query, reference, k)
        assert set(zip(iq.tolist(), jr.tolist(), strict=True)) == _pairs_by_knn_search(query, reference, k)


def test_duplicated_query_cells_are_paired_alike():
    """A tie at a reference cell's k-th nearest query cell keeps every tied cell, whatever the order."""
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(40, 5))
    query = np.repeat(rng.normal(size=(30, 5)), 2, axis=0)  # every cell twice
    iq, jr = mutual_pairs(query, reference, k=5)
    pairs = set(zip(iq.tolist(), jr.tolist(), strict=True))
    for i, j in pairs:
        twin = i + 1 if i % 2 == 0 else i - 1
        assert (twin, j) in pairs


def test_estimate_mapping_recovers_a_translation():
    rng = np.random.default_rng(2)
    centres = rng.normal(scale=6, size=(4, 10))
    reference = centres[rng.integers(4, size=800)] + rng.normal(size=(800, 10))
    offset = rng.normal(size=10)
    query = centres[rng.integers(4, size=600)] + rng.normal(size=(600, 10)) + offset
    mapped = estimate_mapping(query, reference)
    assert np.linalg.norm(mapped.shift - offset) < 0.2 * np.linalg.norm(offset)
    assert mapped.matched.mean() > 0.5
