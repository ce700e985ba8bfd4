import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spikgpt.data import Cells, align, prepare, read, write_h5ad_atomic
from spikgpt.errors import GeneOverlapError, InputError


def test_counts_and_log_normalised_come_out_on_one_scale(counts):
    log = counts.copy()
    totals = np.asarray(log.X.sum(1)).ravel()
    log.X = sp.csr_matrix(np.log1p(sp.diags(1e4 / totals) @ log.X))  # scanpy's usual log-normalisation
    a, b = prepare(counts), prepare(log)
    assert a.scale == "counts" and b.scale == "log1p"
    np.testing.assert_allclose(a.X.toarray(), b.X.toarray(), atol=1e-4)
    np.testing.assert_allclose(np.expm1(a.X.toarray()).sum(1), 1e4, rtol=1e-4)


def test_sources_layer_raw_and_gene_column(counts):
    adata = counts.copy()
    adata.layers["counts"] = adata.X.copy()
    adata.raw = adata
    adata.X = sp.csr_matrix(adata.X.toarray() - 1.0)  # "scaled": negative values
    adata.var["symbol"] = [f"sym{i}" for i in range(adata.n_vars)]
    with pytest.raises(InputError, match="negative values.*use_raw"):
        prepare(adata)
    a = prepare(adata, layer="counts", gene_key="symbol")
    b = prepare(adata, use_raw=True)
    np.testing.assert_allclose(a.X.toarray(), b.X.toarray())
    assert a.genes[0] == "SYM0" and b.genes[0] == "GENE0"
    with pytest.raises(InputError, match="Layer 'nope' not found"):
        prepare(adata, layer="nope")
    with pytest.raises(InputError, match="Gene column 'nope'"):
        prepare(adata, gene_key="nope")


def test_empty_nan_inf(counts):
    with pytest.raises(InputError, match="empty"):
        prepare(counts[:0])
    for bad in (np.nan, np.inf):
        adata = counts.copy()
        adata.X = adata.X.toarray()
        adata.X[0, 0] = bad
        with pytest.raises(InputError, match="NaN/inf"):
            prepare(adata)


def test_duplicate_genes_warn_and_keep_first(counts, caplog):
    adata = counts.copy()
    names = adata.var_names.to_numpy().copy()
    names[1] = names[0]
    adata.var_names = names
    with caplog.at_level(logging.WARNING, logger="spikgpt"):
        expr = prepare(adata)
    assert "duplicate gene names" in caplog.text
    assert len(expr.genes) == adata.n_vars - 1


def test_case_insensitive_gene_matching_and_overlap(counts):
    lower = counts.copy()
    lower.var_names = [g.lower() for g in counts.var_names]
    X, present = align(prepare(lower), prepare(counts).genes)
    assert present.all()
    other = counts.copy()
    other.var_names = [f"ENSG{i:011d}" for i in range(counts.n_vars)]
    with pytest.raises(GeneOverlapError, match=r"Only 0 of 120 model genes \(0%\).*gene_key"):
        align(prepare(other), prepare(counts).genes)


def test_align_reorders_and_zero_fills(counts):
    expr = prepare(counts)
    genes = np.array(["GENE5", "MISSING", "GENE0"] + [f"GENE{i}" for i in range(6, 20)])
    X, present = align(expr, genes)
    assert present.tolist()[:3] == [True, False, True]
    dense = expr.X.toarray()
    expected = np.column_stack([dense[:, 5], np.zeros(len(dense)), dense[:, 0], dense[:, 6:20]])
    np.testing.assert_array_equal(X.toarray(), expected)
    assert X[:, 1].nnz == 0 and (X.data != 0).all()  # no stored values for the missing gene


@pytest.mark.parametrize("log_input", [False, True])
def test_duplicate_sparse_entries_are_summed(counts, log_input):
    import scipy.sparse as sp

    if log_input:
        counts = counts.copy()
        counts.X = sp.csr_matrix(counts.X, dtype=np.float32)
        counts.X.data = np.log1p(counts.X.data)  # log scale: kept as it is, so not summed by normalising
    X = sp.csr_matrix(counts.X)
    split = X.data > 0  # each entry stored twice, (v − h) and h with h a whole half count
    half = np.floor(X.data / 2) if not log_input else X.data / 2
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    order = np.argsort(np.r_[rows, rows[split]], kind="stable")
    doubled = counts.copy()
    doubled.X = sp.csr_matrix(
        (
            np.r_[X.data - half, half[split]][order].astype(np.float32),
            np.r_[X.indices, X.indices[split]][order],
            np.r_[0, np.cumsum(np.bincount(np.r_[rows, rows[split]], minlength=X.shape[0]))],
        ),
        shape=X.shape,
    )
    assert doubled.X.nnz > X.nnz
    before = doubled.X.copy()
    prepared = prepare(doubled).X
    assert prepared.nnz == prepare(counts).X.nnz  # no duplicate left
    np.testing.assert_allclose(prepared.toarray(), prepare(counts).X.toarray(), rtol=1e-6)
    assert doubled.X.nnz == before.nnz and (doubled.X.data == before.data).all()  # the input untouched


def test_read_rejects_wrong_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read(tmp_path / "nope.h5ad")
    csv = tmp_path / "cells.csv"
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="not an .h5ad file"):
        read(csv)
    broken = tmp_path / "broken.h5ad"
    broken.write_bytes(b"not hdf5 at all")
    with pytest.raises(InputError, match="Could not read"):
        read(broken)


def test_prepare_does_not_modify_input(counts):
    before = counts.X.copy()
    Cells(counts).expression()
    assert (counts.X != before).nnz == 0


def test_atomic_write_refuses_to_clobber(counts, tmp_path):
    path = write_h5ad_atomic(counts, tmp_path / "a.h5ad", overwrite=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_h5ad_atomic(counts, path, overwrite=False)
    write_h5ad_atomic(counts[:5], path, overwrite=True)
    assert ad.read_h5ad(path).n_obs == 5
    assert [p.name for p in tmp_path.iterdir()] == ["a.h5ad"]  # no temp files left


def test_atomic_write_takes_pandas_3_strings(counts, tmp_path):
    """pandas >= 3 keeps text in string arrays, which anndata writes only when asked to."""
    labels = counts.obs["cell_type"].astype(str).to_list()
    with pd.option_context("future.infer_string", True), ad.settings.override(allow_write_nullable_strings=False):
        a = ad.AnnData(counts.X, obs=pd.DataFrame({"label": labels}, index=[f"c{i}" for i in range(counts.n_obs)]))
        assert isinstance(a.obs["label"].dtype, pd.StringDtype)
        write_h5ad_atomic(a, tmp_path / "s.h5ad", overwrite=False)
    assert ad.read_h5ad(tmp_path / "s.h5ad").obs["label"].astype(str).to_list() == labels


def _cp10k(counts):
    totals = np.asarray(counts.X.sum(1)).ravel()
    return sp.diags(1e4 / totals) @ counts.X


@pytest.mark.parametrize(
    ("name", "make", "scale"),
    [
        ("ambient-corrected counts", lambda c: c.X.multiply(0.93), "linear"),
        ("counts per 10,000, no log", _cp10k, "linear"),
        ("log1p of counts per million", lambda c: np.log1p(_cp10k(c).toarray() * 100), "log1p"),
        ("log2(x + 1) of counts per 10,000", lambda c: np.log2(1 + _cp10k(c).toarray()), "log2"),
    ],
)
def test_wrong_scale_inputs_are_detected_and_converted(counts, name, make, scale):
    """Each scale a user may hand in is named and brought to log1p CP10k, like raw counts."""
    expected = prepare(counts).X.toarray()
    other = counts.copy()
    other.X = sp.csr_matrix(make(counts), dtype=np.float32)
    expr = prepare(other)
    assert expr.scale == scale, name
    np.testing.assert_allclose(expr.X.toarray(), expected, atol=1e-4)


def test_log_panel_without_constant_totals_is_kept(counts):
    """A log-scale gene panel (totals differ per cell) cannot be checked: kept, as before."""
    panel = counts[:, :40].copy()
    panel.X = sp.csr_matrix(np.log1p(_cp10k(counts)[:, :40].toarray()), dtype=np.float32)
    expr = prepare(panel)
    assert expr.scale == "log"
    np.testing.assert_allclose(expr.X.toarray(), panel.X.toarray())


def test_backed_anndata_reads(counts, tmp_path):
    counts.write_h5ad(tmp_path / "c.h5ad")
    backed = ad.read_h5ad(tmp_path / "c.h5ad", backed="r")
    np.testing.assert_allclose(prepare(backed).X.toarray(), prepare(counts).X.toarray())


def test_output_permissions_follow_umask(counts, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        write_h5ad_atomic(counts, tmp_path / "o.h5ad", overwrite=False)
    finally:
        os.umask(old)
    assert (tmp_path / "o.h5ad").stat().st_mode & 0o777 == 0o644


def test_gene_id_mismatch_names_both_sides(counts):
    ens = counts.copy()
    ens.var_names = [f"ENSG{i:011d}" for i in range(ens.n_vars)]
    with pytest.raises(GeneOverlapError, match="model's genes are gene symbols.*input's are Ensembl IDs"):
        align(prepare(ens), prepare(counts).genes)
    with pytest.raises(GeneOverlapError, match="model's genes are Ensembl IDs.*input's are gene symbols"):
        align(prepare(counts), prepare(ens).genes)
