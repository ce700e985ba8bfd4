"""Metrics shared by the demo and the benchmarks."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from spikgpt.openset import UNKNOWN


def closed_set(y_true: np.ndarray, y_pred: np.ndarray, known: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1 over the cells whose true type is in ``known``.

    The macro average runs over the known types present in ``y_true``; an ``Unknown``
    prediction counts as an error.
    """
    y_true, y_pred = np.asarray(y_true, dtype=str), np.asarray(y_pred, dtype=str)
    mask = np.isin(y_true, known)
    labels = sorted(set(y_true[mask]))
    return {
        "accuracy": float(accuracy_score(y_true[mask], y_pred[mask])),
        "macro_f1": float(f1_score(y_true[mask], y_pred[mask], labels=labels, average="macro", zero_division=0)),
        "n_cells": int(mask.sum()),
    }


def unknown_rates(y_true: np.ndarray, labels: np.ndarray, known: list[str]) -> dict[str, float]:
    """Share of unseen-type cells called ``Unknown`` and false-Unknown rate on known types."""
    y_true, labels = np.asarray(y_true, dtype=str), np.asarray(labels, dtype=str)
    unseen = ~np.isin(y_true, known)
    called = labels == UNKNOWN
    return {
        "unseen_called_unknown": float(called[unseen].mean()) if unseen.any() else float("nan"),
        "false_unknown_known": float(called[~unseen].mean()) if (~unseen).any() else float("nan"),
        "n_unseen": int(unseen.sum()),
    }


def open_set(y_true: np.ndarray, labels: np.ndarray, novelty: np.ndarray, known: list[str]) -> dict[str, float]:
    """How well ``Unknown`` separates types absent from the reference.

    Returns :func:`unknown_rates` and the AUROC of ``novelty`` (any score, higher = more
    novel) for unseen vs known (NaN without both).
    """
    unseen = ~np.isin(np.asarray(y_true, dtype=str), known)
    auroc = float(roc_auc_score(unseen, np.asarray(novelty))) if 0 < unseen.sum() < len(unseen) else float("nan")
    return {**unknown_rates(y_true, labels, known), "unseen_auroc": auroc}
