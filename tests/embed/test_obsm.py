import numpy as np
import pytest

from spikgpt.data import Cells
from spikgpt.embed import make_embedder
from spikgpt.errors import InputError


def test_obsm_embedder(counts):
    adata = counts.copy()
    adata.obsm["X_emb"] = np.random.default_rng(0).normal(size=(adata.n_obs, 12))
    emb = make_embedder("obsm:X_emb").fit(Cells(adata))
    assert emb.dim == 12 and emb.spec == "obsm:X_emb"
    assert emb.transform(Cells(adata)).dtype == np.float32
    with pytest.raises(InputError, match="obsm\\['X_other'\\] not found"):
        make_embedder("obsm:X_other").fit(Cells(adata))
    adata.obsm["X_emb"] = adata.obsm["X_emb"][:, :5]
    with pytest.raises(InputError, match="has 5 dimensions but the model was trained on 12"):
        emb.transform(Cells(adata))
    adata.obsm["X_emb"][1, :] = np.nan  # a cell its embedder could not embed: allowed
    assert np.isnan(make_embedder("obsm:X_emb").fit(Cells(adata)).transform(Cells(adata))[1]).all()
    adata.obsm["X_emb"][0, 0] = np.inf
    with pytest.raises(InputError, match="inf or partly-NaN rows \\(1 cells\\)"):
        make_embedder("obsm:X_emb").fit(Cells(adata))
