import numpy as np
import pytest

from spikgpt.openset import UNKNOWN, calibrate_threshold, reject


def test_threshold_hits_target_rate():
    scores = np.random.default_rng(0).uniform(size=10_000)
    for frr in (0.01, 0.05, 0.2):
        thr = calibrate_threshold(scores, frr)
        assert abs((scores > thr).mean() - frr) < 0.002
    assert calibrate_threshold(scores, 0.0) == np.inf
    with pytest.raises(ValueError, match="target_frr"):
        calibrate_threshold(scores, 1.0)


def test_reject_marks_novel_and_nan_cells():
    out = reject(np.array(["a", "b", "c"]), np.array([0.1, 0.9, np.nan]), 0.5)
    assert out.tolist() == ["a", UNKNOWN, UNKNOWN]
