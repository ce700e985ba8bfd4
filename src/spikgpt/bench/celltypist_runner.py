"""Train and apply CellTypist inside its own environment (run as a script by :mod:`spikgpt.bench.baselines`).

CellTypist 1.7.1 breaks on scikit-learn >= 1.8, so it lives in a separate virtual environment
and this file must only import what that environment has (no spikgpt, no torch).

Usage: python celltypist_runner.py REF.h5ad QUERY.h5ad LABEL_KEY OUT.csv USE_RAW(0|1) SEED [majority]
"""

import sys
import time

import numpy as np

if __package__:  # imported as spikgpt.bench.<runner> (tests)
    from spikgpt.bench.peer_io import PeerJob
else:  # run as a script in the peer's own environment, which has no spikgpt
    from peer_io import PeerJob


def main() -> None:  # noqa: D103
    import celltypist

    job = PeerJob.from_argv(sys.argv[1:])
    np.random.seed(job.seed)
    t0 = time.perf_counter()
    model = celltypist.train(job.ref, labels=job.labels, n_jobs=1, check_expression=False)
    t1 = time.perf_counter()
    # Majority voting: CellTypist over-clusters the query (its own PCA, neighbours, Leiden) and
    # gives every cell its over-cluster's majority label.
    majority = "majority" in job.options
    column = "majority_voting" if majority else "predicted_labels"
    pred = celltypist.annotate(job.query, model, majority_voting=majority, mode="best match")
    t2 = time.perf_counter()
    prob_match = celltypist.annotate(job.query, model, majority_voting=majority, mode="prob match", p_thres=0.5)
    labels = prob_match.predicted_labels[column].astype(str).to_numpy()
    job.write(
        pred.predicted_labels[column].astype(str).to_numpy(),
        np.where(labels == "Unassigned", "Unknown", labels),
        pred.probability_matrix.max(axis=1).to_numpy(),
        t1 - t0,
        t2 - t1,
    )


if __name__ == "__main__":
    main()
