"""``default``: the built-in embedder — no download, fitted on the reference.

Genes: the reference's **marker genes** — for every ordered pair of its cell types, the 25
genes most up in the first by mean log expression (SingleR's "classic" markers, Aran et al.
2019) — plus its 500 most variable genes (scanpy, Seurat flavour) → each cell's **ranks** among
them (ties averaged, centred and scaled per cell) → standardised with the reference's mean and
s.d. (clipped at ±10) → PCA fitted on the reference (genes and components chosen on at most
50,000 cells, sampled with the seed).

Why markers and ranks (measured leave-one-dataset-out on the bench tasks; README, *Design
decisions*): genes chosen because they separate the reference's types carry less of what
separates its batches or conditions than genes chosen because they vary, and a cell's ranks
ignore any monotone per-cell distortion a protocol or batch adds (the Spearman view that makes
SingleR robust). The highly variable genes keep directions no pair of known types spans, where
a new type can show. ``default:log,hvg`` is the embedder of spikgpt ≤ 0.5.

Query genes absent from the reference are ignored; reference genes absent from the query are
set to the reference mean (0 after scaling), and the fraction found is logged (too little is an
error, see :func:`spikgpt.data.align`).
"""

from __future__ import annotations

import logging
from typing import Literal

import anndata as ad
import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA

from spikgpt.data import Cells, align
from spikgpt.embed.base import Embedder
from spikgpt.errors import InputError

logger = logging.getLogger("spikgpt")

CHUNK = 10_000
MAX_FIT_CELLS = 50_000


class DefaultEmbedder(Embedder):
    """Marker and highly variable genes → per-cell ranks → scaling → PCA.

    Parameters
    ----------
    n_genes
        Number of highly variable genes (all genes when the data has fewer).
    markers_per_pair
        Marker genes per ordered pair of cell types (0: highly variable genes only). Markers
        need the labels (``fit(..., labels=)``); without them only the highly variable genes
        are used.
    n_components
        Embedding width; capped at ``n_cells - 1`` and ``n_genes``.
    scale
        ``"reference"``: standardise every dataset with the reference's mean and s.d. (what most
        annotators do). ``"self"``: standardise each annotated dataset on its own mean and s.d. —
        robust to strong batch effects, but it assumes a similar cell-type composition.
    values
        ``"rank"``: each cell's expression replaced by its ranks among the selected genes (ties
        averaged, centred and scaled per cell — the Spearman view SingleR correlates), which
        ignores any per-cell monotone distortion of a protocol or batch. ``"log"``: log1p
        expression of the selected genes.
    """

    kind = "default"

    def __init__(
        self,
        n_genes: int = 500,
        n_components: int = 50,
        scale: Literal["reference", "self"] = "reference",
        values: Literal["log", "rank"] = "rank",
        markers_per_pair: int = 25,
    ) -> None:
        if scale not in ("reference", "self"):
            msg = f"scale must be 'reference' or 'self', got {scale!r}."
            raise InputError(msg)
        if values not in ("log", "rank"):
            msg = f"values must be 'log' or 'rank', got {values!r}."
            raise InputError(msg)
        if markers_per_pair < 0:
            msg = f"markers_per_pair must be ≥ 0, got {markers_per_pair}."
            raise InputError(msg)
        self.n_genes, self.n_components, self.scale, self.values = n_genes, n_components, scale, values
        self.markers_per_pair = markers_per_pair
        self.genes: np.ndarray | None = None
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self.components: np.ndarray | None = None

    @property
    def dim(self) -> int:  # noqa: D102
        if self.components is None:
            msg = "The embedder is not fitted yet."
            raise RuntimeError(msg)
        return self.components.shape[0]

    def _select_genes(self, X, genes: np.ndarray) -> np.ndarray:
        expressed = np.asarray((X > 0).sum(axis=0)).ravel() > 0
        if expressed.sum() <= self.n_genes:
            return genes[expressed]
        import scanpy as sc  # only when fitting: importing it costs annotation a second

        tmp = ad.AnnData(X[:, expressed])
        tmp.var_names = genes[expressed]
        sc.pp.highly_variable_genes(tmp, flavor="seurat", n_top_genes=self.n_genes)
        return np.asarray(tmp.var_names[tmp.var["highly_variable"].to_numpy()])

    def fit(self, cells: Cells, *, seed: int = 0, labels: np.ndarray | None = None) -> DefaultEmbedder:  # noqa: D102
        expr = cells.expression()
        if expr.X.shape[0] < 3:
            msg = f"The default embedder needs at least 3 reference cells, got {expr.X.shape[0]}."
            raise InputError(msg)
        # Gene selection and PCA see at most MAX_FIT_CELLS cells (seeded sample): an atlas
        # reference costs what a 50,000-cell one does; the moments use every cell (sparse, cheap).
        rng = np.random.default_rng(seed)
        rows = np.arange(expr.X.shape[0])
        if expr.X.shape[0] > MAX_FIT_CELLS:
            rows = np.sort(rng.choice(expr.X.shape[0], MAX_FIT_CELLS, replace=False))
        X_fit = expr.X[rows] if len(rows) < expr.X.shape[0] else expr.X
        self.genes = self._select_genes(X_fit, expr.genes)
        if labels is not None and self.markers_per_pair > 0:
            markers = pairwise_markers(X_fit, expr.genes, np.asarray(labels)[rows], self.markers_per_pair)
            self.genes = np.union1d(markers, self.genes)
        X, _ = align(expr, self.genes)
        self.mean, self.std = _moments(X) if self.values == "log" else _dense_moments(X, self._values)
        Z = self._scale(self._values(X[rows]), self.mean, self.std)
        k = int(min(self.n_components, Z.shape[0] - 1, Z.shape[1]))
        pca = PCA(n_components=k, svd_solver="randomized" if k < min(Z.shape) // 2 else "full", random_state=seed)
        pca.fit(Z)
        # PCA centres on the fitted rows; Z is already centred by the reference mean, so the
        # projection is Z @ componentsᵀ for any cell.
        self.components = pca.components_.astype(np.float32)
        logger.info("Default embedder: %d genes → %d components.", len(self.genes), k)
        return self

    def _values(self, X) -> np.ndarray:
        """Dense float32 values of sparse rows ``X`` as the embedder reads them (see ``values``)."""
        if self.values == "log":
            return X.toarray()
        dense = row_ranks(X)
        dense -= dense.mean(axis=1, keepdims=True)
        dense /= np.maximum(np.sqrt((dense**2).mean(axis=1, keepdims=True)), 1e-6)
        return dense

    @staticmethod
    def _scale(dense: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        return np.clip((dense - mean) / std, -10, 10, out=dense)

    def transform(self, cells: Cells) -> np.ndarray:  # noqa: D102
        return self._project(cells, residual=False)[0]

    def embed(self, cells: Cells) -> tuple[np.ndarray, np.ndarray]:  # noqa: D102
        return self._project(cells, residual=True)

    def residual(self, cells: Cells) -> np.ndarray:
        """Mean squared scaled expression off the reference's principal subspace, per cell.

        A new cell type often differs in genes that vary little in the reference, which PCA
        of the reference all but ignores: its embedding then sits among known cells. The part of
        the scaled gene vector that the components do not span sees it (issue-11 signal
        "outside the embedding").
        """
        return self._project(cells, residual=True)[1]

    def _project(self, cells: Cells, *, residual: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """The embedding and, with ``residual``, the off-subspace residual, in one pass over the cells."""
        if self.components is None:
            msg = "The embedder is not fitted yet."
            raise RuntimeError(msg)
        X, present = cells.aligned(self.genes)
        if self.scale == "self":
            mean, std = _moments(X) if self.values == "log" else _dense_moments(X, self._values)
        else:
            mean, std = self.mean, self.std
        out = np.empty((X.shape[0], self.dim), dtype=np.float32)
        res = np.empty(X.shape[0], dtype=np.float32) if residual else None
        # In float64, rounded to float32 after: a float32 product's last bits depend on how many
        # rows the BLAS kernel gets, so a cell's embedding (and its nearest query neighbours)
        # would change with the chunk it is read in (measured: 29 of 700 pbmc68k p-values).
        components = self.components.astype(np.float64)
        gram = components @ components.T
        for start in range(0, X.shape[0], CHUNK):
            Z = self._scale(self._values(X[start : start + CHUNK]), mean, std).astype(np.float64)
            Z[:, ~present] = 0.0
            E = Z @ components.T
            out[start : start + CHUNK] = E
            if res is not None:
                # ‖Z − E·C‖² expanded (E = Z·Cᵀ): equal to 1e-14 relative, 20× faster than
                # forming the residual matrix; the Gram term keeps it exact for float32 components
                # that are orthonormal only to 1e-6.
                sq = _row_dot(Z, Z) - 2 * _row_dot(E, E) + _row_dot(E @ gram, E)
                res[start : start + CHUNK] = np.maximum(sq, 0.0) / Z.shape[1]
        return out, res

    def config(self) -> dict:  # noqa: D102
        return {
            "kind": self.kind,
            "n_genes": self.n_genes,
            "n_components": self.n_components,
            "scale": self.scale,
            "values": self.values,
            "markers_per_pair": self.markers_per_pair,
            "genes": None if self.genes is None else self.genes.tolist(),
        }

    def arrays(self) -> dict[str, np.ndarray]:  # noqa: D102
        return {"mean": self.mean, "std": self.std, "components": self.components}

    @classmethod
    def from_state(cls, config: dict, arrays: dict[str, np.ndarray]) -> DefaultEmbedder:  # noqa: D102
        emb = cls(
            config["n_genes"],
            config["n_components"],
            config["scale"],
            config.get("values", "log"),
            config.get("markers_per_pair", 0),
        )
        emb.genes = np.asarray(config["genes"], dtype=str)
        emb.mean, emb.std = arrays["mean"], arrays["std"]
        emb.components = arrays["components"]
        return emb


def row_ranks(X) -> np.ndarray:
    """Each row's ranks of a sparse non-negative matrix, ties averaged (``scipy.stats.rankdata`` per row).

    Works on the stored values only: a row's zeros share the average of the lowest ranks, and
    only its positive values are sorted — 10–20× faster than ranking the dense rows. The
    matrix must hold no duplicate entries (:func:`~spikgpt.data.prepare` sums them); its
    column indices need not be sorted.
    """
    X = sp.csr_matrix(X, dtype=np.float32, copy=True)  # the caller's matrix is left as it is
    X.eliminate_zeros()
    n, g = X.shape
    nnz = np.diff(X.indptr)
    zeros = (g - nnz).astype(np.float32)
    out = np.repeat(((zeros + 1) / 2)[:, None], g, axis=1)
    rows = np.repeat(np.arange(n, dtype=np.uint64), nnz)
    # Positive float32 values order as their bit patterns do, so one integer sort by (row, value)
    # replaces a two-key lexsort (3× faster); rows stay in CSR order, so row[order] == rows.
    key = (rows << np.uint64(32)) | X.data.view(np.uint32)
    order = np.argsort(key, kind="stable")
    key = key[order]
    starts = np.empty(len(key), dtype=bool)
    starts[:1] = True
    np.not_equal(key[1:], key[:-1], out=starts[1:])
    run = np.cumsum(starts) - 1
    rows = rows.astype(np.intp)
    position = np.arange(len(key)) - X.indptr[:-1][rows]  # 0-based among the row's positive values
    mean_position = position[starts] + (np.bincount(run) - 1) / 2
    out[rows, X.indices[order]] = zeros[rows] + 1 + mean_position[run]
    return out


def pairwise_markers(X, genes: np.ndarray, labels: np.ndarray, per_pair: int) -> np.ndarray:
    """Genes most up in each cell type against each other type, by mean expression.

    Parameters
    ----------
    X
        Sparse ``[n_cells, n_genes]`` log-normalised expression.
    genes
        Names of the columns of ``X``.
    labels
        Cell type of every row.
    per_pair
        Genes taken per ordered pair of types (fewer where fewer are higher in the first type).

    Returns
    -------
    The union of the selected genes' names, sorted.
    """
    classes, codes = np.unique(labels, return_inverse=True)
    counts = np.bincount(codes, minlength=len(classes)).astype(np.float64)
    member = sp.csr_matrix((1.0 / counts[codes], (codes, np.arange(len(codes)))), shape=(len(classes), len(codes)))
    means = np.asarray((member @ X).todense())
    chosen = np.zeros(len(genes), dtype=bool)
    for a in range(len(classes)):
        diff = means[a] - means  # row b: how much higher type a is than type b, per gene
        diff[a] = -np.inf
        top = np.argpartition(-diff, min(per_pair, diff.shape[1] - 1), axis=1)[:, :per_pair]
        chosen[top[np.take_along_axis(diff, top, axis=1) > 0]] = True
    return np.sort(np.asarray(genes)[chosen])


def _dense_moments(X, values) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and s.d. of ``values(rows)``, chunk by chunk."""
    total = np.zeros(X.shape[1])
    sq = np.zeros(X.shape[1])
    for start in range(0, X.shape[0], CHUNK):
        D = values(X[start : start + CHUNK]).astype(np.float64)
        total += D.sum(axis=0)
        sq += (D**2).sum(axis=0)
    mean = total / max(X.shape[0], 1)
    std = np.sqrt(np.maximum(sq / max(X.shape[0], 1) - mean**2, 0))
    std[std < 1e-6] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def _row_dot(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Row-wise dot products of two equally shaped matrices."""
    return np.einsum("ij,ij->i", A, B)


def _moments(X) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and s.d. of a sparse matrix, without densifying it."""
    mean = np.asarray(X.mean(axis=0)).ravel()
    sq = np.asarray(X.multiply(X).mean(axis=0)).ravel()
    std = np.sqrt(np.maximum(sq - mean**2, 0))
    std[std < 1e-6] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)
