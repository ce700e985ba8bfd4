"""Input of the peers' runner scripts: imports only anndata, numpy, pandas and scipy.

Each peer runs in its own virtual environment without spikgpt; its runner script imports this
file from beside it (``from peer_io import …``), and the package imports it as
``spikgpt.bench.peer_io``.
"""

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def log1p_cp10k(a: ad.AnnData, use_raw: bool) -> ad.AnnData:
    """Cells × genes (CSR, float32) log1p counts per 10,000 of ``a`` (or ``a.raw``), ``obs`` kept.

    Log values are turned back into counts first (``expm1``), as the peers expect counts-derived
    log1p CP10K over all genes.
    """
    X = sp.csr_matrix(a.raw.X if use_raw else a.X, dtype=np.float32, copy=True)
    names = a.raw.var_names if use_raw else a.var_names
    if not np.all(X.data == np.round(X.data)):
        X.data = np.expm1(X.data)
    totals = np.asarray(X.sum(axis=1)).ravel()
    X = sp.diags((1e4 / np.maximum(totals, 1e-12)).astype(np.float32)) @ X
    X.data = np.log1p(X.data)
    return ad.AnnData(X.tocsr(), obs=a.obs.copy(), var=pd.DataFrame(index=names))
