"""Novelty scores: is a query cell of a type the reference never contained.

Every score is "higher = more novel" and is computed from the trained model only:

``max_prob``
    1 − the softmax maximum of the time-averaged logits.
``energy``
    −logsumexp of the time-averaged logits (Liu et al. 2020).
``knn_latent`` / ``knn_embedding``
    Mean distance to the k nearest reference cells, in the model's latent space (time- and
    token-averaged output spike rates before the head) or in the standardised input embedding.
    The reference is represented by a stratified random sample of at most
    ``max_reference_cells`` cells (default 5,000: a few MB and milliseconds per thousand query
    cells for a 500,000-cell reference).
``mahalanobis_latent`` / ``mahalanobis_embedding``
    Smallest class-conditional Mahalanobis distance with a shared (shrunk) covariance.
``firing``
    Distance of the cell's per-layer firing-rate profile from the mean profile of its predicted
    class, in units of that class's spread.

``combined`` turns each chosen score into its percentile among held-out calibration cells and
takes the maximum: a cell is Unknown when *some* signal is more extreme than for all but
``target_frr`` of new cells of known types; ``obs["spikgpt_unknown_reason"]`` names it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from sklearn.neighbors import NearestNeighbors

from spikgpt.openset.scores import confidence_from_logits

SCORES = (
    "max_prob",
    "energy",
    "knn_latent",
    "knn_embedding",
    "mahalanobis_latent",
    "mahalanobis_embedding",
    "firing",
)
DEFAULT_COMBINATION = ("knn_embedding", "mahalanobis_embedding")
K_NEIGHBOURS = 10


@dataclass
class CellOutputs:
    """What the model computes for n cells, from which every score derives."""

    logits: torch.Tensor  # [T, n, C]
    latent: np.ndarray  # [n, D] time- and token-averaged output spike rates
    embedding: np.ndarray  # [n, d] standardised input embedding
    firing: np.ndarray  # [n, n_layers] firing rate of every spiking layer

    @property
    def probs(self) -> np.ndarray:  # noqa: D102
        return confidence_from_logits(self.logits)[0]


class NoveltyScorer:
    """Reference statistics and calibration of the novelty scores.

    Parameters
    ----------
    max_reference_cells
        Size of the stratified reference sample kept for the kNN scores.
    k
        Neighbours of the kNN scores.
    """

    def __init__(self, max_reference_cells: int = 5000, k: int = K_NEIGHBOURS) -> None:
        self.max_reference_cells, self.k = max_reference_cells, k
        self.state: dict[str, np.ndarray] = {}
        self._nn: dict[str, NearestNeighbors] = {}
        self._sorted: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ fitting
    def fit(self, out: CellOutputs, y: np.ndarray, *, seed: int = 0) -> NoveltyScorer:
        """Collect reference statistics from the cells the classifier was fitted on."""
        rng = np.random.default_rng(seed)
        keep = np.arange(len(y))
        if len(y) > self.max_reference_cells:
            share = self.max_reference_cells / len(y)
            keep = np.sort(
                np.concatenate(
                    [
                        rng.choice(idx, max(1, int(round(share * len(idx)))), replace=False)
                        for idx in (np.flatnonzero(y == c) for c in np.unique(y))
                    ]
                )
            )
        s = self.state
        s["ref_latent"] = out.latent[keep].astype(np.float32)
        s["ref_embedding"] = out.embedding[keep].astype(np.float32)
        for space in ("latent", "embedding"):
            X = getattr(out, space)
            means = np.stack([X[y == c].mean(0) for c in range(y.max() + 1)])
            centred = X - means[y]
            s[f"means_{space}"] = means.astype(np.float32)
            s[f"precision_{space}"] = LedoitWolf().fit(centred).precision_.astype(np.float32)
        n_cls = y.max() + 1
        s["firing_mean"] = np.stack([out.firing[y == c].mean(0) for c in range(n_cls)]).astype(np.float32)
        s["firing_std"] = np.stack([out.firing[y == c].std(0) + 0.02 for c in range(n_cls)]).astype(np.float32)
        self._nn = {}
        return self

    def calibrate(self, out: CellOutputs) -> None:
        """Store every score of held-out reference cells, for percentiles and thresholds."""
        for name, v in self.raw_scores(out).items():
            self.state[f"cal_{name}"] = v.astype(np.float32)
        self._sorted = {}

    def threshold(self, method: str, components: tuple[str, ...], target_frr: float) -> float:
        """Novelty above which a share ``target_frr`` of the calibration cells lies."""
        from spikgpt.openset.calibration import calibrate_threshold

        cal = {n: self.state[f"cal_{n}"] for n in SCORES}
        novelty, _ = self.combine(cal, method, components)
        return calibrate_threshold(novelty, target_frr)

    # ------------------------------------------------------------------ scoring
    def _knn(self, space: str, X: np.ndarray) -> np.ndarray:
        if space not in self._nn:
            ref = self.state[f"ref_{space}"]
            self._nn[space] = NearestNeighbors(n_neighbors=min(self.k, len(ref))).fit(ref)
        dist, _ = self._nn[space].kneighbors(X)
        return dist.mean(axis=1)

    def _mahalanobis(self, space: str, X: np.ndarray) -> np.ndarray:
        means, prec = self.state[f"means_{space}"], self.state[f"precision_{space}"]
        d = X[:, None, :] - means[None]  # [n, C, D]
        return np.sqrt(np.einsum("ncd,de,nce->nc", d, prec, d).min(axis=1).clip(min=0))

    def raw_scores(self, out: CellOutputs) -> dict[str, np.ndarray]:
        """Every score for every cell (higher = more novel)."""
        probs = out.probs
        pred = probs.argmax(axis=1)
        mean_logits = out.logits.mean(0)
        z = (out.firing - self.state["firing_mean"][pred]) / self.state["firing_std"][pred]
        return {
            "max_prob": 1 - probs.max(axis=1),
            "energy": -torch.logsumexp(mean_logits, dim=1).numpy(),
            "knn_latent": self._knn("latent", out.latent),
            "knn_embedding": self._knn("embedding", out.embedding),
            "mahalanobis_latent": self._mahalanobis("latent", out.latent),
            "mahalanobis_embedding": self._mahalanobis("embedding", out.embedding),
            "firing": np.sqrt((z**2).mean(axis=1)),
        }

    def percentile(self, name: str, values: np.ndarray) -> np.ndarray:
        """Share of calibration cells whose score ``name`` is below ``values`` (0..1)."""
        if name not in self._sorted:
            self._sorted[name] = np.sort(self.state[f"cal_{name}"])
        cal = self._sorted[name]
        return np.searchsorted(cal, values, side="left") / len(cal)

    def combine(
        self, raw: dict[str, np.ndarray], method: str, components: tuple[str, ...]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Novelty in [0, 1] from raw scores, and per cell the score responsible.

        Parameters
        ----------
        raw
            Output of :meth:`raw_scores`.
        method
            A name from :data:`SCORES` (its percentile) or ``"combined"``.
        components
            The scores ``combined`` takes the maximum percentile of.
        """
        names = components if method == "combined" else (method,)
        unknown = [n for n in names if n not in SCORES]
        if unknown:
            msg = f"Unknown novelty score(s) {unknown}; choose from {('combined', *SCORES)}."
            raise ValueError(msg)
        P = np.stack([self.percentile(n, raw[n]) for n in names], axis=1)
        best = P.argmax(axis=1)
        return P[np.arange(len(P)), best], np.asarray(names, dtype=object)[best]

    def arrays(self) -> dict[str, np.ndarray]:  # noqa: D102
        return dict(self.state)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], max_reference_cells: int, k: int) -> NoveltyScorer:
        """Rebuild from :meth:`arrays` (keys as saved)."""
        scorer = cls(max_reference_cells, k)
        scorer.state = dict(arrays)
        return scorer
