"""Per-cell confidence scores computed from the classifier's outputs (higher = more confident)."""

from __future__ import annotations

import numpy as np
import torch


def confidence_from_logits(logits_t: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and confidence from logits per time step.

    Parameters
    ----------
    logits_t
        ``[T, n, C]`` logits of every time step.

    Returns
    -------
    ``probs`` ``[n, C]`` (softmax of the time-averaged logits, as trained) and ``confidence``
    ``[n]``, the largest of them.
    """
    probs = torch.softmax(logits_t.mean(0), dim=-1).numpy()
    return probs, probs.max(axis=1)
