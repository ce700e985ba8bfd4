import numpy as np
import pytest
import torch

from spikgpt.openset import novelty as novelty_module
from spikgpt.openset.decision import decide
from spikgpt.openset.novelty import SCORES, CellOutputs, NoveltyScorer, score_names


def outputs(X: np.ndarray) -> CellOutputs:
    """A toy model: class A for x0 > 0, B for x0 < 0; confidence grows with |x0|."""
    logits = torch.as_tensor(np.stack([X[:, 0], -X[:, 0]], axis=1), dtype=torch.float32)
    firing = 1 / (1 + np.exp(-X[:, :2]))
    residual = X[:, -1] ** 2  # a toy "off the embedding" signal
    return CellOutputs(logits.expand(4, -1, -1), X.astype(np.float32), X.astype(np.float32), firing, residual)


@pytest.fixture(scope="module")
def scorer():
    rng = np.random.default_rng(0)
    ref = np.concatenate([rng.normal([4, 0, 0, 0], 1, (300, 4)), rng.normal([-4, 0, 0, 0], 1, (300, 4))])
    y = np.repeat([0, 1], 300)
    cal = np.concatenate([rng.normal([4, 0, 0, 0], 1, (200, 4)), rng.normal([-4, 0, 0, 0], 1, (200, 4))])
    s = NoveltyScorer(max_reference_cells=400).fit(outputs(ref), y)
    s.calibrate(s.raw_scores(outputs(cal)))
    return s


def auroc(novel: np.ndarray, known: np.ndarray) -> float:
    return float((novel[:, None] > known[None, :]).mean())


def test_far_cluster_caught_by_distances_not_by_max_prob(scorer):
    rng = np.random.default_rng(1)
    known = scorer.raw_scores(outputs(rng.normal([4, 0, 0, 0], 1, (100, 4))))
    # far from every class but on the confident side of the decision boundary
    far = scorer.raw_scores(outputs(rng.normal([6, 12, 0, 0], 1, (100, 4))))
    for name in ("knn_latent", "knn_embedding", "mahalanobis_latent", "mahalanobis_embedding", "gaussian_embedding"):
        assert auroc(far[name], known[name]) > 0.99, name
    assert auroc(far["firing"], known["firing"]) > 0.95  # toy firing rates saturate
    assert auroc(far["max_prob"], known["max_prob"]) < 0.6


def test_between_two_classes_caught_by_max_prob_and_distances(scorer):
    rng = np.random.default_rng(2)
    known = scorer.raw_scores(
        outputs(np.concatenate([rng.normal([4, 0, 0, 0], 1, (50, 4)), rng.normal([-4, 0, 0, 0], 1, (50, 4))]))
    )
    between = scorer.raw_scores(outputs(rng.normal([0, 0, 0, 0], 0.3, (100, 4))))
    for name in ("max_prob", "energy", "knn_latent", "mahalanobis_embedding", "gaussian_embedding"):
        assert auroc(between[name], known[name]) > 0.95, name


def test_gaussian_judges_each_class_by_its_own_spread():
    """A cell 3 units from a tight class is novel; 3 units inside a diffuse class it is not."""
    rng = np.random.default_rng(5)
    tight, diffuse = rng.normal([5, 0], 0.3, (400, 2)), rng.normal([-5, 0], 2.0, (400, 2))
    s = NoveltyScorer().fit(outputs(np.concatenate([tight, diffuse])), np.repeat([0, 1], 400))
    off_tight = s.raw_scores(outputs(rng.normal([5, 3], 0.1, (50, 2))))
    off_diffuse = s.raw_scores(outputs(rng.normal([-5, 3], 0.1, (50, 2))))
    assert auroc(off_tight["gaussian_embedding"], off_diffuse["gaussian_embedding"]) > 0.99
    # a shared covariance cannot tell the two apart as well
    assert auroc(off_tight["mahalanobis_embedding"], off_diffuse["mahalanobis_embedding"]) < 0.9


def test_scaled_mahalanobis_puts_a_diffuse_and_a_tight_class_on_one_scale(monkeypatch):
    """Known cells of a diffuse class are not more novel than a tight class's (pbmc68k's per-type miscalibration)."""
    rng = np.random.default_rng(6)
    tight, diffuse = rng.normal([5, 0], 0.3, (400, 2)), rng.normal([-5, 0], 2.0, (400, 2))
    s = NoveltyScorer().fit(outputs(np.concatenate([tight, diffuse])), np.repeat([0, 1], 400))
    new_tight, new_diffuse = rng.normal([5, 0], 0.3, (200, 2)), rng.normal([-5, 0], 2.0, (200, 2))
    a, b = (s.raw_scores(outputs(x)) for x in (new_tight, new_diffuse))
    assert novelty_module.CLASS_SCALE_POWER == 0.5
    scales = s.class_scales()
    assert scales[1] > 1.5 * scales[0]  # the diffuse class's distances are divided by more
    # pooled distance: the diffuse class's known cells sit far beyond the tight class's
    assert np.median(b["mahalanobis_embedding"]) > 3 * np.median(a["mahalanobis_embedding"])
    ratio = np.median(b["scaled_mahalanobis_embedding"]) / np.median(a["scaled_mahalanobis_embedding"])
    assert 1.2 < ratio < 3  # half-way on the log scale (power 0.5)
    # power 0 is the pooled distance; power 1 puts both classes' typical cells at the same score
    monkeypatch.setattr(novelty_module, "CLASS_SCALE_POWER", 0.0)
    np.testing.assert_allclose(
        s.raw_scores(outputs(new_diffuse))["scaled_mahalanobis_embedding"], b["mahalanobis_embedding"], rtol=1e-5
    )
    # a model calibrated before the score existed says so
    with pytest.raises(ValueError, match="calibrated without the novelty score"):
        s.calibration_scores(("scaled_mahalanobis_embedding",))
    monkeypatch.setattr(novelty_module, "CLASS_SCALE_POWER", 1.0)
    a1, b1 = (s.raw_scores(outputs(x))["scaled_mahalanobis_embedding"] for x in (new_tight, new_diffuse))
    assert 0.8 < np.median(b1) / np.median(a1) < 1.25


def test_degenerate_classes_give_finite_scores():
    """A class of identical cells and a class of one cell still have invertible covariances."""
    rng = np.random.default_rng(8)
    X = np.concatenate([rng.normal(0, 1, (50, 3)), np.tile([[5.0, 5, 5]], (10, 1)), [[-5.0, -5, -5]]])
    s = NoveltyScorer().fit(outputs(X), np.repeat([0, 1, 2], [50, 10, 1]))
    raw = s.raw_scores(outputs(rng.normal(0, 3, (20, 3))))
    assert all(np.isfinite(v).all() for v in raw.values())


def test_decision_on_scorer_outputs_names_the_score_and_spares_known_cells(scorer):
    rng = np.random.default_rng(3)
    names = ("max_prob", "knn_latent")
    cal = scorer.calibration_scores(names)
    known = outputs(np.concatenate([rng.normal([4, 0, 0, 0], 1, (500, 4)), rng.normal([-4, 0, 0, 0], 1, (500, 4))]))
    far = outputs(rng.normal([6, 12, 0, 0], 1, (50, 4)))
    d = decide(scorer.raw_scores(far), cal, names, fdr=0.1, shift="none")
    assert d.unknown.all() and set(d.reason) == {"knn_latent"}
    d = decide(scorer.raw_scores(known), cal, names, fdr=0.1, shift="none")
    assert d.unknown.mean() <= 0.01  # no new type: BH calls (almost) nothing
    with pytest.raises(ValueError, match="Unknown novelty score"):
        score_names("bogus", ())


@pytest.mark.parametrize("method", ["combined", *SCORES])
def test_every_score_gives_valid_pvalues_on_new_known_cells(scorer, method):
    rng = np.random.default_rng(4)
    names = score_names(method, ("max_prob", "knn_latent", "mahalanobis_embedding"))
    new = outputs(np.concatenate([rng.normal([4, 0, 0, 0], 1, (1000, 4)), rng.normal([-4, 0, 0, 0], 1, (1000, 4))]))
    d = decide(scorer.raw_scores(new, names), scorer.calibration_scores(names), names, shift="none")
    assert abs((d.pvalue <= 0.1).mean() - 0.1) < 0.04, method


def test_real_data_held_out_type_pbmc_subsampled_to_10_cells(pbmc):
    """pbmc68k_reduced, CD19+ B held out of the reference, 10 B cells in the query (the issue's check).

    Measured (seed 0): decision AUROC 0.86. Cell by cell (0.10) no B cell was called Unknown at
    FDR 0.10: the 85 calibration cells cannot give 10 cells p-values small enough for
    Benjamini–Hochberg over ~190 cells. With the neighbourhood test (0.11) 8 of the 10 are
    called, with 2 known cells beside them (false discovery proportion 0.2 on this one draw;
    the FDR is controlled in expectation, and known cells next to a new group share its
    neighbourhood).
    """
    from sklearn.model_selection import train_test_split

    import spikgpt
    from spikgpt.bench.openset import rejection_rates, score_aurocs

    labels = pbmc.obs["bulk_labels"].astype(str).to_numpy()
    rest = np.flatnonzero(labels != "CD19+ B")
    ref_idx, q_idx = train_test_split(rest, test_size=0.3, stratify=labels[rest], random_state=0)
    ref = pbmc[np.sort(ref_idx)].copy()
    b_cells = np.random.default_rng(0).choice(np.flatnonzero(labels == "CD19+ B"), 10, replace=False)
    query = pbmc[np.sort(np.concatenate([q_idx, b_cells]))].copy()
    model = spikgpt.train(ref, "bulk_labels", use_raw=True, progress=False)
    aurocs = score_aurocs(model, query, "bulk_labels", use_raw=True)
    assert aurocs["decision"] >= 0.8 and aurocs["knn_embedding"] >= 0.9
    spikgpt.annotate(query, model, use_raw=True)
    rates = rejection_rates(query, "bulk_labels", model.classes)
    assert rates["false_unknown_known"] <= 0.05
    assert rates["macro_f1_before"] - rates["macro_f1_after"] <= 0.03
    called = (query.obs["spikgpt_label"] == "Unknown").to_numpy()
    known = (query.obs["bulk_labels"] != "CD19+ B").to_numpy()
    assert (called & ~known).sum() >= 5 and (called & known).sum() <= 2
    # novelty scoring never changes the labels before rejection
    other = spikgpt.annotate(query, model, use_raw=True, novelty="knn_embedding", fdr=0.2, copy=True)
    assert (query.obs["spikgpt_raw_label"] == other.obs["spikgpt_raw_label"]).all()
    assert set(query.obs["spikgpt_unknown_reason"]) <= {"", "neighbourhood", *model.novelty_components}
