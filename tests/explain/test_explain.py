import numpy as np

import spikgpt
from spikgpt.energy import markdown

# Markers present among pbmc68k_reduced's genes (CD14 itself is not measured there).
MARKERS = {
    "CD19+ B": {"CD79A", "CD79B", "MS4A1"},
    "CD14+ Monocyte": {"LYZ", "S100A8", "S100A9", "FCN1"},
    "CD56+ NK": {"NKG7", "GNLY", "GZMB", "PRF1"},
}
TOP = 20  # a class passes when at least NEED of its markers are among its top 20 of 765 genes
# Measured over seeds 0–2, with and without weight averaging: B 3 of 3, NK 3–4 of 4, CD14+
# monocytes 1–2 of 4 — LYZ and S100A8/9 are as high in this data's dendritic cells, so the
# monocyte class is told apart by FCN1 and genes that separate the two, not by them.
NEED = {"CD19+ B": 2, "CD14+ Monocyte": 1, "CD56+ NK": 2}


def test_known_markers_rank_top_for_their_class(pbmc, pbmc_model, tmp_path):
    res = spikgpt.explain(pbmc, pbmc_model, use_raw=True, n_top=TOP, out=tmp_path, cells=[pbmc.obs_names[5]])
    assert res["feature_kind"] == "gene"
    for cls, markers in MARKERS.items():
        top = set(res["top_genes"][cls]["feature"])
        assert len(top & markers) >= NEED[cls], (cls, res["top_genes"][cls]["feature"])
    assert "spikgpt_explain" in pbmc.uns
    for f in ("top_genes.csv", "attributions_heatmap.png", "attention.png", "raster.png", "summary.md"):
        assert (tmp_path / f).stat().st_size > 0
    att = next(iter(res["attention"].values()))
    cfg = pbmc_model.network.cfg
    # every block of every network of the ensemble (3 by default)
    assert att.shape == (cfg.depth * len(pbmc_model.network.members), cfg.heads, cfg.n_tokens, cfg.n_tokens)
    assert len(pbmc_model.network.members) == 3
    assert len(res["cells"][pbmc.obs_names[5]]) == len(pbmc_model.embedder.genes)
    del pbmc.uns["spikgpt_explain"]


def test_energy_report_on_pbmc(pbmc, pbmc_model):
    rep = spikgpt.energy(pbmc.copy(), pbmc_model, use_raw=True)
    assert rep["n_cells"] == pbmc.n_obs
    assert rep["twin"]["macs_per_cell"] > rep["spiking"]["macs_per_cell"]
    assert rep["spiking"]["acs_per_cell"] > 0 and 0 < rep["mean_firing_rate"] < 1
    assert np.isclose(
        rep["energy_ratio_twin_over_spiking"], rep["twin"]["energy_pj_per_cell"] / rep["spiking"]["energy_pj_per_cell"]
    )
    assert "not a CPU measurement" in markdown(rep) and rep["cpu_seconds_per_cell"]["spiking"] > 0


def test_evidence_is_signed_against_the_reference_mean(pbmc, pbmc_model):
    """Genes above the reference mean that support a call are reported apart from genes whose
    *absence* supports it (the pancreas failure: beta markers listed as evidence for alpha)."""
    res = spikgpt.explain(pbmc, pbmc_model, use_raw=True, n_top=TOP)
    assert "reference mean" in res["baseline"]
    others = set().union(*(m for c, m in MARKERS.items() if c != "CD19+ B"))
    b_above = set(res["top_genes"]["CD19+ B"]["feature"])
    b_below = set(res["top_genes_below"]["CD19+ B"]["feature"])
    assert len(b_above & MARKERS["CD19+ B"]) >= 2 and not b_above & others
    assert b_above.isdisjoint(b_below)
    assert all(a > 0 for a in res["top_genes_below"]["CD19+ B"]["attribution"])
    assert all(a < 0 for v in res["top_genes_against"].values() for a in v["attribution"])
    del pbmc.uns["spikgpt_explain"]


def test_gene_attributions_add_up_to_the_embedding_attributions(pbmc, pbmc_model):
    """Mapped back to genes, the attributions sum to what they are on the embedding: the gene
    values they use are the ones the embedder reads (ranks by default, not log expression)."""
    from spikgpt.data import Cells
    from spikgpt.explain.attribution import _integrated_gradients, gene_attributions

    cells = Cells(pbmc[:40], use_raw=True)
    att = gene_attributions(pbmc_model, cells, steps=4)
    assert pbmc_model.embedder.values == "rank"
    Z = pbmc_model.standardise(pbmc_model.embedder.transform(cells))
    base = pbmc_model.standardise(np.zeros((1, Z.shape[1]), np.float32))
    per_dimension = (_integrated_gradients(pbmc_model, Z, att.predicted, 4) * (Z - base)).sum(axis=1)
    np.testing.assert_allclose(att.values.sum(axis=1), per_dimension, rtol=1e-3, atol=1e-4)
