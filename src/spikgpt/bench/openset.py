"""Open-set evaluation: how well each novelty score separates types absent from the reference."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from spikgpt.api import annotate, train
from spikgpt.data import Cells
from spikgpt.model.annotator import SpikGPTModel
from spikgpt.openset.novelty import SCORES

logger = logging.getLogger("spikgpt")


def score_aurocs(model: SpikGPTModel, query: ad.AnnData, label_key: str, **input_kw) -> dict[str, float]:
    """AUROC of every novelty score for unseen-type vs known-type query cells.

    ``decision`` ranks by the p-value :func:`spikgpt.annotate` tests; every score in
    :data:`SCORES` is its raw value on the mapped embedding.
    """
    truth = query.obs[label_key].astype(str).to_numpy()
    unseen = ~np.isin(truth, model.classes)
    if unseen.all() or not unseen.any():
        return {}
    pred = model.predict(Cells(query, **input_kw))
    raw = model.raw_scores(pred.outputs)
    ok = pred.embedded
    out = {name: float(roc_auc_score(unseen[ok], raw[name])) for name in SCORES}
    out["decision"] = float(roc_auc_score(unseen, pred.novelty))
    return out


def rejection_rates(annotated: ad.AnnData, label_key: str, classes: list[str], key: str = "spikgpt") -> dict:
    """Share of unseen-type cells called Unknown, false Unknown on known types, known macro-F1 before/after."""
    from spikgpt.bench.metrics import closed_set, unknown_rates

    truth = annotated.obs[label_key].astype(str).to_numpy()
    rates = unknown_rates(truth, annotated.obs[f"{key}_label"], classes)
    return {
        "unseen_called_unknown": rates["unseen_called_unknown"],
        "false_unknown_known": rates["false_unknown_known"],
        "macro_f1_before": closed_set(truth, annotated.obs[f"{key}_raw_label"], classes)["macro_f1"],
        "macro_f1_after": closed_set(truth, annotated.obs[f"{key}_label"], classes)["macro_f1"],
    }


def leave_one_type_out(
    adata: ad.AnnData,
    label_key: str,
    *,
    types: list[str] | None = None,
    min_cells: int = 10,
    test_size: float = 0.3,
    seed: int = 0,
    train_kw: dict | None = None,
    input_kw: dict | None = None,
) -> dict[str, dict]:
    """For each type: train without it on a stratified share of the rest, score the remainder plus it.

    Returns, per held-out type, the AUROC of every score and the rejection rates at the
    model's default FDR.
    """
    labels = adata.obs[label_key].astype(str).to_numpy()
    counts = {t: int((labels == t).sum()) for t in np.unique(labels)}
    types = types or [t for t, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n >= min_cells]
    input_kw = input_kw or {}
    results = {}
    for t in types:
        rest = np.flatnonzero(labels != t)
        ref_idx, q_idx = train_test_split(rest, test_size=test_size, stratify=labels[rest], random_state=seed)
        ref = adata[np.sort(ref_idx)].copy()
        query = adata[np.sort(np.concatenate([q_idx, np.flatnonzero(labels == t)]))].copy()
        model = train(ref, label_key, seed=seed, progress=False, **input_kw, **(train_kw or {}))
        annotate(query, model, **input_kw)
        results[t] = {
            "auroc": score_aurocs(model, query, label_key, **input_kw),
            **rejection_rates(query, label_key, model.classes),
            "n_unseen": counts[t],
        }
        logger.info("held out %s: %s", t, results[t])
    return results
