"""The rejection threshold and the "Unknown" label, in terms of novelty (higher = more novel).

The threshold is set on held-out reference cells that no fitted step, embedder included, has
seen (see ``spikgpt.api.train``): scores of cells a step was fitted on are systematically more
familiar than those of new cells, and a threshold set on them rejects nothing.
"""

from __future__ import annotations

import numpy as np

UNKNOWN = "Unknown"


def calibrate_threshold(novelty: np.ndarray, target_frr: float) -> float:
    """Threshold above which a share ``target_frr`` of known-type cells lies.

    Parameters
    ----------
    novelty
        Novelty of held-out reference cells (higher = more novel).
    target_frr
        Target false-rejection rate on known types, in [0, 1).

    Returns
    -------
    The threshold; a cell with ``novelty > threshold`` is ``Unknown``.
    """
    if not 0 <= target_frr < 1:
        msg = f"target_frr must be in [0, 1), got {target_frr}."
        raise ValueError(msg)
    if target_frr == 0:
        return np.inf
    return float(np.quantile(np.asarray(novelty, dtype=np.float64), 1 - target_frr, method="linear"))


def reject(raw_labels: np.ndarray, novelty: np.ndarray, threshold: float) -> np.ndarray:
    """Labels with ``Unknown`` where the novelty is above the threshold or not a number."""
    labels = np.asarray(raw_labels, dtype=object).copy()
    labels[~(np.asarray(novelty) <= threshold)] = UNKNOWN
    return labels
