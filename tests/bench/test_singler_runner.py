import anndata as ad
import numpy as np
import scipy.sparse as sp

from spikgpt.bench.singler_runner import log1p_cp10k, pruned


def test_prune_scores_flags_low_delta_per_label():
    labels = np.array(["A"] * 50 + ["B"] * 50)
    delta = np.r_[np.linspace(0.9, 1.1, 50), np.linspace(0.18, 0.22, 50)]  # MAD 0.05 and 0.01
    delta[3], delta[60] = 0.5, 0.1  # far below their own label's deltas
    out = pruned(labels, delta)
    assert out[3] and out[60] and out.sum() == 2  # 0.1 is not low for A, only for B


def test_log1p_cp10k_takes_counts_or_log_values_to_the_same_genes_by_cells():
    counts = sp.csr_matrix(np.array([[1.0, 3.0, 0.0], [2.0, 0.0, 2.0]]))
    a = ad.AnnData(counts)
    X, genes = log1p_cp10k(a, use_raw=False)
    assert X.shape == (3, 2) and genes == list(a.var_names)
    np.testing.assert_allclose(X[:, 0], np.log1p([2500.0, 7500.0, 0.0]))
    logged = ad.AnnData(np.log1p(counts.toarray()))
    np.testing.assert_allclose(log1p_cp10k(logged, use_raw=False)[0], X, rtol=1e-6)
