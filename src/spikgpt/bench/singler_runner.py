"""Train and apply SingleR inside its own environment (run as a script by :mod:`spikgpt.bench.baselines`).

The ``singler`` bindings (BiocPy) bring their own stack of packages, so SingleR lives in a
separate virtual environment and this file must only import what that environment has (no
spikgpt, no torch, no scanpy).

Protocol (``shared/reference/peers.md``): ``singler.annotate_single`` on log1p counts per
10,000 (genes × cells, dense), default marker selection; the label is ``best``. SingleR's own
rejection is R's ``pruneScores`` default, emulated: per assigned label, a cell whose ``delta``
(its best score minus the median of its scores) is below the median − 3 MAD of that label's
deltas is pruned (here: ``Unknown``).

Usage: python singler_runner.py REF.h5ad QUERY.h5ad LABEL_KEY OUT.csv USE_RAW(0|1) SEED
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


def pruned(labels: np.ndarray, delta: np.ndarray, nmads: float = 3.0) -> np.ndarray:
    """``pruneScores``: per label, delta below median − nmads × MAD (R's scaled MAD)."""
    out = np.zeros(len(labels), dtype=bool)
    for lab in np.unique(labels):
        idx = labels == lab
        d = delta[idx]
        med = np.median(d)
        mad = 1.4826 * np.median(np.abs(d - med))
        out[idx] = d < med - nmads * mad
    return out


def main() -> None:  # noqa: D103
    import singler

    ref_path, query_path, label_key, out, use_raw, _seed = sys.argv[1:7]
    use_raw = use_raw == "1"
    ref, query = ad.read_h5ad(ref_path), ad.read_h5ad(query_path)
    r, q = log1p_cp10k(ref, use_raw), log1p_cp10k(query, use_raw)
    # SingleR takes genes × cells.
    R, Q = np.ascontiguousarray(r.X.T.toarray()), np.ascontiguousarray(q.X.T.toarray())
    r_genes, q_genes = list(r.var_names), list(q.var_names)
    t0 = time.perf_counter()
    res = singler.annotate_single(
        Q, R, ref.obs[label_key].astype(str).tolist(), test_features=q_genes, ref_features=r_genes
    )
    t1 = time.perf_counter()
    best = np.asarray(res.get_column("best"), dtype=object).astype(str)
    delta = np.asarray(res.get_column("delta"), dtype=np.float64)
    df = pd.DataFrame(
        {"raw_label": best, "label": np.where(pruned(best, delta), "Unknown", best), "confidence": delta},
        index=query.obs_names,
    )
    df.to_csv(out)
    # SingleR has no separate training step: marker selection and scoring run in one call.
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info = {"train_seconds": 0.0, "predict_seconds": t1 - t0, "peak_rss_mb": rss_mb}
    print(json.dumps(info))


if __name__ == "__main__":
    main()
