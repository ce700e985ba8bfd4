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

import sys
import time

import numpy as np

if __package__:  # imported as spikgpt.bench.<runner> (tests)
    from spikgpt.bench.peer_io import PeerJob
else:  # run as a script in the peer's own environment, which has no spikgpt
    from peer_io import PeerJob


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

    job = PeerJob.from_argv(sys.argv[1:])
    # SingleR takes genes × cells.
    R, Q = np.ascontiguousarray(job.ref.X.T.toarray()), np.ascontiguousarray(job.query.X.T.toarray())
    t0 = time.perf_counter()
    res = singler.annotate_single(
        Q, R, job.labels.tolist(), test_features=list(job.query.var_names), ref_features=list(job.ref.var_names)
    )
    t1 = time.perf_counter()
    best = np.asarray(res.get_column("best"), dtype=object).astype(str)
    delta = np.asarray(res.get_column("delta"), dtype=np.float64)
    # SingleR has no separate training step: marker selection and scoring run in one call.
    job.write(best, np.where(pruned(best, delta), "Unknown", best), delta, 0.0, t1 - t0)


if __name__ == "__main__":
    main()
