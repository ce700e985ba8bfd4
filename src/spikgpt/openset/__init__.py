"""Confidence scores, threshold calibration and the "Unknown" label."""

from spikgpt.openset.calibration import UNKNOWN, calibrate_threshold, reject
from spikgpt.openset.scores import confidence_from_logits

__all__ = ["UNKNOWN", "calibrate_threshold", "confidence_from_logits", "reject"]
