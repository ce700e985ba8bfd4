"""Train and apply CellTypist inside its own environment (run as a script by :mod:`spikgpt.bench.baselines`).

CellTypist 1.7.1 breaks on scikit-learn >= 1.8, so it lives in a separate virtual environment
and this file must only import what that environment has (no spikgpt, no torch).

Usage: python celltypist_runner.py REF.h5ad QUERY.h5ad LABEL_KEY OUT.csv USE_RAW(0|1) SEED
"""

import json
import resource
import sys
import time

import anndata as ad
import numpy as np
import pandas as pd

if __package__:  # imported as spikgpt.bench.<runner> (tests)
    from spikgpt.bench.peer_io import log1p_cp10k
else:  # run as a script in the peer's own environment, which has no spikgpt
    from peer_io import log1p_cp10k


def main() -> None:  # noqa: D103
    import celltypist

    ref_path, query_path, label_key, out, use_raw, seed = sys.argv[1:7]
    use_raw = use_raw == "1"
    ref, query = ad.read_h5ad(ref_path), ad.read_h5ad(query_path)
    r, q = log1p_cp10k(ref, use_raw), log1p_cp10k(query, use_raw)
    np.random.seed(int(seed))
    t0 = time.perf_counter()
    model = celltypist.train(r, labels=ref.obs[label_key].astype(str).to_numpy(), n_jobs=1, check_expression=False)
    t1 = time.perf_counter()
    pred = celltypist.annotate(q, model, majority_voting=False, mode="best match")
    t2 = time.perf_counter()
    probs = pred.probability_matrix
    prob_match = celltypist.annotate(q, model, majority_voting=False, mode="prob match", p_thres=0.5)
    labels = prob_match.predicted_labels["predicted_labels"].astype(str)
    df = pd.DataFrame(
        {
            "raw_label": pred.predicted_labels["predicted_labels"].astype(str).to_numpy(),
            "label": np.where(labels == "Unassigned", "Unknown", labels),
            "confidence": probs.max(axis=1).to_numpy(),
        },
        index=query.obs_names,
    )
    df.to_csv(out)
    info = {
        "train_seconds": t1 - t0,
        "predict_seconds": t2 - t1,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(info))


if __name__ == "__main__":
    main()
