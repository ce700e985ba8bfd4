"""The methods spikgpt is compared with, all trained on the reference only."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from spikgpt.data import Cells, nullable_strings
from spikgpt.model.annotator import SpikGPTModel

logger = logging.getLogger("spikgpt")


@dataclass(frozen=True)
class Peer:
    """A peer method run in its own virtual environment (created on first use; registry access once)."""

    pins: tuple[str, ...]  # what its environment installs
    rejection: str  # how its own Unknown is made, for the tables
    runner: str = ""  # runner script and environment, when another peer's (default: the peer's name)
    options: tuple[str, ...] = ()  # passed to the runner after the common arguments
    default: bool = True  # run when no peer is named (False: minutes per task, run on request)


#: CellTypist 1.7.1 breaks on scikit-learn >= 1.8; the ``singler`` bindings bring the BiocPy stack
#: (biocframe, summarizedexperiment, mattress, knncolle, …; ~400 MB); symphonypy brings scanpy 1.11
#: and harmonypy (~850 MB with numba); scvi-tools 1.4.2 (the last for Python 3.11) brings lightning,
#: pyro and its own copy of the CPU torch wheel (~1.3 GB).
PEERS: dict[str, Peer] = {
    "celltypist": Peer(("celltypist==1.7.1", "scikit-learn<1.8"), "CellTypist: `prob match` at p < 0.5 (Unassigned)"),
    "singler": Peer(
        ("singler==0.5.0", "anndata==0.12.19"),
        "SingleR: R's `pruneScores` default (delta below median − 3 MAD of its label)",
    ),
    "symphony": Peer(("symphonypy==0.2.4",), "Symphony: none (its mapping distance is scored for AUROC only)"),
    "scanvi": Peer(
        ("torch==2.13.0", "scvi-tools==1.4.2"),
        "scANVI: none (its largest class probability is scored for AUROC only)",
        default=False,
    ),
    "celltypist_majority": Peer(
        ("celltypist==1.7.1", "scikit-learn<1.8"),
        "CellTypist with majority voting: `prob match` at p < 0.5, then the majority of each over-cluster",
        runner="celltypist",
        options=("majority",),
    ),
}


#: The peers ``spikgpt bench`` runs when none is named.
DEFAULT_PEERS = tuple(name for name, p in PEERS.items() if p.default)


def peer_runner(peer: str) -> str:
    """The runner script (``<name>_runner.py``) and environment name of ``peer``."""
    return PEERS[peer].runner or peer


@dataclass
class MethodResult:
    """Predictions of one method on a query."""

    raw_label: np.ndarray  # before any rejection
    label: np.ndarray  # with the method's own Unknown/Unassigned, where it has one
    score: np.ndarray | None  # confidence (higher = more confident) for open-set AUROC
    train_seconds: float
    predict_seconds: float
    extra: dict


def embedding_baselines(model: SpikGPTModel, ref: ad.AnnData, query: ad.AnnData, label_key: str, **input_kw) -> dict:
    """Logistic regression and kNN on spikgpt's own (standardised) embedding of the reference."""
    E_ref = model.standardise(model.embedder.transform(Cells(ref, **input_kw)))
    E_q = model.standardise(model.embedder.transform(Cells(query, **input_kw)))
    y = ref.obs[label_key].astype(str).to_numpy()
    out = {}
    for name, clf in {
        "logreg_embedding": LogisticRegression(max_iter=2000),
        "knn_embedding": KNeighborsClassifier(n_neighbors=min(15, len(y))),
    }.items():
        t0 = time.perf_counter()
        clf.fit(E_ref, y)
        t1 = time.perf_counter()
        proba = clf.predict_proba(E_q)
        pred = clf.classes_[proba.argmax(axis=1)]
        t2 = time.perf_counter()
        out[name] = MethodResult(pred, pred, proba.max(axis=1), t1 - t0, t2 - t1, {})
    return out


def peer_python(peer: str, venv: Path) -> Path:
    """The python of ``peer``'s isolated environment ``venv``, created on first use."""
    py = venv / "bin" / "python"
    if not py.exists():
        logger.info("Creating %s for %s (%s).", venv, peer, ", ".join(PEERS[peer].pins))
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PEERS[peer].pins], check=True)
    return py


def run_peer(
    peer: str, ref: ad.AnnData, query: ad.AnnData, label_key: str, *, use_raw: bool, seed: int, venv: Path
) -> MethodResult:
    """Train ``peer`` (a key of :data:`PEERS`) on the reference and annotate the query, in its own environment.

    The peer's runner script (``<peer>_runner.py`` beside this file) writes the label before and
    after the peer's own rejection and a confidence per cell.
    """
    py = peer_python(peer, venv)
    runner = Path(__file__).with_name(f"{peer_runner(peer)}_runner.py")
    with tempfile.TemporaryDirectory() as tmp:
        r, q, out = Path(tmp) / "ref.h5ad", Path(tmp) / "query.h5ad", Path(tmp) / "pred.csv"
        keep = [label_key]
        with nullable_strings():
            ad.AnnData(ref.X, obs=ref.obs[keep], var=ref.var[[]], raw=ref.raw).write_h5ad(r)
            ad.AnnData(query.X, obs=pd.DataFrame(index=query.obs_names), var=query.var[[]], raw=query.raw).write_h5ad(q)
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(
            [
                str(py),
                str(runner),
                str(r),
                str(q),
                label_key,
                str(out),
                str(int(use_raw)),
                str(seed),
                *PEERS[peer].options,
            ],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if proc.returncode != 0:
            msg = f"{peer} failed:\n{proc.stderr[-2000:]}"
            raise RuntimeError(msg)
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        df = pd.read_csv(out, index_col=0, keep_default_na=False)
    return MethodResult(
        df["raw_label"].astype(str).to_numpy(),
        df["label"].astype(str).to_numpy(),
        df["confidence"].to_numpy(),
        info["train_seconds"],
        info["predict_seconds"],
        {"peak_rss_mb": info["peak_rss_mb"]},
    )
