"""Gene attributions: integrated gradients from genes to the time-averaged logit.

The path genes → default embedder → spiking transformer → time-averaged logit is differentiated
end to end, through the LIF neurons by their surrogate gradient. The default embedder is linear
in the scaled gene values ``z`` (``E = z Wᵀ``, clipping aside), so integrated gradients along the
straight path from the reference mean (``z = 0``) to the cell are computed on the embedding and
mapped back exactly: ``attr_g = z_g · Σ_k W_kg · ḡ_k / s_k`` where ``ḡ`` is the path-averaged
gradient with respect to the standardised embedding and ``s`` the embedding scale. For other
embedders (``obsm:``, ``scgpt:``) attributions are given per embedding dimension instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spikgpt.data import Cells
from spikgpt.embed.default import DefaultEmbedder
from spikgpt.model.annotator import SpikGPTModel


@dataclass
class Attributions:
    """Per-cell attributions towards each cell's predicted class."""

    values: np.ndarray  # [n, F] attribution per feature
    features: np.ndarray  # [F] gene names, or "dim_k" for embedding dimensions
    predicted: np.ndarray  # [n] predicted class index
    to_genes: bool
    direction: np.ndarray  # [n, F] int8: +1 input above the baseline (reference mean), −1 below, 0 at it


#: What an attribution is measured against, in words (the integrated-gradient path's start).
BASELINE = "the reference mean of every gene (scaled value 0)"
#: The three kinds of evidence :func:`top_features` reports.
EVIDENCE = {
    "above": "expressed above the reference mean, and that supports the call",
    "below": "expressed below the reference mean, and that supports the call (absence as evidence)",
    "against": "speaks against the call (either direction)",
}


def _integrated_gradients(model: SpikGPTModel, Z: np.ndarray, target: np.ndarray, steps: int) -> np.ndarray:
    """Path-averaged gradient of the target's time-averaged logit w.r.t. the standardised embedding."""
    net = model.network.eval()
    base = torch.as_tensor(model.standardise(np.zeros((1, Z.shape[1]), np.float32)))
    x = torch.as_tensor(Z)
    grads = torch.zeros_like(x)
    idx = torch.as_tensor(target)
    for alpha in (np.arange(steps) + 0.5) / steps:
        point = (base + float(alpha) * (x - base)).requires_grad_(True)
        logit = net(point).mean(0).gather(1, idx[:, None]).sum()
        (g,) = torch.autograd.grad(logit, point)
        grads += g
    return (grads / steps).numpy()


def gene_attributions(model: SpikGPTModel, cells: Cells, *, steps: int = 16, batch_size: int = 512) -> Attributions:
    """Integrated-gradient attributions of every cell towards its predicted class.

    Parameters
    ----------
    model
        A trained model.
    cells
        The cells to explain.
    steps
        Riemann steps of the integrated-gradient path.
    batch_size
        Cells per backward pass.

    Returns
    -------
    :class:`Attributions` (per gene for the default embedder, else per embedding dimension).
    """
    E = model.embedder.transform(cells)
    Z = model.standardise(E)
    pred = model.outputs(E).probs.argmax(axis=1)
    emb = model.embedder
    to_genes = isinstance(emb, DefaultEmbedder)
    if to_genes:
        X, present = cells.aligned(emb.genes)
    out, signs = [], []
    for s in range(0, len(Z), batch_size):
        g = _integrated_gradients(model, Z[s : s + batch_size], pred[s : s + batch_size], steps)
        if to_genes:
            z = emb._scale(emb._values(X[s : s + batch_size]), emb.mean, emb.std)  # what the embedder reads
            z[:, ~present] = 0.0
            out.append(z * ((g / model.input_std) @ emb.components))
        else:
            z = Z[s : s + batch_size] - model.standardise(np.zeros((1, Z.shape[1]), np.float32))
            out.append(g * z)
        signs.append(np.sign(z).astype(np.int8))
    n_feat = len(emb.genes) if to_genes else Z.shape[1]
    values = np.concatenate(out) if out else np.zeros((0, n_feat))
    direction = np.concatenate(signs) if signs else np.zeros((0, n_feat), np.int8)
    features = np.asarray(emb.genes) if to_genes else np.array([f"dim_{k}" for k in range(Z.shape[1])])
    return Attributions(values.astype(np.float32), features, pred, to_genes, direction)


def top_features(
    att: Attributions, classes: list[str], n_top: int = 20, evidence: str = "above"
) -> dict[str, list[tuple[str, float]]]:
    """Per class, the features that most support (or oppose) the calls of that class.

    An attribution is signed relative to :data:`BASELINE`: a gene *below* the reference mean
    can support a call (a beta-cell marker that is low in an alpha cell). The three kinds of
    :data:`EVIDENCE` are therefore reported apart, each averaged over the cells predicted as the
    class (cells where the gene is on the other side of the baseline contribute 0).

    Parameters
    ----------
    att
        Output of :func:`gene_attributions`.
    classes
        Class names, by index.
    n_top
        Features kept per class.
    evidence
        ``"above"`` (marker-like: high expression supports the call), ``"below"`` (low
        expression supports it) or ``"against"`` (most negative attributions).

    Returns
    -------
    Per class, ``(feature, mean attribution)`` ranked by strength (positive for ``above`` and
    ``below``, negative for ``against``); features with no such evidence are left out.
    """
    if evidence not in EVIDENCE:
        msg = f"evidence must be one of {list(EVIDENCE)}, got {evidence!r}."
        raise ValueError(msg)
    table = {}
    for c, name in enumerate(classes):
        rows = att.predicted == c
        if not rows.any():
            continue
        v = att.values[rows]
        if evidence == "against":
            mean = v.clip(max=0).mean(axis=0)
            order = [i for i in np.argsort(mean)[:n_top] if mean[i] < 0]
        else:
            side = att.direction[rows] == (1 if evidence == "above" else -1)
            mean = np.where(side, v, 0.0).clip(min=0).mean(axis=0)
            order = [i for i in np.argsort(-mean)[:n_top] if mean[i] > 0]
        table[name] = [(str(att.features[i]), float(mean[i])) for i in order]
    return table
