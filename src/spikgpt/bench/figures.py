"""Benchmark figures: confusion matrix, per-class F1 by method, query embedding."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def confusion(truth: np.ndarray, pred: np.ndarray, path: Path, title: str) -> Path:
    """Row-normalised confusion matrix (rows: true types, columns: predictions incl. Unknown)."""
    tab = pd.crosstab(pd.Series(truth, name="true"), pd.Series(pred, name="predicted"), normalize="index")
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * tab.shape[1], 1.0 + 0.45 * tab.shape[0]))
    im = ax.imshow(tab.to_numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(tab.shape[1]), tab.columns, rotation=45, ha="right")
    ax.set_yticks(range(tab.shape[0]), tab.index)
    for (i, j), v in np.ndenumerate(tab.to_numpy()):
        if v >= 0.01:
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.04, label="share of the true type")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def per_class_f1(table: pd.DataFrame, path: Path, title: str) -> Path:
    """Grouped bars: F1 per cell type (rows) and method (columns)."""
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(table)), 4))
    table.plot.bar(ax=ax, width=0.8)
    ax.set_ylabel("F1")
    ax.set_xlabel("cell type")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def type_palette(*columns: pd.Series) -> dict[str, str]:
    """One colour per cell type across ``columns`` (so a type looks the same in every panel); Unknown grey."""
    names = sorted({str(v) for col in columns for v in col.astype(str).unique()} - {"Unknown"})
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    palette = {n: matplotlib.colors.to_hex(cmap(i % cmap.N)) for i, n in enumerate(names)}
    return {**palette, "Unknown": "#b0b0b0"}


def query_umap(query: ad.AnnData, label_key: str, path: Path, seed: int = 0) -> Path:
    """UMAP of the query's spikgpt embedding coloured by truth, prediction and Unknown."""
    import scanpy as sc

    q = ad.AnnData(obs=query.obs[[label_key, "spikgpt_label"]].astype(str).astype("category"))
    q.obsm["X"] = query.obsm["X_spikgpt_embedding"]
    q.obs["Unknown"] = (q.obs["spikgpt_label"].astype(str) == "Unknown").map({True: "Unknown", False: "assigned"})
    sc.pp.neighbors(q, use_rep="X", random_state=seed)
    sc.tl.umap(q, random_state=seed)
    palette = type_palette(q.obs[label_key], q.obs["spikgpt_label"])
    palette["assigned"] = "#4c72b0"
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5))
    for ax, col, title in zip(
        axes, [label_key, "spikgpt_label", "Unknown"], ["truth", "spikgpt", "Unknown"], strict=True
    ):
        cats = q.obs[col].cat.categories
        sc.pl.umap(q, color=col, ax=ax, show=False, title=title, legend_fontsize=7, palette=[palette[c] for c in cats])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
