"""Chunked annotation of .h5ad files gives the in-memory results."""

import hashlib

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from synthetic import FAST, synthetic_counts

import spikgpt
from spikgpt import api as api_module
from spikgpt import mapping
from spikgpt.errors import InputError
from spikgpt.streaming import annotate_file

COLS = ["spikgpt_label", "spikgpt_raw_label", "spikgpt_unknown_reason"]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_same(streamed: ad.AnnData, memory: ad.AnnData):
    for c in COLS:
        assert (streamed.obs[c].astype(str) == memory.obs[c].astype(str)).all(), c
    for c in ["spikgpt_pvalue", "spikgpt_qvalue"]:
        np.testing.assert_allclose(streamed.obs[c], memory.obs[c], rtol=1e-5, atol=1e-6)
    # A cell's probabilities can move by a spike when it is classified in a batch of another size
    # (the CPU's matrix kernels sum in another order; measured 0.006 on one cell, AMD EPYC).
    np.testing.assert_allclose(streamed.obs["spikgpt_confidence"], memory.obs["spikgpt_confidence"], atol=0.02)
    np.testing.assert_allclose(
        streamed.obsm["X_spikgpt_embedding"], memory.obsm["X_spikgpt_embedding"], rtol=1e-5, atol=1e-5
    )
    assert streamed.uns["spikgpt"]["n_unknown"] == memory.uns["spikgpt"]["n_unknown"]


@pytest.mark.parametrize("dense", [False, True])
def test_chunks_equal_memory_and_input_untouched(trained, tmp_path, monkeypatch, dense):
    monkeypatch.setattr(mapping, "MAX_QUERY_CELLS", 60)  # the mapping sample is drawn from the file
    query = synthetic_counts({"A": 50, "B": 50, "C": 30}, seed=7, extra_types={"new": 25})
    query.obs["donor"] = "d1"
    if dense:
        query.X = query.X.toarray()
    src = tmp_path / "q.h5ad"
    query.write_h5ad(src)
    before = _sha(src)
    cols = annotate_file(src, trained, tmp_path / "out.h5ad", chunk_size=37, progress=False)
    assert _sha(src) == before
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    memory = spikgpt.annotate(query, trained, copy=True, progress=False)
    _assert_same(out, memory)
    assert (out.obs["donor"] == "d1").all() and (cols["spikgpt_label"].to_numpy() == out.obs["spikgpt_label"]).all()
    assert out.uns["spikgpt"]["mapping"]["applied"]
    assert out.obs.loc[query.obs["cell_type"] == "new", "spikgpt_label"].eq("Unknown").mean() > 0.5
    np.testing.assert_array_equal(
        out.X.toarray() if sp.issparse(out.X) else out.X,
        np.asarray(query.X.todense() if sp.issparse(query.X) else query.X),
    )


def test_a_shifted_query_is_corrected_type_by_type_in_chunks_as_in_memory(trained, tmp_path):
    """The chunked path hands the predicted types to the Unknown decision as the in-memory one does."""
    query = synthetic_counts({"A": 50, "B": 50, "C": 30}, seed=7, extra_types={"new": 25})
    factors = np.random.default_rng(9).lognormal(0.0, 0.8, query.n_vars)  # gene-specific batch effect
    query.X = sp.csr_matrix(np.round(query.X.toarray() * factors), dtype=np.float32)
    query.write_h5ad(tmp_path / "q.h5ad")
    annotate_file(tmp_path / "q.h5ad", trained, tmp_path / "out.h5ad", chunk_size=37, progress=False)
    memory = spikgpt.annotate(query, trained, copy=True, progress=False)
    assert memory.uns["spikgpt"]["global_shift_removed"]["types_corrected"] == 3  # measured: the gate fires
    _assert_same(ad.read_h5ad(tmp_path / "out.h5ad"), memory)
    streamed = ad.read_h5ad(tmp_path / "out.h5ad").uns["spikgpt"]["global_shift_removed"]
    assert streamed["types_corrected"] == 3


def test_pandas_3_strings_are_written(trained, tmp_path):
    """With pandas >= 3 text columns are string arrays: the annotated copy must still be written."""
    query = synthetic_counts({"A": 30, "B": 30}, seed=7)
    src = tmp_path / "q.h5ad"
    with pd.option_context("future.infer_string", True):
        query.obs = pd.DataFrame({"donor": ["d1"] * query.n_obs}, index=[f"c{i}" for i in range(query.n_obs)])
        query.write_h5ad(src)
        with ad.settings.override(allow_write_nullable_strings=False):
            annotate_file(src, trained, tmp_path / "out.h5ad", chunk_size=25, progress=False)
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert out.obs["spikgpt_raw_label"].isin(["A", "B", "C"]).mean() > 0.9 and (out.obs["donor"] == "d1").all()


def test_raw_source_on_real_data(pbmc, pbmc_model, tmp_path):
    src = tmp_path / "pbmc.h5ad"
    pbmc.write_h5ad(src)
    annotate_file(src, pbmc_model, tmp_path / "out.h5ad", use_raw=True, chunk_size=100, progress=False)
    _assert_same(
        ad.read_h5ad(tmp_path / "out.h5ad"), spikgpt.annotate(pbmc, pbmc_model, use_raw=True, copy=True, progress=False)
    )


def test_bad_inputs(trained, tmp_path):
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not hdf5")
    with pytest.raises(InputError, match="Could not read"):
        annotate_file(bad, trained, tmp_path / "o.h5ad", progress=False)
    good = tmp_path / "q.h5ad"
    synthetic_counts({"A": 5}).write_h5ad(good)
    with pytest.raises(InputError, match="no layers/counts"):
        annotate_file(good, trained, tmp_path / "o.h5ad", layer="counts", progress=False)
    with pytest.raises(ValueError, match="chunk_size"):
        annotate_file(good, trained, tmp_path / "o.h5ad", chunk_size=0, progress=False)
    assert not (tmp_path / "o.h5ad").exists()


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_store_and_in_place_overwrite(trained, tmp_path, monkeypatch, zarr_format):
    monkeypatch.setattr(mapping, "MAX_QUERY_CELLS", 50)  # rows drawn from the store
    query = synthetic_counts({"A": 40, "B": 40, "C": 20}, seed=3)
    if zarr_format == 3:
        query.X = query.X.toarray()  # a dense store too
    store = tmp_path / "q.zarr"
    with ad.settings.override(zarr_write_format=zarr_format):
        query.write_zarr(store)
    annotate_file(store, trained, tmp_path / "out.zarr", chunk_size=30, progress=False)
    memory = spikgpt.annotate(query, trained, copy=True, progress=False)
    _assert_same(ad.read_zarr(tmp_path / "out.zarr"), memory)
    with pytest.raises(FileExistsError, match="exists"):
        annotate_file(store, trained, tmp_path / "out.zarr", progress=False)
    (tmp_path / "plain.zarr").mkdir()
    (tmp_path / "plain.zarr" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a Zarr store"):
        annotate_file(store, trained, tmp_path / "plain.zarr", overwrite=True, progress=False)
    assert (tmp_path / "plain.zarr" / "keep.txt").read_text() == "mine"
    annotate_file(store, trained, store, overwrite=True, progress=False)  # in place, through a copy
    _assert_same(ad.read_zarr(store), memory)


def test_dask_cluster_gives_the_single_process_labels(trained, tmp_path):
    import distributed  # the [dask] extra, part of the test install

    query = synthetic_counts({"A": 60, "B": 60, "C": 40}, seed=5, extra_types={"new": 20})
    store = tmp_path / "q.zarr"
    query.write_zarr(store)
    model_dir = trained.save(tmp_path / "model")
    single = annotate_file(store, model_dir, tmp_path / "single.zarr", chunk_size=25, progress=False)
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        assert len(client.scheduler_info()["workers"]) == 2
        on_cluster = annotate_file(
            store, model_dir, tmp_path / "dask.zarr", chunk_size=25, client=client, progress=False
        )
        # a model object is saved for the workers first
        again = annotate_file(store, trained, tmp_path / "dask2.zarr", client=client, progress=False)
    for c in COLS:
        assert (single[c].astype(str) == on_cluster[c].astype(str)).all()
        assert (single[c].astype(str) == again[c].astype(str)).all()
    np.testing.assert_allclose(single["spikgpt_qvalue"], on_cluster["spikgpt_qvalue"], rtol=1e-6)
    np.testing.assert_allclose(
        ad.read_zarr(tmp_path / "single.zarr").obsm["X_spikgpt_embedding"],
        ad.read_zarr(tmp_path / "dask.zarr").obsm["X_spikgpt_embedding"],
        rtol=1e-6,
    )


def test_obsm_embedder_model_streams(tmp_path):
    ref = synthetic_counts({"A": 60, "B": 60, "C": 40}, seed=1)
    query = synthetic_counts({"A": 30, "B": 30, "C": 20}, seed=2)
    for a in (ref, query):
        a.obsm["X_emb"] = np.asarray(a.X[:, :24].todense(), dtype=np.float32)  # the marker blocks
    kw = {"embedder": "obsm:X_emb", "train_config": FAST, "calibration_folds": 1, "progress": False, "seed": 0}
    model = spikgpt.train(ref, "cell_type", **kw)
    query.write_h5ad(tmp_path / "q.h5ad")
    ref.write_h5ad(tmp_path / "r.h5ad")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api_module, "STREAM_REFERENCE_CELLS", 100)  # the reference file streams too
        streamed = spikgpt.train(tmp_path / "r.h5ad", "cell_type", **kw)
    assert streamed.embedder.spec == "obsm:X_emb"
    annotate_file(tmp_path / "q.h5ad", model, tmp_path / "o.h5ad", chunk_size=33, progress=False)
    _assert_same(ad.read_h5ad(tmp_path / "o.h5ad"), spikgpt.annotate(query, model, copy=True, progress=False))


def test_reference_file_trains_in_chunks_like_in_memory(tmp_path, monkeypatch):
    from synthetic import FAST

    import spikgpt.api
    from spikgpt import streaming

    opened = []

    def spy(*args, **kw):
        opened.append(args)
        return streaming.stored_reference(*args, **kw)

    monkeypatch.setattr(spikgpt.api, "STREAM_REFERENCE_CELLS", 100)  # stream this 160-cell file
    monkeypatch.setattr(spikgpt.api, "stored_reference", spy)
    monkeypatch.setattr(streaming, "DEFAULT_CHUNK_SIZE", 37)
    ref = synthetic_counts({"A": 60, "B": 60, "C": 40}, seed=1)
    ref.write_h5ad(tmp_path / "ref.h5ad")
    streamed = spikgpt.train(tmp_path / "ref.h5ad", "cell_type", train_config=FAST, progress=False, seed=0)
    memory = spikgpt.train(ref, "cell_type", train_config=FAST, progress=False, seed=0)
    assert len(opened) == 1  # the file path streamed, the AnnData did not
    # The embedder sees the same cells either way; the network's inputs differ in the last bits
    # (matrix products blocked by chunk), so the two trainings are alike, not bit-identical.
    np.testing.assert_array_equal(streamed.embedder.genes, memory.embedder.genes)
    np.testing.assert_allclose(streamed.embedder.components, memory.embedder.components, atol=1e-6)
    assert streamed.summary["n_cells"] == 160 and streamed.summary["n_genes"] == 120
    assert streamed.summary["calibration"]["n_cells"] == memory.summary["calibration"]["n_cells"]
    query = synthetic_counts({"A": 30, "B": 30, "C": 20}, seed=2, extra_types={"new": 15})
    a = spikgpt.annotate(query, streamed, copy=True, progress=False).obs
    b = spikgpt.annotate(query, memory, copy=True, progress=False).obs
    known = query.obs["cell_type"] != "new"
    for obs in (a, b):
        assert (obs["spikgpt_raw_label"].astype(str) == query.obs["cell_type"].astype(str))[known].mean() > 0.95
    assert (a["spikgpt_raw_label"] == b["spikgpt_raw_label"])[known].mean() > 0.95
    with pytest.raises(Exception, match="cell_typo"):
        spikgpt.train(tmp_path / "ref.h5ad", "cell_typo", train_config=FAST, progress=False)


@pytest.mark.parametrize("ext", ["h5ad", "zarr"])
@pytest.mark.parametrize("index_name", [None, "cell_id"])
def test_obs_index_reads_the_cell_names_as_the_whole_obs_would(tmp_path, ext, index_name):
    from anndata.io import read_elem

    from spikgpt.streaming import close_store, obs_index, open_store

    names = pd.Index([f"c{i}" for i in range(6)], name=index_name)
    a = ad.AnnData(np.ones((6, 2)), obs=pd.DataFrame({"t": list("aabbcc")}, index=names))
    path = tmp_path / f"a.{ext}"
    a.write_h5ad(path) if ext == "h5ad" else a.write_zarr(path)
    store = open_store(path)
    try:
        full, index = read_elem(store["obs"]).index, obs_index(store)
        assert index.equals(full) and index.name == full.name == index_name
    finally:
        close_store(store)


def test_a_cross_fitted_model_streams_as_in_memory(crossfitted, tmp_path, monkeypatch):
    """Its fold models embed, map (on the same mapping sample) and score every chunk."""
    monkeypatch.setattr(mapping, "MAX_QUERY_CELLS", 60)
    query = synthetic_counts({"A": 50, "B": 50, "C": 30}, seed=7, extra_types={"new": 25})
    query.write_h5ad(tmp_path / "q.h5ad")
    annotate_file(tmp_path / "q.h5ad", crossfitted, tmp_path / "o.h5ad", chunk_size=37, progress=False)
    memory = spikgpt.annotate(query, crossfitted, copy=True, progress=False)
    _assert_same(ad.read_h5ad(tmp_path / "o.h5ad"), memory)
    assert memory.obs["spikgpt_pvalue"].min() < 0.01  # the new cells are scored, not left at p = 1


def test_fitting_sample_returns_the_positions_it_read(tmp_path):
    from spikgpt.streaming import stored_reference

    ref = synthetic_counts({"A": 20, "B": 20}, seed=1)
    ref.write_h5ad(tmp_path / "r.h5ad")
    with stored_reference(tmp_path / "r.h5ad", layer=None, use_raw=False, gene_key=None) as (_, _, cells):
        sample, rows = cells.fitting_sample(15, seed=0)
        whole, all_rows = cells.fitting_sample(100, seed=0)
    assert len(rows) == 15 and list(sample.adata.obs_names) == list(ref.obs_names[rows])
    np.testing.assert_array_equal(all_rows, np.arange(40))
    assert whole.n_obs == 40


def test_matched_shift_with_cells_that_cannot_be_embedded_streams_as_in_memory(tmp_path):
    """``@matched`` estimates on the mapping's matched cells in chunks too when some cells have no embedding."""
    ref = synthetic_counts({"A": 60, "B": 60, "C": 40}, seed=1)
    query = synthetic_counts({"A": 50, "B": 50, "C": 30}, seed=7, extra_types={"new": 25})
    for a in (ref, query):
        a.obsm["X_emb"] = np.asarray(a.X[:, :24].todense(), dtype=np.float32)
    query.obsm["X_emb"] *= np.random.default_rng(9).lognormal(0.0, 0.8, 24).astype(np.float32)  # a batch effect
    query.obsm["X_emb"][[3, 80]] = np.nan  # two cells without an embedding
    kw = {"embedder": "obsm:X_emb", "train_config": FAST, "calibration_folds": 1, "progress": False, "seed": 0}
    model = spikgpt.train(ref, "cell_type", **kw)
    query.write_h5ad(tmp_path / "q.h5ad")
    shift = "gated_by_type@matched"
    annotate_file(tmp_path / "q.h5ad", model, tmp_path / "o.h5ad", chunk_size=37, shift=shift, progress=False)
    memory = spikgpt.annotate(query, model, copy=True, shift=shift, progress=False)
    assert memory.obs["spikgpt_unknown_reason"].iloc[[3, 80]].eq("not_embedded").all()
    assert memory.uns["spikgpt"]["global_shift_removed"]["location"] > 0  # the shift is found and removed
    _assert_same(ad.read_h5ad(tmp_path / "o.h5ad"), memory)
