import numpy as np
import pytest

from spikgpt.model.training import stratified_folds, stratified_split


def test_folds_are_stratified_balanced_and_keep_rare_types_in_every_fold():
    y = np.repeat([0, 1, 2, 3], [50, 23, 4, 1])
    fold = stratified_folds(y, 5, min_cells=5, seed=0)
    assert (fold[y >= 2] == -1).all()  # the 4-cell and 1-cell types are never held out
    sizes = np.bincount(fold[fold >= 0])
    assert len(sizes) == 5 and sizes.max() - sizes.min() <= 1
    for c in (0, 1):
        per_fold = np.bincount(fold[y == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
    np.testing.assert_array_equal(fold, stratified_folds(y, 5, min_cells=5, seed=0))
    assert not np.array_equal(fold, stratified_folds(y, 5, min_cells=5, seed=1))


@pytest.mark.parametrize("fraction", [0.0, 0.2])
def test_split_holds_out_the_share_and_never_a_rare_type(fraction):
    y = np.repeat([0, 1, 2], [100, 50, 3])
    kept, held = stratified_split(y, fraction, min_cells=5, seed=0)
    assert len(np.intersect1d(kept, held)) == 0 and len(kept) + len(held) == len(y)
    assert len(held) == round(fraction * 150) and not (y[held] == 2).any()
