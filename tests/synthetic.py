from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from spikgpt.model import TrainConfig

#: Small files the tests need, shipped in the repository (see each folder's README).
DATA = __import__("pathlib").Path(__file__).resolve().parent / "data"
SCGPT_FIXTURE = DATA / "scgpt_tiny"

#: Short training for tests: the point is the plumbing, not the last percent. One network, not
#: the default ensemble of three: the ``trained`` fixture and the real-data tests train ensembles.
FAST = TrainConfig(lr=5e-3, max_epochs=40, patience=10, members=1)


def synthetic_counts(
    n_per_type: dict[str, int],
    n_genes: int = 120,
    markers: int = 8,
    seed: int = 0,
    extra_types: dict[str, int] | None = None,
) -> ad.AnnData:
    """Poisson counts; each type over-expresses its own block of marker genes."""
    rng = np.random.default_rng(seed)
    types = list(n_per_type) + list(extra_types or {})
    sizes = {**n_per_type, **(extra_types or {})}
    rows, labels = [], []
    base = np.random.default_rng(12345).gamma(2.0, 1.0, n_genes)  # shared by every seed
    for t_i, t in enumerate(types):
        mu = base.copy()
        mu[t_i * markers : (t_i + 1) * markers] *= 12
        depth = rng.uniform(0.7, 1.3, (sizes[t], 1))
        rows.append(rng.poisson(mu * depth))
        labels += [t] * sizes[t]
    X = sp.csr_matrix(np.vstack(rows).astype(np.float32))
    adata = ad.AnnData(X)
    adata.var_names = [f"GENE{i}" for i in range(n_genes)]
    adata.obs_names = [f"cell{i}" for i in range(adata.n_obs)]
    adata.obs["cell_type"] = pd.Categorical(labels)
    return adata
