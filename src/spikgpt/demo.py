"""``spikgpt demo``: the whole job on scanpy's bundled ``pbmc68k_reduced`` (no download).

One cell type is held out of training entirely; the model is trained on a stratified 70 % of
the other cells and annotates the remaining 30 % plus every cell of the held-out type.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scanpy as sc
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from spikgpt.api import annotate, train
from spikgpt.bench.figures import query_umap
from spikgpt.bench.metrics import closed_set, open_set
from spikgpt.data import Cells, write_h5ad_atomic

logger = logging.getLogger("spikgpt")

LABEL_KEY = "bulk_labels"


@dataclass(frozen=True)
class DemoResult:
    """Numbers printed by the demo (all on the query)."""

    spikgpt: dict
    spikgpt_after_rejection: dict
    logistic_regression: dict
    open_set: dict
    held_out: str
    train_seconds: float
    annotate_seconds: float
    files: dict


def run_demo(out: str | Path, *, held_out: str = "CD34+", seed: int = 0, progress: bool = True) -> DemoResult:
    """Run the demo and write its files into ``out``.

    Parameters
    ----------
    out
        Output folder (model, annotated query, UMAP figure, ``metrics.json``).
    held_out
        The cell type kept out of training.
    seed
        Seed of the split and the model.
    progress
        Show progress bars.

    Returns
    -------
    The numbers printed by ``spikgpt demo``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    adata = sc.datasets.pbmc68k_reduced()
    labels = adata.obs[LABEL_KEY].astype(str).to_numpy()
    if held_out not in set(labels):
        msg = f"{held_out!r} is not a cell type of pbmc68k_reduced; choose one of {sorted(set(labels))}."
        raise ValueError(msg)
    known_idx = np.flatnonzero(labels != held_out)
    ref_idx, query_known = train_test_split(known_idx, test_size=0.3, stratify=labels[known_idx], random_state=seed)
    query_idx = np.sort(np.concatenate([query_known, np.flatnonzero(labels == held_out)]))
    # X of pbmc68k_reduced is scaled; its log-normalised values are in .raw.
    ref, query = adata[np.sort(ref_idx)].copy(), adata[query_idx].copy()

    model = train(ref, LABEL_KEY, use_raw=True, seed=seed, progress=progress)
    model.save(out / "model", overwrite=True)
    annotate(query, model, use_raw=True)
    y = query.obs[LABEL_KEY].astype(str).to_numpy()
    known = model.classes

    # Logistic regression on the very same (standardised) embedding, trained on the reference.
    E_ref = model.standardise(model.embedder.transform(Cells(ref, use_raw=True)))
    E_query = model.standardise(query.obsm["X_spikgpt_embedding"])
    lr = LogisticRegression(max_iter=2000, random_state=seed).fit(E_ref, ref.obs[LABEL_KEY].astype(str))
    result = DemoResult(
        spikgpt=closed_set(y, query.obs["spikgpt_raw_label"], known),
        spikgpt_after_rejection=closed_set(y, query.obs["spikgpt_label"], known),
        logistic_regression=closed_set(y, lr.predict(E_query), known),
        open_set=open_set(
            y, query.obs["spikgpt_label"], -np.log10(query.obs["spikgpt_pvalue"].clip(lower=1e-300)), known
        ),
        held_out=held_out,
        train_seconds=model.summary["train_seconds"],
        annotate_seconds=query.uns["spikgpt"]["seconds"],
        files={},
    )
    files = {
        "model": str(out / "model"),
        "annotated_query": str(write_h5ad_atomic(query, out / "query_annotated.h5ad", overwrite=True)),
        "umap": str(query_umap(query, LABEL_KEY, out / "umap.png", seed=seed)),
        "metrics": str(out / "metrics.json"),
    }
    result.files.update(files)
    (out / "metrics.json").write_text(json.dumps(result.__dict__, indent=1))
    return result
