import numpy as np
import pandas as pd
import pytest
from synthetic import FAST, synthetic_counts

import spikgpt
from spikgpt.bench.metrics import open_set
from spikgpt.errors import GeneOverlapError, InputError
from spikgpt.openset import UNKNOWN


def test_annotate_writes_documented_keys_and_nothing_else(trained, counts):
    before_obs, before_X = list(counts.obs.columns), counts.X.copy()
    out = spikgpt.annotate(counts, trained, copy=True)
    assert list(counts.obs.columns) == before_obs and (counts.X != before_X).nnz == 0  # copy=True
    new = set(out.obs.columns) - set(before_obs)
    assert new == {
        "spikgpt_label",
        "spikgpt_raw_label",
        "spikgpt_confidence",
        "spikgpt_novelty",
        "spikgpt_unknown_reason",
    }
    assert set(out.obsm) == {"X_spikgpt_embedding"} and set(out.uns) == {"spikgpt"}
    assert out.obsm["X_spikgpt_embedding"].dtype == np.float32
    assert set(out.obs["spikgpt_label"].cat.categories) == {"A", "B", "C", UNKNOWN}
    assert out.uns["spikgpt"]["threshold"] == trained.threshold
    # in place (the default) returns None and writes the same values
    assert spikgpt.annotate(counts, trained) is None
    pd.testing.assert_series_equal(counts.obs["spikgpt_label"], out.obs["spikgpt_label"])
    acc = (out.obs["spikgpt_raw_label"].astype(str) == out.obs["cell_type"].astype(str)).mean()
    assert acc > 0.95


def test_key_added_and_threshold_override(trained, counts, caplog):
    out = spikgpt.annotate(counts, trained, key_added="m1", threshold=-0.01, copy=True)
    assert (out.obs["m1_label"] == UNKNOWN).all()
    assert "100% of the cells are Unknown" in caplog.text and "batch" in caplog.text
    assert set(out.obs["m1_unknown_reason"]) <= set(trained.novelty_components)
    assert "X_m1_embedding" in out.obsm


def test_held_out_type_comes_out_unknown_at_calibrated_rate():
    ref = synthetic_counts({"A": 150, "B": 150, "C": 150}, seed=3)
    query = synthetic_counts({"A": 100, "B": 100, "C": 100}, seed=4, extra_types={"D": 100})
    model = spikgpt.train(ref, "cell_type", train_config=FAST, progress=False)
    assert model.target_frr == 0.05 and 0 < model.threshold < 1
    spikgpt.annotate(query, model)
    m = open_set(query.obs["cell_type"], query.obs["spikgpt_label"], query.obs["spikgpt_novelty"], model.classes)
    assert m["false_unknown_known"] <= 0.12  # target 5 %, 300 known cells
    # D has no markers of its own that the reference knows; the default novelty sees it.
    assert m["unseen_auroc"] >= 0.9
    assert m["unseen_called_unknown"] >= 0.5


def test_neighbourhood_novelty_depends_on_the_query_only_when_asked(trained, counts):
    half = counts[: counts.n_obs // 2].copy()
    alone = spikgpt.annotate(half, trained, novelty_neighbours=1, copy=True)
    within = spikgpt.annotate(counts, trained, novelty_neighbours=1, copy=True)[: half.n_obs]
    np.testing.assert_array_equal(alone.obs["spikgpt_novelty"], within.obs["spikgpt_novelty"])
    single = spikgpt.annotate(counts, trained, novelty_neighbours=1, copy=True)
    default = spikgpt.annotate(counts, trained, copy=True)
    assert default.uns["spikgpt"]["novelty_neighbours"] == trained.novelty_neighbours == 15
    assert not np.array_equal(default.obs["spikgpt_novelty"], single.obs["spikgpt_novelty"])
    # the labels before rejection never depend on novelty settings
    assert (default.obs["spikgpt_raw_label"] == single.obs["spikgpt_raw_label"]).all()


def test_deterministic_given_seed(counts):
    kw = {"train_config": FAST, "progress": False, "seed": 7}
    a, b = (spikgpt.train(counts, "cell_type", **kw) for _ in range(2))
    assert a.threshold == b.threshold
    for k, v in a.network.state_dict().items():
        assert np.array_equal(v.numpy(), b.network.state_dict()[k].numpy()), k


def test_label_errors(counts):
    with pytest.raises(InputError, match="Label column 'celltype' not found.*cell_type"):
        spikgpt.train(counts, "celltype")
    nan = counts.copy()
    nan.obs["cell_type"] = nan.obs["cell_type"].astype(object)
    nan.obs.iloc[:3, 0] = np.nan
    with pytest.raises(InputError, match="3 of 160 cells have no label"):
        spikgpt.train(nan, "cell_type")
    tiny = synthetic_counts({"A": 40, "B": 40, "rare": 2})
    with pytest.raises(InputError, match=r"fewer than 5 cells.*rare \(2\)"):
        spikgpt.train(tiny, "cell_type")
    one = synthetic_counts({"A": 40})
    with pytest.raises(InputError, match="at least 2"):
        spikgpt.train(one, "cell_type")


def test_query_without_shared_genes(trained, counts):
    other = counts.copy()
    other.var_names = [f"ENSG{i}" for i in range(counts.n_vars)]
    with pytest.raises(GeneOverlapError, match="model genes"):
        spikgpt.annotate(other, trained)


def test_gene_order_and_extra_genes_do_not_change_predictions(trained, counts):
    a = spikgpt.annotate(counts, trained, copy=True)
    perm = counts[:, np.random.default_rng(1).permutation(counts.n_vars)].copy()
    b = spikgpt.annotate(perm, trained, copy=True)
    np.testing.assert_allclose(a.obs["spikgpt_confidence"], b.obs["spikgpt_confidence"], atol=1e-5)
    assert (a.obs["spikgpt_raw_label"] == b.obs["spikgpt_raw_label"]).all()
