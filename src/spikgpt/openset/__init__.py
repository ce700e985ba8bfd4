"""Novelty scores, the Unknown decision (conformal p-values at a false discovery rate)."""

from spikgpt.openset.decision import DEFAULT_FDR, UNKNOWN, Decision, check_false_unknown, check_fdr, decide, reject
from spikgpt.openset.scores import confidence_from_logits

__all__ = [
    "DEFAULT_FDR",
    "UNKNOWN",
    "Decision",
    "check_false_unknown",
    "check_fdr",
    "confidence_from_logits",
    "decide",
    "reject",
]
