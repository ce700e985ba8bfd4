"""``obsm:KEY``: an embedding the user already computed (scGPT, Geneformer, UCE, ...)."""

from __future__ import annotations

import numpy as np

from spikgpt.data import Cells
from spikgpt.embed.base import Embedder
from spikgpt.errors import InputError


class ObsmEmbedder(Embedder):
    """Read cell embeddings from ``adata.obsm[key]``.

    Parameters
    ----------
    key
        The ``obsm`` key, e.g. ``X_scGPT``.
    """

    kind = "obsm"
    learns_from_reference = False

    def __init__(self, key: str, dim: int | None = None) -> None:
        self.key, self._dim = key, dim

    @property
    def spec(self) -> str:  # noqa: D102
        return f"obsm:{self.key}"

    @property
    def dim(self) -> int:  # noqa: D102
        if self._dim is None:
            msg = "The embedder is not fitted yet."
            raise RuntimeError(msg)
        return self._dim

    def _read(self, cells: Cells) -> np.ndarray:
        obsm = cells.adata.obsm
        if self.key not in obsm:
            msg = (
                f"obsm[{self.key!r}] not found; available keys: {list(obsm)}. Compute the "
                "embedding first (e.g. `spikgpt embed --scgpt PATH`) or choose another key."
            )
            raise InputError(msg)
        E = np.asarray(obsm[self.key], dtype=np.float32)
        if E.ndim != 2:
            msg = f"obsm[{self.key!r}] must be 2-D (cells × dims), got shape {E.shape}."
            raise InputError(msg)
        # A row of NaN marks a cell its embedder could not embed (e.g. scGPT, no vocabulary
        # gene): such cells are left out of training and called Unknown. Anything else is bad.
        bad = ~np.isfinite(E) & ~np.isnan(E).all(axis=1, keepdims=True)
        if bad.any():
            msg = (
                f"obsm[{self.key!r}] holds inf or partly-NaN rows ({int(bad.any(axis=1).sum())} cells); "
                "recompute the embedding or drop those cells."
            )
            raise InputError(msg)
        return E

    def fit(self, cells: Cells, *, seed: int = 0, labels: np.ndarray | None = None) -> ObsmEmbedder:  # noqa: D102
        self._dim = self._read(cells).shape[1]
        return self

    def transform(self, cells: Cells) -> np.ndarray:  # noqa: D102
        E = self._read(cells)
        if E.shape[1] != self.dim:
            msg = (
                f"obsm[{self.key!r}] has {E.shape[1]} dimensions but the model was trained on "
                f"{self.dim}. Embed the query with the same embedder as the reference."
            )
            raise InputError(msg)
        return E

    def config(self) -> dict:  # noqa: D102
        return {"kind": self.kind, "key": self.key, "dim": self._dim}

    @classmethod
    def from_state(cls, config: dict, arrays: dict[str, np.ndarray]) -> ObsmEmbedder:  # noqa: D102
        return cls(config["key"], config["dim"])
