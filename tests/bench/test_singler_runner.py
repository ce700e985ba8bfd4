import numpy as np

from spikgpt.bench.singler_runner import pruned


def test_prune_scores_flags_low_delta_per_label():
    labels = np.array(["A"] * 50 + ["B"] * 50)
    delta = np.r_[np.linspace(0.9, 1.1, 50), np.linspace(0.18, 0.22, 50)]  # MAD 0.05 and 0.01
    delta[3], delta[60] = 0.5, 0.1  # far below their own label's deltas
    out = pruned(labels, delta)
    assert out[3] and out[60] and out.sum() == 2  # 0.1 is not low for A, only for B
