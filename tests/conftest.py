from __future__ import annotations

import os

import anndata as ad
import pytest
from synthetic import FAST, synthetic_counts


@pytest.fixture(autouse=True, scope="session")
def _pandas_3_strings():
    """Tests write their inputs as a user of pandas >= 3 must: opting in to anndata's string arrays."""
    with ad.settings.override(allow_write_nullable_strings=True):
        yield


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_worker():
    """Under pytest-xdist (``make test``: a worker per core), torch and BLAS get one thread each.

    Training already runs on one thread (``TrainConfig.num_threads``); inference and the embedder
    would take every core in every worker and oversubscribe them.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture
def counts():
    return synthetic_counts({"A": 60, "B": 60, "C": 40})


@pytest.fixture(scope="session")
def trained():
    """A small model, an ensemble of two networks, trained on synthetic counts (shared: training is the slow part).

    Calibrated on held-out cells, as a reference of more than ~400 cells is by default when its
    novelty score reads a network (this one's 160 would be cross-fitted: ``crossfitted`` covers
    that path).
    """
    from dataclasses import replace

    import spikgpt

    ref = synthetic_counts({"A": 60, "B": 60, "C": 40}, seed=1)
    kw = {"train_config": replace(FAST, members=2), "calibration_folds": 1}
    return spikgpt.train(ref, "cell_type", **kw, progress=False, seed=0)


@pytest.fixture(scope="session")
def pbmc():
    import scanpy as sc

    return sc.datasets.pbmc68k_reduced()


@pytest.fixture(scope="session")
def pbmc_model(pbmc):
    """The default model on pbmc68k_reduced's ``raw`` (gene symbols)."""
    import spikgpt

    return spikgpt.train(pbmc, "bulk_labels", use_raw=True, progress=False, seed=0)


@pytest.fixture(scope="session")
def crossfitted():
    """A 100-cell reference: too few held-out cells for the p-values' tail, so ``train`` cross-fits by default."""
    from dataclasses import replace

    import spikgpt

    ref = synthetic_counts({"A": 34, "B": 33, "C": 33}, seed=3)
    return spikgpt.train(ref, "cell_type", train_config=replace(FAST, max_epochs=15), progress=False, seed=0)
