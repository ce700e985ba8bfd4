"""The rejection threshold and the "Unknown" label.

The threshold is set on *out-of-fold* scores — cells that no fitted step, embedder included,
has seen (see ``spikgpt.api.train``): scores of cells the embedder was fitted on are
systematically higher than those of new cells, and a threshold set on them rejects nothing.
"""

from __future__ import annotations

import numpy as np

UNKNOWN = "Unknown"


def calibrate_threshold(scores: np.ndarray, target_frr: float) -> float:
    """Threshold below which a share ``target_frr`` of known-type cells falls.

    Parameters
    ----------
    scores
        Confidence of held-out reference cells (higher = more confident).
    target_frr
        Target false-rejection rate on known types, in [0, 1).

    Returns
    -------
    The threshold; a cell with ``score < threshold`` is ``Unknown``.
    """
    if not 0 <= target_frr < 1:
        msg = f"target_frr must be in [0, 1), got {target_frr}."
        raise ValueError(msg)
    if target_frr == 0:
        return -np.inf
    return float(np.quantile(np.asarray(scores, dtype=np.float64), target_frr, method="linear"))


def reject(raw_labels: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Labels with ``Unknown`` where the score is below the threshold or not finite."""
    labels = np.asarray(raw_labels, dtype=object).copy()
    labels[~(np.asarray(scores) >= threshold)] = UNKNOWN
    return labels
