"""Parity of our scGPT embedder with the official scgpt 0.2.4 outputs (tests/data/scgpt_tiny)."""

import json
import shutil

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from synthetic import SCGPT_FIXTURE

from spikgpt.data import Cells
from spikgpt.embed import make_embedder
from spikgpt.embed.scgpt import ScGPTEmbedder, ScGPTEncoder, Tokenizer, bin_values, cosine_to_mean, pad_batch
from spikgpt.errors import GeneOverlapError, ModelFormatError

FIX = SCGPT_FIXTURE
CKPT = FIX / "checkpoint"
SEED = 1234  # the fixture's RNG protocol seed


@pytest.fixture(scope="module")
def query():
    return ad.read_h5ad(FIX / "query.h5ad")


@pytest.fixture(scope="module")
def details():
    return dict(np.load(FIX / "reference_details.npz"))


@pytest.fixture(scope="module")
def expected():
    return np.load(FIX / "expected_embeddings.npy")


def test_tie_free_cells_match_reference_exactly(query, details, expected):
    emb = ScGPTEmbedder(CKPT, seed=0, progress=False)  # any seed: these cells draw no randomness
    E = emb.transform(Cells(query))
    tie_free = details["tie_free"]
    assert tie_free.sum() == 30
    np.testing.assert_allclose(E[tie_free], expected[tie_free], atol=1e-5)


def test_all_cells_match_with_the_reference_rng_protocol(query, expected):
    E = ScGPTEmbedder(CKPT, seed=SEED, progress=False).transform(Cells(query))
    np.testing.assert_allclose(E, expected, atol=1e-5)


def test_model_reproduces_recorded_cls_outputs(details):
    emb = ScGPTEmbedder(CKPT, progress=False)  # on the GPU when there is one: inputs go to its device
    ids, vals = details["input_gene_ids"], details["input_values"]
    pad_id = 300
    with torch.inference_mode():
        ids_t = torch.as_tensor(ids, device=emb.device)
        cls = emb.net(ids_t, torch.as_tensor(vals, device=emb.device), ids_t == pad_id).cpu().numpy()
    np.testing.assert_allclose(cls, details["cls_raw"], atol=1e-5)


def test_our_bins_stay_in_the_allowed_range(query, details):
    emb = ScGPTEmbedder(CKPT, progress=False)
    tok = Tokenizer(emb.match_genes(query.var_names.to_numpy()), emb.ckpt.cls_id, -2.0, 1200, seed=5)
    tokens = tok(query.X)
    for (ids, vals), ref_vals in zip(tokens, details["input_values"], strict=True):
        assert vals[0] == -2 and ((vals[1:] >= 1) & (vals[1:] <= 50)).all()
        # same multiset of genes; binning is only random among tied values
        assert len(ids) - 1 == (ref_vals[1:] > 0).sum()


def test_subsampled_cells_within_reference_spread(query, details, expected):
    draws = details["sampling_draws_maxlen"]
    sampled = details["sampled_maxlen"]
    a = ScGPTEmbedder(CKPT, max_length=64, seed=7, progress=False).transform(Cells(query))
    b = ScGPTEmbedder(CKPT, max_length=64, seed=7, progress=False).transform(Cells(query))
    np.testing.assert_array_equal(a, b)  # deterministic given the seed
    ref_min = min(cosine_to_mean(d, draws[i]) for i in np.flatnonzero(sampled) for d in draws[i])
    ours = [cosine_to_mean(a[i], draws[i]) for i in np.flatnonzero(sampled)]
    assert sampled.sum() == 20 and min(ours) >= ref_min - 1e-3
    # with the fixture's seed the subsampling protocol is replayed exactly
    c = ScGPTEmbedder(CKPT, max_length=64, seed=SEED, progress=False).transform(Cells(query))
    np.testing.assert_allclose(c, details["expected_embeddings_maxlen"], atol=1e-5)


def test_padding_and_batching_do_not_change_outputs(query):
    emb = ScGPTEmbedder(CKPT, seed=3, progress=False)
    tok = Tokenizer(emb.match_genes(query.var_names.to_numpy()), emb.ckpt.cls_id, -2.0, 1200, seed=3)
    tokens = tok(query.X)

    def run(batch):
        return emb.net(*(x.to(emb.device) for x in batch)).cpu()

    with torch.inference_mode():
        tight = torch.cat([run(pad_batch([t], emb.ckpt.pad_id, -2.0)) for t in tokens])
        wide = run(pad_batch(tokens, emb.ckpt.pad_id, -2.0, width=1200))
    torch.testing.assert_close(tight, wide, atol=1e-5, rtol=0)


def test_cell_without_vocab_genes_is_nan_not_a_crash(query):
    X = query.X.toarray()
    X[3] = 0
    q = ad.AnnData(sp.csr_matrix(X), var=query.var)
    E = ScGPTEmbedder(CKPT, progress=False).transform(Cells(q))
    assert np.isnan(E[3]).all() and np.isfinite(np.delete(E, 3, axis=0)).all()


def test_single_gene_cell_bins_uniformly():
    bins = bin_values(np.array([7.0], dtype=np.float32), np.array([0.0, 0.5, 0.999])[:1])
    assert 1 <= bins[0] <= 50


def test_gene_key_and_overlap_error(query):
    q = query.copy()
    q.var["symbol"] = q.var_names
    q.var_names = [f"ENSG{i:011d}" for i in range(q.n_vars)]
    emb = ScGPTEmbedder(CKPT, progress=False)
    with pytest.raises(GeneOverlapError, match="scGPT vocabulary.*gene_key"):
        emb.transform(Cells(q))
    E = emb.transform(Cells(q, gene_key="symbol"))
    assert np.isfinite(E).all()


def _copy_ckpt(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(CKPT, d)
    return d


def test_bad_checkpoints(tmp_path):
    d = _copy_ckpt(tmp_path)
    (d / "vocab.json").unlink()
    with pytest.raises(ModelFormatError, match="lacks vocab.json"):
        ScGPTEmbedder(d)

    d = _copy_ckpt(tmp_path / "b")
    vocab = json.loads((d / "vocab.json").read_text())
    del vocab["<cls>"]
    (d / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ModelFormatError, match="no '<cls>' token"):
        ScGPTEmbedder(d)

    d = _copy_ckpt(tmp_path / "c")
    state = torch.load(d / "best_model.pt", weights_only=True)
    state["transformer_encoder.layers.1.linear1.weight"] = torch.zeros(65, 32)
    torch.save(state, d / "best_model.pt")
    with pytest.raises(ModelFormatError, match=r"layers\.1\.linear1\.weight' has shape \(65, 32\)"):
        ScGPTEmbedder(d)

    del state["transformer_encoder.layers.0.self_attn.Wqkv.weight"]
    torch.save(state, d / "best_model.pt")
    with pytest.raises(ModelFormatError, match="lacks 'transformer_encoder.layers.0.self_attn.in_proj_weight'"):
        ScGPTEmbedder(d)


def test_train_and_annotate_on_scgpt_embeddings(query, tmp_path):
    from synthetic import FAST

    import spikgpt

    q = query.copy()
    q.obs["group"] = np.where(np.arange(q.n_obs) % 2 == 0, "even", "odd")
    model = spikgpt.train(q, "group", embedder=f"scgpt:{CKPT}", train_config=FAST, progress=False)
    assert model.embedder.spec == f"scgpt:{CKPT}"
    loaded = spikgpt.load_model(model.save(tmp_path / "m"))
    a = spikgpt.annotate(q, model, copy=True)
    b = spikgpt.annotate(q, loaded, copy=True)
    np.testing.assert_array_equal(a.obsm["X_spikgpt_embedding"], b.obsm["X_spikgpt_embedding"])
    assert (a.obs["spikgpt_label"] == b.obs["spikgpt_label"]).all()
    assert isinstance(make_embedder(f"scgpt:{CKPT}"), ScGPTEmbedder)
    assert isinstance(ScGPTEncoder.from_checkpoint(model.embedder.ckpt), ScGPTEncoder)


def test_ensembl_ids_are_translated_to_the_vocabulary(query):
    from spikgpt import genes

    first = genes.table("human").drop_duplicates("key").set_index("key")["ensembl_id"]
    ids = first.reindex(query.var_names.str.upper())
    q = query[:, ids.notna().to_numpy()].copy()
    assert q.n_vars >= 20
    twin = q.copy()
    twin.var_names = [f"{i}.5" for i in ids.dropna()]
    emb = ScGPTEmbedder(CKPT, seed=SEED, progress=False)
    np.testing.assert_array_equal(emb.transform(Cells(q)), emb.transform(Cells(twin)))
