"""``spikgpt.explain``: attributions, spike-attention maps, firing rates, raster; files and summary."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from spikgpt.data import Cells, read
from spikgpt.explain.attribution import BASELINE, EVIDENCE, gene_attributions, top_features
from spikgpt.model.annotator import SpikGPTModel
from spikgpt.snn import LIF, SpikingSelfAttention


def attention_maps(model: SpikGPTModel, Z: np.ndarray, predicted: np.ndarray) -> dict[str, np.ndarray]:
    """Per class, token-to-token attention ``[blocks, heads, N, N]`` averaged over time and cells.

    ``blocks`` runs over every block of the ensemble's first network, then its second, and so on.
    """
    net = model.network.eval()
    blocks = [m for m in net.modules() if isinstance(m, SpikingSelfAttention)]
    sums = dict.fromkeys(np.unique(predicted), 0)
    for b in blocks:
        b.record_attention = True
    try:
        with torch.inference_mode():
            net(torch.as_tensor(Z))
            maps = torch.stack([b.last_attention.mean(0) for b in blocks], dim=1).numpy()  # [B, L, H, N, N]
    finally:
        for b in blocks:
            b.record_attention, b.last_attention = False, None
    for c in sums:
        sums[c] = maps[predicted == c].mean(axis=0)
    return {model.classes[c]: v for c, v in sums.items()}


def spike_raster(model: SpikGPTModel, z: np.ndarray) -> np.ndarray:
    """Output-layer spikes of one cell in the ensemble's first network, ``[T, N × D]``."""
    net = model.network.members[0].eval()
    lif = net.out_lif
    captured = {}
    hook = lif.register_forward_hook(lambda _m, _i, o: captured.setdefault("s", o))
    try:
        with torch.inference_mode():
            net(torch.as_tensor(z[None]))
    finally:
        hook.remove()
    s = captured["s"][:, 0]  # [T, N, D]
    return s.reshape(s.shape[0], -1).numpy()


def firing_by_class(model: SpikGPTModel, E: np.ndarray, predicted: np.ndarray) -> pd.DataFrame:
    """Mean firing rate of every spiking layer (columns) per predicted class (rows)."""
    out = model.outputs(E)
    names = [n for n, m in model.network.named_modules() if isinstance(m, LIF | torch.nn.ReLU)]
    df = pd.DataFrame(out.firing, columns=names)
    df["class"] = np.asarray(model.classes)[predicted]
    return df.groupby("class").mean()


def explain(
    adata: ad.AnnData | str | os.PathLike,
    model: SpikGPTModel | str | os.PathLike,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    gene_key: str | None = None,
    n_top: int = 20,
    cells: list[str] | None = None,
    out: str | os.PathLike | None = None,
    key_added: str = "spikgpt_explain",
) -> dict:
    """Explain a model's calls on ``adata``.

    Writes ``uns[key_added]`` with ``top_genes`` (per class: ranked features and their mean
    attribution), ``feature_kind`` (``"gene"`` or ``"embedding dimension"``), ``attention``
    (per class ``[blocks, heads, N, N]``), ``firing_rates`` (per class and layer) and, for the
    cells named in ``cells``, their per-feature attributions. With ``out``, also writes
    ``top_genes.csv``, ``attributions_heatmap.png``, ``attention.png``, ``raster.png`` and
    ``summary.md`` there.

    Parameters
    ----------
    adata
        Cells to explain (AnnData or ``.h5ad``).
    model
        Model or model folder.
    layer, use_raw, gene_key
        Expression source and gene names.
    n_top
        Features kept per class.
    cells
        ``obs_names`` whose per-cell attributions are kept (the first cell's raster is drawn).
    out
        Folder for files; none written when ``None``.
    key_added
        ``uns`` key.

    Returns
    -------
    The dict written to ``uns[key_added]``.
    """
    adata = read(adata)
    model = SpikGPTModel.coerce(model)
    c = Cells(adata, layer=layer, use_raw=use_raw, gene_key=gene_key)
    att = gene_attributions(model, c)
    E = model.embedder.transform(c)
    Z = model.standardise(E)
    tops = {kind: top_features(att, model.classes, n_top, kind) for kind in EVIDENCE}
    attention = attention_maps(model, Z, att.predicted)
    firing = firing_by_class(model, E, att.predicted)
    chosen = cells or [adata.obs_names[0]]
    pos = [adata.obs_names.get_loc(name) for name in chosen]
    result = {
        "feature_kind": "gene" if att.to_genes else "embedding dimension",
        "baseline": BASELINE,
        **{
            "top_genes" + ("" if kind == "above" else f"_{kind}"): {
                k: {"feature": [f for f, _ in v], "attribution": np.array([a for _, a in v])} for k, v in t.items()
            }
            for kind, t in tops.items()
        },
        "attention": attention,
        "firing_rates": {k: firing.loc[k].to_dict() for k in firing.index},
        "cells": {
            name: dict(zip(att.features.tolist(), att.values[p].tolist(), strict=True))
            for name, p in zip(chosen, pos, strict=True)
        }
        if cells
        else {},
    }
    adata.uns[key_added] = result
    if out is not None:
        _write_files(Path(out), result, tops, model, Z[pos[0]], chosen[0])
    return result


def _write_files(out: Path, result: dict, tops: dict, model: SpikGPTModel, z: np.ndarray, cell: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rows = [
        {"cell_type": k, "evidence": kind, "rank": i + 1, "feature": f, "mean_attribution": a}
        for kind, top in tops.items()
        for k, v in top.items()
        for i, (f, a) in enumerate(v)
    ]
    pd.DataFrame(rows).to_csv(out / "top_genes.csv", index=False)
    top = tops["above"]

    genes = list(dict.fromkeys(f for v in top.values() for f, _ in v[:5]))
    heat = pd.DataFrame(0.0, index=genes, columns=list(top))
    for k, v in top.items():
        for f, a in v:
            if f in heat.index:
                heat.loc[f, k] = a
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * heat.shape[1], 1.5 + 0.25 * heat.shape[0]))
    im = ax.imshow(
        heat.to_numpy(), cmap="RdBu_r", aspect="auto", vmin=-np.abs(heat.values).max(), vmax=np.abs(heat.values).max()
    )
    ax.set_xticks(range(heat.shape[1]), heat.columns, rotation=45, ha="right")
    ax.set_yticks(range(heat.shape[0]), heat.index, fontsize=7)
    ax.set_xlabel("predicted cell type")
    ax.set_ylabel(result["feature_kind"])
    ax.set_title("genes above the reference mean that support the call (top 5 per class)")
    fig.colorbar(im, ax=ax, label="integrated gradient")
    fig.tight_layout()
    fig.savefig(out / "attributions_heatmap.png", dpi=110)
    plt.close(fig)

    classes = list(result["attention"])
    L, H = next(iter(result["attention"].values())).shape[:2]
    fig, axes = plt.subplots(len(classes), L * H, figsize=(1.8 * L * H + 1, 1.6 * len(classes) + 0.5), squeeze=False)
    for i, k in enumerate(classes):
        for l_ in range(L):
            for h in range(H):
                ax = axes[i, l_ * H + h]
                ax.imshow(result["attention"][k][l_, h], cmap="viridis")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"block {l_} head {h}", fontsize=7)
                if l_ == 0 and h == 0:
                    ax.set_ylabel(k, fontsize=7, rotation=0, ha="right")
    fig.suptitle("spike attention Q·Kᵀ (query token → key token), mean over time and cells of each class")
    fig.tight_layout()
    fig.savefig(out / "attention.png", dpi=100)
    plt.close(fig)

    raster = spike_raster(model, z)
    fig, ax = plt.subplots(figsize=(8, 2.5))
    t, n = np.nonzero(raster)
    ax.scatter(n, t, marker="|", s=60, color="black")
    ax.set_xlabel("output neuron (token × channel)")
    ax.set_ylabel("time step")
    ax.set_yticks(range(raster.shape[0]))
    ax.set_title(f"output-layer spikes of cell {cell}")
    fig.tight_layout()
    fig.savefig(out / "raster.png", dpi=110)
    plt.close(fig)

    lines = [
        f"# Why spikgpt called these cells what it did ({result['feature_kind']} attributions)",
        "",
        f"Integrated gradients from {BASELINE} to each cell, towards its predicted class.",
    ]
    for kind, title in EVIDENCE.items():
        lines += ["", f"## {result['feature_kind'].capitalize()}s {title}", ""]
        for k, v in tops[kind].items():
            lines.append(f"- **{k}**: " + (", ".join(f for f, _ in v[:10]) or "none"))
    lines += ["", "Files: top_genes.csv (column evidence), attributions_heatmap.png, attention.png, raster.png."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
