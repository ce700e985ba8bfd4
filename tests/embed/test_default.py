import numpy as np
import pytest

from spikgpt.data import Cells
from spikgpt.embed import embedder_from_config, make_embedder
from spikgpt.embed.default import DefaultEmbedder
from spikgpt.errors import InputError


def test_fit_transform_shape_dtype_and_round_trip(counts):
    emb = make_embedder("default").fit(Cells(counts))
    E = emb.transform(Cells(counts))
    assert E.shape == (counts.n_obs, emb.dim) and E.dtype == np.float32
    again = embedder_from_config(emb.config(), emb.arrays())
    np.testing.assert_array_equal(again.transform(Cells(counts)), E)


def test_gene_order_does_not_matter(counts):
    emb = DefaultEmbedder().fit(Cells(counts))
    shuffled = counts[:, np.random.default_rng(0).permutation(counts.n_vars)]
    np.testing.assert_allclose(emb.transform(Cells(shuffled)), emb.transform(Cells(counts)), atol=1e-5)


def test_small_reference_caps_components(counts):
    emb = DefaultEmbedder(n_components=50).fit(Cells(counts[:20]))
    assert emb.dim == 19


def test_self_scaling_removes_a_global_shift(counts):
    shifted = counts.copy()
    shifted.X = shifted.X.multiply(np.linspace(0.2, 3, counts.n_vars)).tocsr()  # gene-wise batch effect
    ref = DefaultEmbedder(scale="reference").fit(Cells(counts))
    own = DefaultEmbedder(scale="self").fit(Cells(counts))
    d_ref = np.abs(ref.transform(Cells(shifted)).mean(0)).max()
    d_own = np.abs(own.transform(Cells(shifted)).mean(0)).max()
    assert d_own < 0.05 < 1.0 < d_ref  # clipping at ±10 leaves a small residue


def test_rank_values_ignore_a_per_cell_monotone_distortion(counts):
    import anndata as ad

    from spikgpt.data import prepare

    logged = ad.AnnData(prepare(counts).X.copy(), obs=counts.obs, var=counts.var)
    distorted = logged.copy()
    distorted.X = distorted.X.power(1.7).multiply(np.linspace(0.5, 2, counts.n_obs)[:, None]).tocsr()
    for values, same in (("rank", True), ("log", False)):
        emb = DefaultEmbedder(values=values).fit(Cells(logged))
        a, b = emb.transform(Cells(logged)), emb.transform(Cells(distorted))
        assert np.allclose(a, b, atol=1e-4) is same, values
        again = embedder_from_config(emb.config(), emb.arrays())
        np.testing.assert_array_equal(again.transform(Cells(logged)), a)
    with pytest.raises(InputError, match="values must be"):
        DefaultEmbedder(values="binned")


def test_bad_specs():
    with pytest.raises(InputError, match="Unknown embedder"):
        make_embedder("geneformer")
    with pytest.raises(InputError, match="needs an argument"):
        make_embedder("obsm")
    with pytest.raises(InputError, match="scale"):
        DefaultEmbedder(scale="batch")
    with pytest.raises(InputError, match="default:rank"):
        make_embedder("default:binned")
    assert make_embedder("default:log").values == "log" and make_embedder("default").values == "rank"


def test_pairwise_markers_pick_type_genes_not_batch_genes(counts):
    from spikgpt.data import prepare
    from spikgpt.embed.default import pairwise_markers

    X = prepare(counts).X.tolil()
    labels = counts.obs["cell_type"].astype(str).to_numpy()
    batch = np.arange(counts.n_obs) % 2 == 1
    X[np.flatnonzero(batch), 100] = 6.0  # a gene that separates batches, not types
    genes = counts.var_names.to_numpy()
    chosen = pairwise_markers(X.tocsr(), genes, labels, per_pair=8)
    # synthetic_counts: type i over-expresses genes 8i … 8i + 7
    assert set(genes[:24]) <= set(chosen) and "GENE100" not in chosen
    assert len(pairwise_markers(X.tocsr(), genes, labels, per_pair=2)) <= 3 * 2 * 2


def test_fit_with_labels_adds_markers_and_round_trips(counts):
    labels = counts.obs["cell_type"].astype(str).to_numpy()
    hvg = DefaultEmbedder(n_genes=10).fit(Cells(counts))
    both = DefaultEmbedder(n_genes=10).fit(Cells(counts), labels=labels)
    assert len(hvg.genes) == 10 and set(hvg.genes) < set(both.genes)
    assert {f"GENE{i}" for i in range(24)} <= set(both.genes)
    again = embedder_from_config(both.config(), both.arrays())
    assert again.markers_per_pair == both.markers_per_pair == 25
    np.testing.assert_array_equal(again.transform(Cells(counts)), both.transform(Cells(counts)))


def test_hvg_spec_is_the_label_free_embedder():
    from spikgpt.embed.base import HVG_ONLY_GENES

    emb = make_embedder("default:log,hvg")  # spikgpt ≤ 0.5
    assert (emb.values, emb.markers_per_pair, emb.n_genes) == ("log", 0, HVG_ONLY_GENES)
    assert make_embedder("default").markers_per_pair > 0
    with pytest.raises(InputError, match="'log' or 'rank'"):
        make_embedder("default:log,rank")
    with pytest.raises(InputError, match="markers_per_pair"):
        DefaultEmbedder(markers_per_pair=-1)


def test_row_ranks_match_scipy_rankdata():
    import scipy.sparse as sp
    from scipy.stats import rankdata

    from spikgpt.embed.default import row_ranks

    rng = np.random.default_rng(0)
    dense = rng.poisson(0.8, (50, 30)).astype(np.float32)  # many ties, zeros included
    dense[3] = 0.0
    dense[4] = 2.0
    np.testing.assert_allclose(row_ranks(sp.csr_matrix(dense)), rankdata(dense, axis=1), atol=1e-5)
    # Column indices in any order within a row (as the alignment to a model's genes leaves them).
    shuffled = sp.csr_matrix(dense)
    for r in range(shuffled.shape[0]):
        lo, hi = shuffled.indptr[r], shuffled.indptr[r + 1]
        perm = lo + rng.permutation(hi - lo)
        shuffled.indices[lo:hi], shuffled.data[lo:hi] = shuffled.indices[perm], shuffled.data[perm]
    shuffled.has_sorted_indices = False
    np.testing.assert_allclose(row_ranks(shuffled), rankdata(dense, axis=1), atol=1e-5)
