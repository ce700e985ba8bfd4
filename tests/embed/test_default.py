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
    assert make_embedder("default:rank").values == "rank" and make_embedder("default").values == "log"
