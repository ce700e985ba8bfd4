import anndata as ad
import numpy as np
import scipy.sparse as sp

from spikgpt.bench.peer_io import log1p_cp10k


def test_log1p_cp10k_takes_counts_or_log_values_to_the_same_genes_by_cells():
    counts = sp.csr_matrix(np.array([[1.0, 3.0, 0.0], [2.0, 0.0, 2.0]]))
    a = ad.AnnData(counts)
    a.obs["cell_type"] = ["x", "y"]
    before = a.X.copy()
    out = log1p_cp10k(a, use_raw=False)
    assert out.shape == (2, 3) and list(out.var_names) == list(a.var_names) and (a.X != before).nnz == 0
    assert list(out.obs["cell_type"]) == ["x", "y"]
    np.testing.assert_allclose(out.X.toarray()[0], np.log1p([2500.0, 7500.0, 0.0]), rtol=1e-6)
    logged = ad.AnnData(np.log1p(counts.toarray()))
    np.testing.assert_allclose(log1p_cp10k(logged, use_raw=False).X.toarray(), out.X.toarray(), rtol=1e-5)
