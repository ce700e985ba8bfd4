"""Input and output of the peers' runner scripts: imports only anndata, numpy, pandas and scipy.

Each peer runs in its own virtual environment without spikgpt; its runner script imports this
file from beside it (``from peer_io import …``), and the package imports it as
``spikgpt.bench.peer_io``.
"""

import json
import resource
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def counts(a: ad.AnnData, use_raw: bool) -> ad.AnnData:
    """Cells × genes (CSR, float32) counts of ``a`` (or ``a.raw``), ``obs`` kept.

    Log values are turned back into counts (``expm1``): depth-normalised values where a dataset
    ships only those, which count-based peers round (``shared/reference/peers.md``).
    """
    X = sp.csr_matrix(a.raw.X if use_raw else a.X, dtype=np.float32, copy=True)
    names = a.raw.var_names if use_raw else a.var_names
    if not np.all(X.data == np.round(X.data)):
        X.data = np.expm1(X.data)
    return ad.AnnData(X, obs=a.obs.copy(), var=pd.DataFrame(index=names))


def log1p_cp10k(a: ad.AnnData, use_raw: bool) -> ad.AnnData:
    """Cells × genes (CSR, float32) log1p counts per 10,000 of ``a`` (or ``a.raw``), ``obs`` kept.

    Log values are turned back into counts first (:func:`counts`), as the peers expect
    counts-derived log1p CP10K over all genes.
    """
    c = counts(a, use_raw)
    X = c.X
    totals = np.asarray(X.sum(axis=1)).ravel()
    X = sp.diags((1e4 / np.maximum(totals, 1e-12)).astype(np.float32)) @ X
    X.data = np.log1p(X.data)
    return ad.AnnData(X.tocsr(), obs=c.obs, var=c.var)


@dataclass
class PeerJob:
    """What :func:`spikgpt.bench.baselines.run_peer` passes a runner on its command line."""

    ref: ad.AnnData  # log1p CP10K (or counts, see from_argv), obs with the label column
    query: ad.AnnData  # the same values as ref
    labels: np.ndarray  # reference labels as strings
    out: str
    seed: int
    options: tuple[str, ...] = ()  # the peer's own options (``Peer.options``)

    @classmethod
    def from_argv(cls, argv: list[str], *, values: str = "log1p_cp10k") -> "PeerJob":
        """``REF.h5ad QUERY.h5ad LABEL_KEY OUT.csv USE_RAW(0|1) SEED [OPTION ...]``.

        ``values``: ``"log1p_cp10k"`` (:func:`log1p_cp10k`) or ``"counts"`` (:func:`counts`).
        """
        ref_path, query_path, label_key, out, use_raw, seed = argv[:6]
        read = counts if values == "counts" else log1p_cp10k
        ref = read(ad.read_h5ad(ref_path), use_raw == "1")
        query = read(ad.read_h5ad(query_path), use_raw == "1")
        return cls(ref, query, ref.obs[label_key].astype(str).to_numpy(), out, int(seed), tuple(argv[6:]))

    def write(self, raw_label, label, confidence, train_seconds: float, predict_seconds: float) -> None:
        """The per-cell CSV :func:`run_peer` reads, and one JSON line of timings on stdout."""
        df = pd.DataFrame(
            {"raw_label": np.asarray(raw_label, dtype=str), "label": np.asarray(label, dtype=str)},
            index=self.query.obs_names,
        )
        df["confidence"] = np.asarray(confidence, dtype=np.float64)
        df.to_csv(self.out)
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"train_seconds": train_seconds, "predict_seconds": predict_seconds, "peak_rss_mb": rss_mb}))
