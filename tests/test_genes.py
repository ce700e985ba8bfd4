"""Gene identifiers matched offline: Ensembl IDs ↔ symbols, human and mouse."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import spikgpt
from spikgpt import genes
from spikgpt.data import align, prepare
from spikgpt.errors import GeneOverlapError


def _ids_for(symbols: np.ndarray, species: str, version: str = "") -> tuple[np.ndarray, np.ndarray]:
    """First table ID (+ version suffix) per symbol; ``NOMATCH<i>`` where none; mask of those with one."""
    first = genes.table(species).drop_duplicates("key").set_index("key")["ensembl_id"]
    ids = first.reindex(pd.Index(np.char.upper(symbols.astype(str)), dtype=object)).to_numpy()
    has = pd.notna(ids)
    named = [f"{g}{version}" if h else f"NOMATCH{i}" for i, (g, h) in enumerate(zip(ids, has, strict=True))]
    return np.array(named, dtype=object), has


def test_versions_species_and_kind():
    ids = np.array(["ENSG00000141510.18", "ENSG00000002586.20_PAR_Y", "TP53"])
    assert list(genes.strip_version(ids)) == ["ENSG00000141510", "ENSG00000002586", "TP53"]
    assert genes.species(ids) == "human"
    assert genes.species(np.array(["ENSMUSG00000029580", "Actb"])) == "mouse"
    assert genes.species(np.array(["ENSRNOG00000034254"])) is None
    assert genes.id_kind(ids) == genes.ENSEMBL and genes.id_kind(np.array(["TP53", "CD3E"])) == genes.SYMBOLS
    assert list(genes.to_symbols(np.array(["ENSG00000141510.18", "ENSG99999999999"]))) == ["TP53", ""]


@pytest.mark.parametrize("species", ["human", "mouse"])
def test_symbols_and_ids_match_both_ways(species):
    tab = genes.table(species)
    symbols = tab.drop_duplicates("key")["symbol"].to_numpy()[1000:1300]
    ids, has = _ids_for(symbols, species, version=".3")
    assert has.all()
    upper = np.char.upper(symbols.astype(str))
    forward = genes.match(upper, np.char.upper(ids.astype(str))[::-1])  # model symbols, query IDs
    assert (forward.index == np.arange(len(ids))[::-1]).all() and forward.n_translated == len(ids)
    assert species in forward.how
    back = genes.match(genes.strip_version(ids), upper)  # model IDs, query symbols
    assert (back.index == np.arange(len(ids))).all()


def test_ambiguous_symbol_takes_the_first_id_the_input_holds():
    tab = genes.table("human")
    ids = tab.loc[tab["key"] == "5S_RRNA", "ensembl_id"].to_numpy()
    assert len(ids) > 3
    query = np.array([ids[3], ids[2], "ENSG00000141510"], dtype=object)
    m = genes.match(np.array(["5S_RRNA", "TP53"]), query)
    assert list(m.index) == [1, 2]  # ids[2] comes before ids[3] in the table


def test_align_translates_and_says_so(caplog, counts):
    symbols = genes.table("human")["symbol"].drop_duplicates().to_numpy()[5000 : 5000 + counts.n_vars]
    model = counts.copy()
    model.var_names = symbols
    query = counts.copy()
    query.var_names = _ids_for(symbols, "human", ".1")[0]
    with caplog.at_level("INFO", logger="spikgpt"):
        X, present = align(prepare(query), prepare(model).genes)
    assert present.all()
    np.testing.assert_allclose(X.toarray(), prepare(model).X.toarray())
    assert "matched to the input's Ensembl IDs with the human table" in caplog.text


def test_unsupported_species_still_gets_the_clear_error(counts):
    rat = counts.copy()
    rat.var_names = [f"ENSRNOG{i:011d}" for i in range(rat.n_vars)]
    with pytest.raises(GeneOverlapError, match="Human and mouse Ensembl IDs are translated.*gene_key"):
        align(prepare(rat), prepare(counts).genes)


def test_ensembl_query_gets_the_labels_of_its_symbol_twin(pbmc, pbmc_model):
    """Target: >= 95 % of cells keep their label when the query's genes are versioned Ensembl IDs."""
    query = ad.AnnData(sp.csr_matrix(pbmc.raw.X), obs=pbmc.obs[[]].copy())
    query.var_names = pbmc.raw.var_names
    twin = query.copy()
    twin.var_names, has = _ids_for(query.var_names.to_numpy(), "human", ".12")
    assert 0.95 < has.mean() < 1  # a few of pbmc68k's symbols are in neither table: those genes are lost
    spikgpt.annotate(query, pbmc_model, progress=False)
    spikgpt.annotate(twin, pbmc_model, progress=False)
    same = (query.obs["spikgpt_raw_label"] == twin.obs["spikgpt_raw_label"]).mean()
    assert same >= 0.95
